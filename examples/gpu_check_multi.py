"""The GPU checks of issue 10, prepared for a box with two or more GPUs (about 15 minutes).

    python examples/gpu_check_multi.py                 # every section
    python examples/gpu_check_multi.py --only topo,ids --json out.json

Each section runs in a subprocess with a timeout, so a sticky CUDA error in one does not end the
rest; a table and the JSON of every section come last. Correctness sections fail the run (exit 1);
timing sections print their figure against the goal and never fail it.

- topo     the peer matrix (can_device_access_peer) and cross-device copy GB/s at 8/64/512 MiB with
           the host ms per call, plus a host-staged copy through pinned memory (a box without P2P)
- capture  C1: the runtime on cuda:0 (prompt) + cuda:1 (token), with graphs and eager: every
           engine's graphs captured on a stream of its own device; greedy tokens equal the CPU's
- stream   C2: LLM(device="cuda:1").stream() gives the tokens of LLM("cuda:0") and of the CPU
- ids      C3: back-to-back whole-sequence moves cuda:0 -> cuda:1, the first pack held back with
           torch.cuda._sleep, then two sources moving into one destination at once from two
           threads: every block bytewise equal to its source
- tbt      P1: decode TBT p50/p99/max on the token GPU, quiet and while 4 x 3,000-token prompts
           prefill on the prompt GPU, layer-wise on and off (goal: busy p99 within 1.2x of quiet)
- layer    L1: host ms per layer of the layer-wise send for 1, 4 and 8 sequences, sent as the worker
           sends them now (one send per layer over all of them) and one send per sequence (before)
- attn     K1: paged decode attention with a 128K-wide table (graphs) against a tight one (goal:
           within 1.1x, the splits now sized from each context)
- fused    G1: the demo model (fp32) gives the same logits with the Triton layer kernels (the default
           on CUDA) and with the torch ops (USE_TRITON=False), over a prefill batch and a decode
           step; then a random 1B bf16 Llama both ways at batch 1/16/64: CUDA kernels per decode
           forward (fails unless halved), ms per graph replay and per engine step, logit agreement
- prefill  K3: prefill attention in one paged launch against the loop of one SDPA per sequence
           (USE_TRITON=False), 8B-shaped heads: agreement and ms for 16x128, 4x512, 1x2048 tokens
           and 8 chunks of 256 after 1,792; then a 1B model's whole prefill forward both ways

With one GPU the cross-device sections run on cuda:0 twice (two engines on one card), which still
checks the capture streams, the ids and the TBT coupling within a device, and say so. Without CUDA
the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SECTIONS: dict = {}  # name -> (function, timeout in s, "correctness" | "timing"), in run order


def section(timeout_s: int, kind: str = "correctness"):
    def register(fn):
        SECTIONS[fn.__name__] = (fn, timeout_s, kind)
        return fn
    return register


def pair() -> tuple[str, str, bool]:
    """The prompt GPU, the token GPU, and whether they are two GPUs."""
    two = torch.cuda.device_count() >= 2
    return "cuda:0", "cuda:1" if two else "cuda:0", two


def worker_names(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a != b else (a, f"{a}/1")


PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(20 + 37 * i)] for i in range(12)]  # 20..427 tokens


def greedy(n: int = 24):
    from splitnode import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def cpu_reference(prompts, params):
    from splitnode import LLM

    return [o.token_ids for o in LLM(device="cpu", num_kv_blocks=1024).generate(prompts, params)]


def agree(outs, ref) -> int:
    return sum(o == r for o, r in zip(outs, ref))


def random_llama(layers: int = 16, max_len: int = 4096) -> Path:
    """A ~1B-parameter random bf16 Llama (gpu_check_engine.py's writer)."""
    from gpu_check_engine import write_random_llama

    path = Path(tempfile.mkdtemp()) / "llama-1b"
    write_random_llama(path, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                       hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=max_len, tie_word_embeddings=False, torch_dtype="bfloat16",
                       bos_token_id=256, eos_token_id=257)
    return path


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# -- sections ----------------------------------------------------------------------------------------


@section(90)
def topo() -> dict:
    n = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(n)]
    peer = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]
    print("GPUs:", ", ".join(f"cuda:{i} {name}" for i, name in enumerate(names)))
    print("peer access (row -> column):")
    print("        " + " ".join(f"cuda:{j:<2}" for j in range(n)))
    for i in range(n):
        print(f"cuda:{i:<2}  " + " ".join(f"{'-' if i == j else 'P2P' if peer[i][j] else 'host':<7}" for j in range(n)))
    copies = []
    pairs = [(0, 1), (1, 0)] if n >= 2 else []
    for src, dst in pairs:
        for mib in (8, 64, 512):
            x = torch.randn(mib << 18, device=f"cuda:{src}")
            y = torch.empty(x.shape, device=f"cuda:{dst}")
            y.copy_(x)  # the first copy of the pair enables peer access
            torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
            host, reps = [], 10
            t0 = time.perf_counter()
            for _ in range(reps):
                t = time.perf_counter()
                y.copy_(x, non_blocking=True)
                host.append(time.perf_counter() - t)
            torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
            dt = (time.perf_counter() - t0) / reps
            ok = torch.equal(y.cpu(), x.cpu())
            copies.append({"src": src, "dst": dst, "mib": mib, "p2p": peer[src][dst], "gb_s": round(mib * 2**20 / dt / 1e9, 1),
                           "host_ms_per_call": round(statistics.median(host) * 1e3, 3), "intact": ok})
            print(f"  copy cuda:{src} -> cuda:{dst} {mib:4} MiB: {copies[-1]['gb_s']:7.1f} GB/s, "
                  f"host {copies[-1]['host_ms_per_call']:.3f} ms per call, intact={ok}")
    staged = None
    if n >= 2:  # through pinned host memory: about what a box without P2P gets
        x = torch.randn(64 << 18, device="cuda:0")
        h = torch.empty(x.shape).pin_memory()
        y = torch.empty(x.shape, device="cuda:1")
        for _ in range(2):
            torch.cuda.synchronize(0)
            t = time.perf_counter()
            h.copy_(x, non_blocking=True)
            torch.cuda.synchronize(0)
            y.copy_(h, non_blocking=True)
            torch.cuda.synchronize(1)
            dt = time.perf_counter() - t
        staged = round(64 * 2**20 / dt / 1e9, 1)
        print(f"  host-staged copy cuda:0 -> pinned -> cuda:1, 64 MiB: {staged} GB/s")
    return {"ok": all(c["intact"] for c in copies), "gpus": names, "peer": peer, "copies": copies,
            "host_staged_gb_s": staged}


