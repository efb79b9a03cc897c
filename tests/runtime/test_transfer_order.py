"""The stream orderings of KV moves and of the token side, checked on the CPU: engines whose
streams are labels, and `RecordingStreams` (a recording double of the stream API) in place of
CUDA. The data path is the real one (the torch references on the CPU), so every move is also
checked for what lands where."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from recording_streams import FakeEvent, RecordingStreams

from splitnode.engine.config import EngineConfig
from splitnode.engine.engine import Engine
from splitnode.engine.kv import BlockPool, allocate_kv_cache, layer_views
from splitnode.engine.sampling import SamplingParams
from splitnode.engine.sequence import Sequence
from splitnode.runtime import transfer
from splitnode.runtime.messages import Arrive
from splitnode.runtime.router import Router
from splitnode.runtime.transfer import PEER, SAME_DEVICE, THROUGH_HOST, KVMover
from splitnode.runtime.worker import Handoff, Worker, WorkerPolicy

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 3, 16, 4, 2, 8


class FakeEngine:
    """What KVMover reads of an engine: a random cache on the CPU, streams as labels, and a
    device that may name another device ("cpu:1") so the cross-device path is taken."""

    def __init__(self, name: str, device: str, seed: int = 0):
        self.name, self.device = name, torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.kv_cache = allocate_kv_cache(LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM, torch.float32, "cpu")
        self.kv_cache.copy_(torch.randn(self.kv_cache.shape, generator=g))
        self.kv_caches = layer_views(self.kv_cache)
        self.compute_stream, self.transfer_stream = f"{name}.compute", f"{name}.transfer"

    def __repr__(self) -> str:
        return self.name


@pytest.fixture
def rec(monkeypatch):
    """The double, with the pack kernels' launches and the cross-device copies recorded too (on
    the stream current then)."""
    streams = RecordingStreams()
    for name in ("kv_pack", "kv_pack_all", "kv_unpack", "kv_unpack_all", "peer_copy"):
        real = getattr(transfer, name)

        def launch(*args, _real=real, _name=name):
            streams.calls.append(({"peer_copy": "copy"}.get(_name, _name.removeprefix("kv_").removesuffix("_all")),
                                  streams.current))
            return _real(*args)

        monkeypatch.setattr(transfer, name, launch)
    return streams


def moved_intact(src, dst, src_blocks, dst_blocks, layers=range(LAYERS)) -> bool:
    layers = list(layers)
    return torch.equal(dst.kv_cache[:, layers][:, :, dst_blocks], src.kv_cache[:, layers][:, :, src_blocks])


def test_a_whole_move_makes_each_sides_ids_on_the_stream_that_reads_them(rec):
    """C3: the source's ids on its transfer stream (the pack's), the destination's on the pair
    stream (the unpack's), never on a default stream whose pool another move reuses."""
    P, T = FakeEngine("P", "cpu"), FakeEngine("T", "cpu:1", seed=1)
    T.kv_cache.fill_(float("nan"))
    mover = KVMover(streams=rec)
    sent = mover.send(P, T, [3, 1, 7], [0, 5, 2], range(LAYERS))
    pair = mover.pair_stream(P, T)
    assert pair not in ("T.transfer", "T.compute", None)
    assert rec.of("ids") == [("ids", "P.transfer", [3, 1, 7]), ("ids", pair, [0, 5, 2])]
    assert [c for c in rec.calls if c[0] in ("pack", "unpack")] == [("pack", "P.transfer"), ("unpack", pair)]
    assert moved_intact(P, T, [3, 1, 7], [0, 5, 2])
    untouched = torch.ones(BLOCKS, dtype=torch.bool)
    untouched[[0, 5, 2]] = False
    assert T.kv_cache[:, :, untouched].isnan().all()
    assert sent.written.stream == pair and sent.packed.stream == "P.transfer"


def test_layer_wise_ids_are_made_once_on_their_readers_and_passed_through(rec):
    P, T = FakeEngine("P", "cpu"), FakeEngine("T", "cpu:1", seed=1)
    mover = KVMover(streams=rec)
    src_ids, dst_ids = mover.block_ids(P, T, [4, 9], [1, 2])
    for layer in range(LAYERS):
        mover.send(P, T, src_ids, dst_ids, range(layer, layer + 1))
    assert rec.of("ids") == [("ids", "P.transfer", [4, 9]), ("ids", mover.pair_stream(P, T), [1, 2])]
    assert moved_intact(P, T, [4, 9], [1, 2])


def test_the_source_waits_for_its_pack_alone_and_no_source_queues_behind_another(rec):
    """P2: each source's compute waits for the event recorded right after its own pack, never for
    the destination's streams; P1/P2: two sources write one destination on two pair streams, and
    nothing a sender does touches the destination's compute or transfer stream."""
    P1, P2, T = FakeEngine("P1", "cpu"), FakeEngine("P2", "cpu:2", seed=2), FakeEngine("T", "cpu:1", seed=1)
    mover = KVMover(streams=rec)
    s1 = mover.send(P1, T, [0, 1], [8, 9], range(LAYERS))
    mover.wait_packed(P1, s1)
    s2 = mover.send(P2, T, [5], [12], range(LAYERS))
    mover.wait_packed(P2, s2)
    assert mover.pair_stream(P1, T) != mover.pair_stream(P2, T)
    packs = [i for i, c in enumerate(rec.calls) if c[0] == "pack"]
    assert [rec.calls[i + 1] for i in packs] == [("record", "P1.transfer", s1.packed), ("record", "P2.transfer", s2.packed)]
    assert rec.of("wait_event") == [("wait_event", "P1.compute", s1.packed), ("wait_event", "P2.compute", s2.packed)]
    # the only other waits: each source's transfer stream after its own compute (the layer is written)
    assert rec.of("wait_stream") == [("wait_stream", "P1.transfer", "P1.compute"), ("wait_stream", "P2.transfer", "P2.compute")]
    assert not [c for c in rec.calls if "T.compute" in c or "T.transfer" in c]
    assert moved_intact(P1, T, [0, 1], [8, 9]) and moved_intact(P2, T, [5], [12])


def test_a_move_within_one_device_runs_on_the_source_transfer_stream(rec):
    P, Q = FakeEngine("P", "cpu"), FakeEngine("Q", "cpu", seed=1)
    mover = KVMover(streams=rec)
    sent = mover.send(P, Q, [2, 3], [6, 7], range(LAYERS))
    assert mover.pair_stream(P, Q) == "P.transfer"
    assert [c for c in rec.calls if c[0] in ("pack", "unpack")] == [("pack", "P.transfer"), ("unpack", "P.transfer")]
    assert sent.written.stream == "P.transfer"
    assert moved_intact(P, Q, [2, 3], [6, 7])


@pytest.mark.parametrize("layers", [range(LAYERS), range(1, 2)])
def test_a_long_move_goes_in_chunks_through_bounded_staging(rec, layers):
    """M1: staging never passes the bound (here 3 blocks' worth of the piece), whatever the
    move's length; the KV still arrives whole."""
    P, T = FakeEngine("P", "cpu"), FakeEngine("T", "cpu:1", seed=1)
    whole = len(layers) == LAYERS
    per_block = (LAYERS if whole else 1) * 2 * BLOCK_SIZE * HEADS * DIM * 4
    mover = KVMover(streams=rec, staging_bytes=3 * per_block)
    src, dst = [15, 0, 3, 9, 4, 11, 7], [1, 2, 3, 4, 5, 6, 8]
    mover.send(P, T, src, dst, layers)
    assert moved_intact(P, T, src, dst, layers)
    assert len([c for c in rec.calls if c[0] == "pack"]) == 3  # 3 + 3 + 1 blocks, over every layer at once or one
    assert len(mover._staging) == 2  # one on each side, reused by every chunk
    assert max(b.numel() * b.element_size() for b in mover._staging.values()) <= 3 * per_block


def test_a_move_with_the_real_stream_api_on_the_cpu_is_synchronous_and_has_no_events():
    P, T = FakeEngine("P", "cpu"), FakeEngine("T", "cpu", seed=1)
    P.compute_stream = P.transfer_stream = T.compute_stream = T.transfer_stream = None  # as a CPU engine has
    mover = KVMover(staging_bytes=2 * LAYERS * 2 * BLOCK_SIZE * HEADS * DIM * 4)
    sent = mover.send(P, T, [1, 2, 3, 4, 5], [10, 11, 12, 13, 14], range(LAYERS))
    assert sent == (None, None) and mover.fence(P, T) is None
    assert moved_intact(P, T, [1, 2, 3, 4, 5], [10, 11, 12, 13, 14])


def test_a_prefill_batch_sends_each_layer_once_per_destination_over_all_its_sequences(rec):
    """L1: four long prompts prefilled in one batch, all decoding on one token worker: per layer
    one wait for the compute, one pack, one copy and one unpack over the blocks of all four (not
    four of each), the ids made once for the batch, and every block bytewise intact there."""
    P = Engine(EngineConfig(num_kv_blocks=64), "prompt", "cpu")
    T = Engine(EngineConfig(num_kv_blocks=64), "token", "cpu")
    P.streams, P.compute_stream, P.transfer_stream = rec, "P.compute", "P.transfer"
    T.compute_stream, T.transfer_stream = "T.compute", "T.transfer"
    T.device = torch.device("cpu", 1)  # a label for another device: the move takes the copy between devices
    mover = KVMover(streams=rec)
    worker = Worker(0, "cpu:0", P, mover, _Listener(), lambda seq, w: (None, None), WorkerPolicy(layerwise_min_tokens=16))
    dest = SimpleNamespace(engine=T)
    seqs = []
    for i, n in enumerate((40, 33, 50, 17)):
        seq = Sequence(i, [(5 * i + j) % 250 + 3 for j in range(n)], SamplingParams(max_tokens=4, temperature=0.0))
        seq.handoff = Handoff(dest, blocks=T.pool.allocate(T.pool.blocks_for(n + 4))[::-1])  # reserved there
        P.add(seq)
        seqs.append(seq)
    assert worker._run_batch()
    layers = P.model_config.num_hidden_layers
    assert all(s.num_computed == s.num_prompt_tokens for s in seqs)  # one batch prefilled all four
    pair = mover.pair_stream(P, T)
    moves = [c for c in rec.calls if c[0] in ("wait_stream", "pack", "copy", "unpack")]
    assert moves == [("wait_stream", "P.transfer", "P.compute"), ("pack", "P.transfer"), ("copy", pair),
                     ("unpack", pair)] * layers
    ids = rec.of("ids")
    blocks = [P.pool.blocks_for(s.num_prompt_tokens) for s in seqs]
    assert [c[1] for c in ids] == ["P.transfer", pair] and [len(c[2]) for c in ids] == [sum(blocks)] * 2
    for seq, n in zip(seqs, blocks):
        src, dst = seq.block_table[:n], seq.handoff.blocks[:n]
        assert torch.equal(T.kv_cache[:, :, dst], P.kv_cache[:, :, src]) and P.kv_cache[:, :, src].abs().sum() > 0
        assert seq.handoff.num_sent_for(seq) == seq.num_prompt_tokens  # its hand-off sends nothing more
        assert seq.handoff.sent.written.stream == pair
    written = {b for seq, n in zip(seqs, blocks) for b in seq.handoff.blocks[:n]}
    assert not T.kv_cache[:, :, [b for b in range(64) if b not in written]].any()  # nothing else written


# -- the router and the peer matrix (T1) -------------------------------------------------------


def fake_worker(index: int, device: str, free: int, mover: KVMover):
    pool = BlockPool(64, 16)
    pool.allocate(64 - free)
    return SimpleNamespace(index=index, engine=SimpleNamespace(device=torch.device(device), pool=pool), mover=mover,
                           accepts_decode=True, error=None)


def test_the_router_prefers_a_p2p_connected_token_worker_over_more_free_blocks():
    # a test double for torch.cuda.can_device_access_peer: cuda:0 reaches cuda:1 over P2P, not cuda:2
    mover = KVMover(can_access_peer=lambda a, b: {a, b} != {0, 2})
    p = fake_worker(0, "cuda:0", 0, mover)
    near, far = fake_worker(1, "cuda:1", 10, mover), fake_worker(2, "cuda:2", 50, mover)
    router = Router([p, near, far], lease_s=30.0)
    seq = SimpleNamespace(num_tokens=100)
    dest, blocks = router.pick_dest(seq, p)
    assert dest is near and len(blocks) == 7
    near.engine.pool.allocate(near.engine.pool.num_free)  # full: the host path is next
    dest, _ = router.pick_dest(seq, p)
    assert dest is far
    assert [mover.link(torch.device(a), torch.device(b)) for a, b in [
        ("cuda:0", "cuda:0"), ("cuda:0", "cuda:1"), ("cuda:0", "cuda:2"), ("cuda:1", "cpu")]] == [
        SAME_DEVICE, PEER, THROUGH_HOST, THROUGH_HOST]


def test_the_peer_matrix_names_every_pair_without_p2p():
    mover = KVMover(can_access_peer=lambda a, b: {a, b} != {0, 2})
    for d in ("cuda:0", "cuda:1", "cuda:2", "cpu", "cuda:1"):
        mover.add_device(torch.device(d))
    report = mover.peer_report()
    assert len(report) == 6
    assert [line for line in report if "host" in line] == ["cuda:0 -> cuda:2: through the host (no P2P)",
                                                           "cuda:2 -> cuda:0: through the host (no P2P)"]
    mover.warm_up(torch.device("cpu"))  # logs; makes no copy off a GPU


# -- the token side (P1) -------------------------------------------------------------------------


class _Listener:
    def __init__(self):
        self.events = []

    def on_tokens(self, events):
        self.events.extend(events)

    def on_handoff(self, dest, arrive):
        dest.post(arrive)

    def on_role_reached(self, msg):
        pass

    def on_failure(self, msg):
        raise AssertionError(f"the worker failed: {msg.error!r}")


def arrived(eng: Engine, seq_id: int) -> Sequence:
    """A sequence whose prompt was prefilled elsewhere: its KV in blocks here, its first token out."""
    seq = Sequence(seq_id, [3 + seq_id] * 20, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    seq.num_computed = seq.num_prompt_tokens
    seq.append_token(7)
    seq.block_table = eng.pool.allocate(eng.pool.blocks_for(seq.num_tokens))
    return seq


def test_a_token_worker_waits_only_for_the_events_of_the_sequences_it_admits():
    """P1: no wait on the transfer streams at all; each admitted arrival's compute-stream wait is
    for its own event, and an arrival whose copy is still running is neither waited for nor run."""
    eng = Engine(EngineConfig(num_kv_blocks=64), "token", "cpu")
    rec = RecordingStreams()
    eng.streams, eng.compute_stream, eng.transfer_stream = rec, "T.compute", "T.transfer"
    worker = Worker(1, "cpu:1", eng, KVMover(streams=rec), _Listener(), lambda seq, w: (None, None))
    seqs = [arrived(eng, i) for i in range(3)]
    events = [FakeEvent("P->T", fired=i != 1) for i in range(3)]
    for seq, ev in zip(seqs, events):
        worker.post(Arrive(seq, ev))
    worker._turn()
    assert rec.of("wait_event") == [("wait_event", "T.compute", events[0]), ("wait_event", "T.compute", events[2])]
    assert not rec.of("wait_stream")
    assert [s.num_tokens for s in seqs] == [22, 21, 22]  # the one still arriving did not run
    assert ("on", "T.compute") in rec.calls  # the step ran on the compute stream
    events[1].fired = True
    worker._turn()
    assert rec.of("wait_event")[2:] == [("wait_event", "T.compute", events[1])]
    assert seqs[1].num_tokens == 22 and not rec.of("wait_stream")


def test_a_timed_out_arrival_recomputes_in_other_blocks_and_frees_its_own_after_the_copy():
    eng = Engine(EngineConfig(num_kv_blocks=64), "token", "cpu")
    rec = RecordingStreams()
    eng.streams, eng.compute_stream, eng.transfer_stream = rec, "T.compute", "T.transfer"
    worker = Worker(1, "cpu:1", eng, KVMover(streams=rec), _Listener(), lambda seq, w: (None, None))
    seq = arrived(eng, 0)
    late, held = FakeEvent("P->T", fired=False), list(seq.block_table)
    worker.post(Arrive(seq, late))
    worker._apply_inbox()
    worker.arrivals[0].since -= worker.policy.transfer_timeout_s + 1
    worker._admit_arrivals()
    assert eng.pool.num_pending == len(held) and not rec.of("wait_event")
    for _ in range(3):
        worker._turn()
    assert seq.num_computed >= seq.num_prompt_tokens and not set(seq.block_table) & set(held)
    late.fired = True
    assert eng.pool.num_pending == 0 and eng.pool.num_used == len(seq.block_table)
