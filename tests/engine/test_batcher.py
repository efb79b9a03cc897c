"""The batcher alone: what a batch takes, in which order, and which sequence makes room."""

from __future__ import annotations

from splitnode import EngineConfig, SamplingParams
from splitnode.engine.batcher import Batcher, Role
from splitnode.engine.kv import BlockPool
from splitnode.engine.sequence import Sequence

PARAMS = SamplingParams(max_tokens=100, temperature=0.0)


def batcher(role: str, num_blocks: int, max_tokens: int, **config) -> Batcher:
    cfg = EngineConfig(block_size=4, num_kv_blocks=num_blocks, max_num_batched_tokens=max_tokens, **config)
    return Batcher(cfg, BlockPool(num_blocks, 4), role)


def running(b: Batcher, seq_id: int, num_tokens: int, num_computed: int, arrival: float) -> Sequence:
    """A sequence that holds the blocks for its computed tokens."""
    seq = Sequence(seq_id, list(range(num_tokens)), PARAMS)
    seq.arrival_time = arrival
    seq.num_computed = num_computed
    seq.block_table = b.pool.allocate(b.pool.blocks_for(num_computed))
    b.add(seq)
    return seq


def scheduled(b: Batcher) -> list[tuple[int, int]]:
    batch = b.schedule()
    for seq, n in zip(batch.seqs, batch.chunk_lens):  # as the engine would run it
        seq.num_computed += n
        if seq.num_computed == seq.num_tokens:
            seq.append_token(0)
    return [(s.seq_id, n) for s, n in zip(batch.seqs, batch.chunk_lens)]


def test_roles_are_strings_too():
    b = batcher("token", 8, 8)
    assert b.role is Role.TOKEN and b.role == "token"
    b.role = "prompt"
    assert b.role is Role.PROMPT and not b.role.decodes and b.role.takes_prompts
    assert Role.MIXED.decodes and Role.MIXED.takes_prompts and not Role.TOKEN.takes_prompts


def test_a_mixed_batch_puts_a_decode_left_out_twice_before_the_prompts():
    b = batcher("mixed", 64, 8, decode_max_skips=2)
    decode = running(b, 0, 4, 3, arrival=0.0)  # one token left: a decode
    prompt = Sequence(1, list(range(100)), PARAMS)
    b.add(prompt)
    assert scheduled(b) == [(1, 8)]  # prompts first: the chunk takes the whole budget
    assert scheduled(b) == [(1, 8)] and decode.num_skipped == 2
    assert scheduled(b) == [(0, 1), (1, 7)]  # overdue: it goes first, the chunk gets the rest
    assert decode.num_skipped == 0


def test_a_mid_prefill_chunk_preempts_newer_sequences_to_go_on():
    b = batcher("mixed", 4, 8)
    old = running(b, 0, 16, 8, arrival=0.0)  # mid-prefill, 2 blocks
    new = running(b, 1, 8, 4, arrival=1.0)  # mid-prefill, 1 block
    decode = running(b, 2, 4, 3, arrival=2.0)  # the newest, 1 block
    assert b.pool.num_free == 0
    assert scheduled(b) == [(0, 8)]  # the newest made room first, then `new`
    assert b.num_preempted == 2 and list(b.waiting) == [new, decode] and new.num_computed == 0
    assert old.num_preemptions == 0 and len(old.block_table) == 4


def test_a_mid_prefill_chunk_never_preempts_an_older_sequence():
    b = batcher("mixed", 3, 8)
    decode = running(b, 0, 4, 3, arrival=0.0)  # its next token fits its block
    young = running(b, 1, 16, 8, arrival=1.0)  # mid-prefill: its next chunk needs 2 more blocks
    assert scheduled(b) == [(0, 1)]  # it waits rather than preempt the older decode
    assert b.num_preempted == 0 and decode.num_tokens == 5
    assert young.num_computed == 8 and len(young.block_table) == 2