async def _run_runtime(cfg, prompts, params):
    from splitnode.runtime import Runtime

    async with Runtime(cfg) as rt:
        engines = [{"worker": w.name, "device": str(w.engine.device), "graphs": len(w.engine.runner.graphs),
                    "capture_stream_device": None if w.engine.runner.capture_stream is None
                    else str(w.engine.runner.capture_stream.device)} for w in rt.workers]

        async def one(p):
            ev = None
            async for ev in rt.generate(p, params):
                pass
            return ev.token_ids

        outs = await asyncio.gather(*[one(p) for p in prompts])
        return outs, rt.status()["transfers"], engines


@section(300)
def capture() -> dict:
    from splitnode.runtime import RuntimeConfig

    a, b, two = pair()
    pw, tw = worker_names(a, b)
    params = greedy()
    ref = cpu_reference(PROMPTS, params)
    runs, ok = [], True
    for eager in (False, True):
        cfg = RuntimeConfig(devices=f"{a},{b}", roles={pw: "prompt", tw: "token"}, num_kv_blocks=1024,
                            autoscale=False, layerwise_min_tokens=64, enforce_eager=eager)
        outs, moved, engines = asyncio.run(_run_runtime(cfg, PROMPTS, params))
        same = agree(outs, ref)
        own = all(e["capture_stream_device"] == e["device"] for e in engines) if not eager else True
        run_ok = same >= len(PROMPTS) - 1 and own and moved["num_failed"] == 0 and moved["num_sequences"] == len(PROMPTS)
        ok &= run_ok
        runs.append({"eager": eager, "identical": same, "of": len(PROMPTS), "engines": engines, "transfers": moved})
        print(f"runtime {pw} (prompt) + {tw} (token) {'eager' if eager else 'graphs'}: {same}/{len(PROMPTS)} "
              f"identical greedy sequences vs CPU; {moved['num_sequences']} moved, {moved['num_failed']} failed")
        for e in engines:
            print(f"  {e['worker']}: {e['graphs']} graphs, captured on a stream of {e['capture_stream_device']}")
    return {"ok": ok, "two_gpus": two, "runs": runs}


@section(240)
def stream() -> dict:
    from splitnode import LLM

    a, b, two = pair()
    params, prompts = greedy(), PROMPTS[:4]
    ref = cpu_reference(prompts, params)
    outs = {}
    for dev in dict.fromkeys([b, a]):  # cuda:1 first: its executor thread's current device is 0
        llm = LLM(device=dev, num_kv_blocks=1024)

        async def streamed(llm=llm):
            async def one(p):
                ev = None
                async for ev in llm.stream(p, params):
                    pass
                return ev.token_ids
            return await asyncio.gather(*[one(p) for p in prompts])

        outs[dev] = asyncio.run(streamed())
        generated = [o.token_ids for o in llm.generate(prompts, params)]
        print(f"LLM({dev!r}).stream(): {agree(outs[dev], ref)}/{len(prompts)} identical vs CPU, "
              f"{agree(outs[dev], generated)}/{len(prompts)} vs its generate()")
        del llm
    ok = outs[b] == outs[a] and agree(outs[b], ref) >= len(prompts) - 1
    print(f"stream on {b} == stream on {a}: {outs[b] == outs[a]}" + ("" if two else " (one GPU: the same device)"))
    return {"ok": ok, "two_gpus": two}


def _demo_engine(device: str, role: str, random_cache: bool = False):
    """The demo model's engine (eager), its cache random so that a misplaced block shows."""
    from splitnode.engine.config import EngineConfig
    from splitnode.engine.engine import Engine

    eng = Engine(EngineConfig(num_kv_blocks=1024, enforce_eager=True), role, device)
    if random_cache:
        with torch.cuda.device(eng.device):
            eng.kv_cache.normal_()
        torch.cuda.synchronize(eng.device)
    return eng


def _intact(src, dst, src_blocks, dst_blocks) -> bool:
    return torch.equal(src.kv_cache[:, :, src_blocks].cpu(), dst.kv_cache[:, :, dst_blocks].cpu())


@section(180)
def ids() -> dict:
    from splitnode.runtime.transfer import KVMover

    a, b, two = pair()
    src, dst = _demo_engine(a, "prompt", random_cache=True), _demo_engine(b, "token")
    layers = range(src.kv_cache.shape[1])
    mover = KVMover()
    g = torch.Generator().manual_seed(0)
    checks = []
    for held_back in (False, True):
        dst.kv_cache.fill_(float("nan"))
        torch.cuda.synchronize(dst.device)
        perm = torch.randperm(1024, generator=g).tolist()
        a_src, b_src = perm[:48], perm[48:52]
        perm = torch.randperm(1024, generator=g).tolist()
        a_dst, b_dst = perm[:48], perm[48:52]
        with torch.cuda.device(src.device), torch.cuda.stream(src.compute_stream):
            if held_back:  # the first pack waits ~100 ms on the source's transfer stream
                with torch.cuda.stream(src.transfer_stream):
                    torch.cuda._sleep(200_000_000)
            sa = mover.send(src, dst, a_src, a_dst, layers)
            mover.wait_packed(src, sa)
            sb = mover.send(src, dst, b_src, b_dst, layers)
            mover.wait_packed(src, sb)
        sa.written.synchronize(), sb.written.synchronize()
        checks.append({"held_back": held_back, "first": _intact(src, dst, a_src, a_dst), "second": _intact(src, dst, b_src, b_dst)})
        print(f"back-to-back moves {src.device} -> {dst.device}, first pack {'held back' if held_back else 'not delayed'}: "
              f"48 blocks intact={checks[-1]['first']}, then 4 blocks intact={checks[-1]['second']}")
    # two sources (two engines on the prompt GPU) moving into one destination at once
    src2 = _demo_engine(a, "prompt", random_cache=True)
    dst.kv_cache.fill_(float("nan"))
    torch.cuda.synchronize(dst.device)
    free = torch.randperm(1024, generator=g).tolist()
    jobs = {0: [], 1: []}
    for k in range(40):
        n = 1 + (7 * k) % 23
        take, free = free[:n], free[n:]
        jobs[k % 2].append((torch.randperm(1024, generator=g)[:n].tolist(), take))
    sents: list = []

    def run(engine, moves):
        torch.cuda.set_device(engine.device)
        with torch.cuda.stream(engine.compute_stream):
            for i, (s, d) in enumerate(moves):
                if i % 5 == 0:
                    with torch.cuda.stream(engine.transfer_stream):
                        torch.cuda._sleep(20_000_000)
                sent = mover.send(engine, dst, s, d, layers)
                mover.wait_packed(engine, sent)
                sents.append(sent)

    threads = [threading.Thread(target=run, args=(e, jobs[i])) for i, e in enumerate((src, src2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sents:
        s.written.synchronize()
    concurrent = all(_intact(e, dst, s, d) for e, i in ((src, 0), (src2, 1)) for s, d in jobs[i])
    print(f"40 moves from two sources into {dst.device} at once, from two threads: every block intact={concurrent}")
    ok = all(c["first"] and c["second"] for c in checks) and concurrent
    return {"ok": ok, "two_gpus": two, "back_to_back": checks, "concurrent_intact": concurrent}


@section(300, "timing")
def tbt() -> dict:
    from splitnode import SamplingParams
    from splitnode.runtime import Runtime, RuntimeConfig

    a, b, two = pair()
    pw, tw = worker_names(a, b)
    path = random_llama()
    out = {}

    async def measure(layerwise_min_tokens: int) -> dict:
        cfg = RuntimeConfig(model=str(path), dtype="bfloat16", devices=f"{a},{b}", roles={pw: "prompt", tw: "token"},
                            num_kv_blocks=2048, max_num_seqs=32, autoscale=False, layerwise_min_tokens=layerwise_min_tokens)
        async with Runtime(cfg) as rt:
            stamps: list[list[float]] = [[] for _ in range(16)]

            async def decoder(i):
                params = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
                async for _ in rt.generate([(i * 31 + j) % 250 + 3 for j in range(64)], params):
                    stamps[i].append(time.perf_counter())

            async def long_prompt(j):
                params = SamplingParams(max_tokens=1, temperature=0.0)
                async for _ in rt.generate([(j * 17 + k) % 250 + 3 for k in range(3000)], params):
                    pass

            tasks = [asyncio.create_task(decoder(i)) for i in range(16)]
            while min(len(s) for s in stamps) < 40:
                await asyncio.sleep(0.01)
            quiet = (time.perf_counter(), None)
            await asyncio.sleep(1.0)
            quiet = (quiet[0], time.perf_counter())
            busy0 = time.perf_counter()
            await asyncio.gather(*[long_prompt(j) for j in range(4)])
            busy = (busy0, time.perf_counter())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        def gaps(window):
            return [(y - x) * 1e3 for s in stamps for x, y in zip(s, s[1:]) if window[0] <= y <= window[1]]

        q, bz = gaps(quiet), gaps(busy)
        return {"quiet_ms": {"p50": pct(q, 0.5), "p99": pct(q, 0.99), "max": max(q, default=float("nan"))},
                "busy_ms": {"p50": pct(bz, 0.5), "p99": pct(bz, 0.99), "max": max(bz, default=float("nan"))},
                "prefill_s": busy[1] - busy[0]}

    for name, lw in (("layerwise", 512), ("whole", 10**9)):
        r = out[name] = asyncio.run(measure(lw))
        ratio = r["busy_ms"]["p99"] / r["quiet_ms"]["p99"]
        r["p99_ratio"] = ratio
        print(f"TBT on {tw} with 4 x 3000-token prompts prefilling on {pw}, KV sent {name}: quiet p50/p99/max "
              f"{r['quiet_ms']['p50']:.2f}/{r['quiet_ms']['p99']:.2f}/{r['quiet_ms']['max']:.2f} ms, busy "
              f"{r['busy_ms']['p50']:.2f}/{r['busy_ms']['p99']:.2f}/{r['busy_ms']['max']:.2f} ms "
              f"(p99 {ratio:.2f}x quiet, goal <= 1.2x), prefill {r['prefill_s']:.2f} s")
    return {"ok": out["layerwise"]["p99_ratio"] <= 1.2, "two_gpus": two, **out}


@section(180, "timing")
def layer() -> dict:
    from splitnode.engine.config import EngineConfig
    from splitnode.engine.engine import Engine
    from splitnode.runtime.transfer import KVMover

    a, b, _ = pair()
    path = random_llama()
    cfg = EngineConfig(model=str(path), dtype="bfloat16", num_kv_blocks=2048, enforce_eager=True)
    src, dst = Engine(cfg, "prompt", a), Engine(cfg, "token", b)
    with torch.cuda.device(src.device):
        src.kv_cache.normal_()
    mover, out = KVMover(), {}
    num_layers = src.kv_cache.shape[1]
    for k in (1, 4, 8):
        blocks = [list(range(i * 32, i * 32 + 32)) for i in range(k)]  # k sequences of 512 tokens
        targets = [list(range(1024 + i * 32, 1024 + i * 32 + 32)) for i in range(k)]
        per_seq = [mover.block_ids(src, dst, s, d) for s, d in zip(blocks, targets)]
        # as the worker sends them now: every sequence of the batch to one destination in one send
        joined = mover.block_ids(src, dst, sum(blocks, []), sum(targets, []))
        row = {}
        for name, groups in (("per sequence", per_seq), ("batched", [joined])):
            with torch.cuda.device(src.device), torch.cuda.stream(src.compute_stream):
                for s, d in groups:  # warm-up (Triton compiles)
                    mover.send(src, dst, s, d, range(0, 1))
                torch.cuda.synchronize(src.device), torch.cuda.synchronize(dst.device)
                dst.kv_cache.fill_(float("nan"))
                torch.cuda.synchronize(dst.device)
                t0 = time.perf_counter()
                for layer_index in range(num_layers):
                    for s, d in groups:
                        sent = mover.send(src, dst, s, d, range(layer_index, layer_index + 1))
                host = time.perf_counter() - t0
                sent.written.synchronize()
                total = time.perf_counter() - t0
            intact = all(_intact(src, dst, s, d) for s, d in zip(blocks, targets))
            row[name] = {"host_ms_per_layer": host / num_layers * 1e3, "done_ms": total * 1e3, "intact": intact}
            print(f"layer-wise send of {k} sequence(s) of 512 tokens {name}, {src.device} -> {dst.device}: host "
                  f"{row[name]['host_ms_per_layer']:.3f} ms per layer, all {num_layers} layers done in {total * 1e3:.2f} ms, "
                  f"intact={intact}")
        out[k] = row
    return {"ok": all(r["intact"] for row in out.values() for r in row.values()), "per_k": out}


@section(180, "timing")
def attn() -> dict:
    import triton.testing

    from splitnode.kernels.paged_attention import paged_decode_attention_triton

    dev, out = "cuda:0", []
    heads, kv_heads, d, bs = 32, 8, 128, 16
    for batch in (1, 8, 64):
        for ctx in (2048, 8192):
            nb = ctx // bs
            kc = torch.randn(batch * nb + 1, bs, kv_heads, d, device=dev, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            tight = torch.arange(batch * nb, device=dev, dtype=torch.int32).view(batch, nb)
            wide = torch.zeros(batch, 131072 // bs, device=dev, dtype=torch.int32)
            wide[:, :nb] = tight
            lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
            q = torch.randn(batch, heads, d, device=dev, dtype=torch.bfloat16)

            def call(table, q=q, kc=kc, vc=vc, lens=lens):
                return paged_decode_attention_triton(q, kc, vc, table, lens, d**-0.5)

            ms = {name: triton.testing.do_bench(lambda t=t, call=call: call(t), warmup=10, rep=100, return_mode="median")
                  for name, t in (("tight", tight), ("wide", wide))}
            out.append({"batch": batch, "ctx": ctx, **ms, "wide_over_tight": ms["wide"] / ms["tight"]})
            print(f"paged attention B={batch:<3} ctx {ctx:5}: tight table {ms['tight'] * 1e3:8.1f} us, "
                  f"128K-wide {ms['wide'] * 1e3:8.1f} us ({ms['wide'] / ms['tight']:.2f}x, goal <= 1.1x)")
    return {"ok": all(c["wide_over_tight"] <= 1.1 for c in out), "cases": out}


def _decode_inputs(eng, bs: int, ctx: int):
    """bs sequences of ctx tokens prefilled in `eng`, then a few decode steps: the runner's static
    graph inputs now hold a real decode step (what the profiled eager forward reruns)."""
    from splitnode import SamplingParams
    from splitnode.engine.sequence import Sequence

    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(i, [(i * 31 + j) % 250 + 3 for j in range(ctx)], params) for i in range(bs)]
    for s in seqs:
        eng.add(s)
    while any(s.num_computed < ctx for s in seqs):
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    return seqs


def _demo_parity(attention) -> float:
    """The demo model (float32) on cuda:0, one prefill batch of three prompts and then their decode
    step, with the kernels and with the torch ops: the largest |dlogprob| between the two."""
    from splitnode import LLM
    from splitnode.model.attention import AttentionContext, PrefillChunk

    eng = LLM(device="cuda:0", num_kv_blocks=64, enforce_eager=True).engine
    dev, lens = eng.device, [40, 17, 64]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (sum(lens),), generator=g).to(dev)
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
    starts = [sum(lens[:i]) for i in range(3)]
    slots = torch.cat([torch.arange(n) + 64 * 16 // 4 * i for i, n in enumerate(lens)]).to(dev)  # 256 slots each
    prefill = [PrefillChunk(s, n, n, None) for s, n in zip(starts, lens)]
    tables = torch.stack([torch.arange(16) + 16 * i for i in range(3)]).int().to(dev)
    step_ids = torch.tensor([5, 6, 7], device=dev)
    worst = 0.0
    with torch.inference_mode():
        got = {}
        for name, flag in (("kernels", None), ("torch ops", False)):
            attention.USE_TRITON = flag
            a = eng.model.compute_logits(eng.model(ids, positions, AttentionContext(eng.kv_caches, slots, prefills=prefill)))
            ctx = AttentionContext(eng.kv_caches, torch.tensor([n + 256 * i for i, n in enumerate(lens)], device=dev), 3,
                                   tables, torch.tensor([n + 1 for n in lens], dtype=torch.int32, device=dev))
            b = eng.model.compute_logits(eng.model(step_ids, torch.tensor(lens, device=dev), ctx))
            got[name] = (a.log_softmax(-1), b.log_softmax(-1))
        for x, y in zip(got["kernels"], got["torch ops"]):
            worst = max(worst, (x - y).abs().max().item())
    attention.USE_TRITON = None
    return worst


@section(420)
def fused() -> dict:
    """G1: the demo model's logits both ways (float32: must agree), then a random 1B bf16 model
    with the layer kernels and with the torch ops: kernels per forward, replay and step times."""
    import importlib

    from splitnode import LLM
    from splitnode.model.attention import AttentionContext

    attention = importlib.import_module("splitnode.model.attention")
    parity = _demo_parity(attention)
    print(f"demo fp32 on cuda:0, a prefill batch of 3 prompts and their decode step: kernels vs torch ops "
          f"max |dlogprob| {parity:.2e} (tol 1e-3)")
    path, out, ok = random_llama(), {"demo_max_dlogprob": parity}, parity < 1e-3
    for bs in (1, 16, 64):
        row = {}
        for name, flag in (("kernels", None), ("torch ops", False)):
            attention.USE_TRITON = flag  # read at capture: each engine's graphs hold its path
            llm = LLM(str(path), device="cuda", dtype="bfloat16", max_num_seqs=bs, num_kv_blocks=bs * 48)
            eng, r = llm.engine, llm.engine.runner
            _decode_inputs(eng, bs, 512)
            ctx = AttentionContext(r.kv_caches, r.g_slots[:bs], bs, r.g_tables[:bs].clone(), r.g_lens[:bs].clone())
            ids, pos = r.g_ids[:bs].clone(), r.g_pos[:bs].clone()
            with torch.inference_mode():  # eager, same inputs, both paths: the logits to compare
                logits = {}
                for other, f in (("kernels", None), ("torch ops", False)):
                    attention.USE_TRITON = f
                    logits[other] = eng.model.compute_logits(eng.model(ids, pos, ctx)).log_softmax(-1)
                attention.USE_TRITON = flag
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    eng.model.compute_logits(eng.model(ids, pos, ctx))
                    torch.cuda.synchronize()
            kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            graph = r.graphs[min(b for b in r.graphs if b >= bs)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(5):
                graph.replay()
            start.record()
            for _ in range(100):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            replay_ms = start.elapsed_time(end) / 100
            t = time.perf_counter()
            for _ in range(32):
                eng.step()
            torch.cuda.synchronize()
            step_ms = (time.perf_counter() - t) / 32 * 1e3
            dlp = (logits["kernels"] - logits["torch ops"]).abs().max().item()
            agree_top = (logits["kernels"].argmax(-1) == logits["torch ops"].argmax(-1)).float().mean().item()
            row[name] = {"kernels_per_forward": kernels, "replay_ms": replay_ms, "step_ms": step_ms,
                         "max_dlogprob": dlp, "argmax_agree": agree_top}
            print(f"decode 1B bf16 B={bs:<3} {name:<9}: {kernels:5d} CUDA kernels per forward, graph replay "
                  f"{replay_ms:.3f} ms, engine step {step_ms:.3f} ms")
            del llm, eng, r, graph
            torch.cuda.empty_cache()
        k, t = row["kernels"], row["torch ops"]
        print(f"  B={bs}: kernels path vs torch ops: {k['kernels_per_forward']} vs {t['kernels_per_forward']} kernels, "
              f"replay {t['replay_ms'] / k['replay_ms']:.2f}x faster; eager logits max |dlogprob| {k['max_dlogprob']:.2e}, "
              f"argmax agree {k['argmax_agree']:.3f}")
        ok &= k["kernels_per_forward"] < t["kernels_per_forward"] / 2  # bf16 agreement is printed, not judged
        out[bs] = row
    attention.USE_TRITON = None
    return {"ok": ok, "per_batch": out}


@section(240, "timing")
def prefill() -> dict:
    """K3: the prefill attention in one paged launch against the SDPA loop, then a whole forward."""
    import importlib

    import triton.testing

    from splitnode import LLM
    from splitnode.model.attention import AttentionContext, PrefillChunk

    attention = importlib.import_module("splitnode.model.attention")
    dev, heads, kv_heads, d, bs = "cuda:0", 32, 8, 128, 16
    cases, out = [("16 x 128", [(128, 128)] * 16), ("4 x 512", [(512, 512)] * 4), ("1 x 2048", [(2048, 2048)]),
                  ("8 chunks of 256 after 1792", [(256, 2048)] * 8)], []
    for name, chunks in cases:
        total_ctx, total_q = sum(c for _, c in chunks), sum(q for q, _ in chunks)
        nb = -(-total_ctx // bs) + 8
        kc = torch.randn(nb, bs, kv_heads, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        perm = torch.randperm(nb * bs, device=dev)
        prefills, slots, row, start = [], [], 0, 0
        for q_len, ctx_len in chunks:
            ctx_slots = perm[start:start + ctx_len]
            prefills.append(PrefillChunk(row, q_len, ctx_len, None if q_len == ctx_len else ctx_slots))
            slots.append(ctx_slots[ctx_len - q_len:])
            row, start = row + q_len, start + ctx_len
        q = torch.randn(total_q, heads, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(total_q, kv_heads, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slot_mapping = torch.cat(slots)

        def call(flag, q=q, k=k, v=v, kc=kc, vc=vc, slot_mapping=slot_mapping, prefills=prefills):
            attention.USE_TRITON = flag
            return attention.attention(q, k, v, AttentionContext([(kc, vc)], slot_mapping, prefills=prefills), 0, d**-0.5)

        err = (call(None).float() - call(False).float()).abs().max().item()
        ms = {n: triton.testing.do_bench(lambda f=f, call=call: call(f), warmup=10, rep=100, return_mode="median")
              for n, f in (("one launch", None), ("loop", False))}
        out.append({"case": name, **ms, "max_abs_diff": err})
        print(f"prefill attention {name:<28}: one launch {ms['one launch'] * 1e3:8.1f} us, SDPA loop "
              f"{ms['loop'] * 1e3:8.1f} us ({ms['loop'] / ms['one launch']:.2f}x), max |diff| {err:.1e}")
    llm = LLM(str(random_llama()), device="cuda", dtype="bfloat16", num_kv_blocks=2048, enforce_eager=True)
    eng = llm.engine
    forward = {}
    for name, lens in (("16 x 128", [128] * 16), ("1 x 2048", [2048])):
        ids = torch.randint(3, 250, (sum(lens),), device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        chunks, r = [], 0
        for n in lens:
            chunks.append(PrefillChunk(r, n, n, None))
            r += n
        for label, flag in (("kernels", None), ("torch ops", False)):
            attention.USE_TRITON = flag
            with torch.inference_mode():
                fn = lambda: eng.model(ids, positions, AttentionContext(eng.kv_caches, torch.arange(sum(lens), device=dev),
                                                                       prefills=chunks))
                forward[(name, label)] = triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
        print(f"prefill forward 1B bf16 {name}: kernels {forward[(name, 'kernels')]:.2f} ms, torch ops + SDPA loop "
              f"{forward[(name, 'torch ops')]:.2f} ms")
    attention.USE_TRITON = None
    return {"ok": all(c["max_abs_diff"] < 0.05 for c in out), "attention": out,
            "forward_ms": {f"{a} {b}": v for (a, b), v in forward.items()}}


# -- driver ----------------------------------------------------------------------------------------


def run_child(name: str) -> None:
    fn = SECTIONS[name][0]
    try:
        result = fn()
    except Exception as e:  # the parent records it; the traceback is in the output above
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    print("RESULT " + json.dumps(result, default=str), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check (examples/gpu_check_multi.py needs a GPU, two or more for the cross-device parts)")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args()
    if args.section:
        run_child(args.section)
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)"
          + ("" if torch.cuda.device_count() >= 2 else ": cross-device sections run on cuda:0 twice"), flush=True)
    results = {}
    for name in args.only.split(","):
        _, timeout_s, kind = SECTIONS[name]
        print(f"\n== {name} ({kind}, timeout {timeout_s} s)", flush=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--section", name], capture_output=True, text=True,
                                  timeout=timeout_s)
            text, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = "timeout"
        lines = text.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
        found = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        result = found[-1] if found else {"ok": False, "error": f"no result (exit {rc})"}
        results[name] = {"kind": kind, "seconds": round(time.perf_counter() - t0, 1), **result}
    print("\n| section | kind | result | seconds |\n|---|---|---|---|")
    for name, r in results.items():
        if r.get("error"):
            verdict = f"ERROR ({r['error']})"
        elif r["kind"] == "correctness":
            verdict = "ok" if r["ok"] else "FAIL"
        else:
            verdict = "goal met" if r["ok"] else "goal missed"
        print(f"| {name} | {r['kind']} | {verdict} | {r['seconds']} |")
    print(json.dumps(results, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    # a timing section that missed its goal does not fail the run; one that could not run does
    return 0 if all(r["ok"] or (r["kind"] == "timing" and not r.get("error")) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
