"""GPU check of the engine and the runtime (run on a CUDA machine; prints figures, exits 1 on a
mismatch). Needs an install of splitnode (`pip install --no-deps --no-build-isolation -e .`).

1. The demo model on CUDA (CUDA graphs, and eager) gives the CPU engine's greedy tokens.
2. Decode of a ~1B-parameter random Llama in bf16 against the memory roofline: bytes each decode
   step must read (weights + KV) over the measured read bandwidth (a sum over 2 GiB). The copy
   rate counts bytes read plus bytes written; half of it, the figure used before, made the
   roofline twice too slow and the efficiency twice too high.
3. KVMover between two engines on the device: blocks arrive intact; rate against the copy rate.
4. The runtime on the device gives the same tokens: one mixed worker; two workers on the GPU
   (prompt and token, KV moved between their pools on the card); split across GPU and CPU workers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def copy_rate() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def read_rate() -> float:
    """Bytes read per second by a reduction over 2 GiB: the rate a decode step's weight and KV
    reads can reach."""
    x = torch.ones(1 << 30, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        x.sum()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x.sum()
    torch.cuda.synchronize()
    return x.numel() * x.element_size() * 10 / (time.perf_counter() - t)


def write_random_llama(path: Path, device: str = "cuda", **cfg) -> None:
    from safetensors.torch import save_file

    from splitnode.model.config import ModelConfig
    from splitnode.model.demo import write_byte_tokenizer
    from splitnode.model.loader import expected_tensors

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    mc = ModelConfig.from_hf(path)
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, target in expected_tensors(mc).items():
        shape = target.shape if hasattr(target, "shape") else target[0]
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        if "norm" in name:
            t = t + 1.0
        tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(path / "model.safetensors"))
    write_byte_tokenizer(path, cfg["max_position_embeddings"])


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA")
        return 0
    from splitnode import LLM, SamplingParams
    from splitnode.engine.config import EngineConfig
    from splitnode.engine.engine import Engine
    from splitnode.runtime import Runtime, RuntimeConfig

    ok = True
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    rate, read = copy_rate(), read_rate()
    print(f"device copy rate: {rate / 1e9:.0f} GB/s (read + written); read bandwidth {read / 1e9:.0f} GB/s")

    # 1. demo model: CPU vs CUDA graphs vs CUDA eager
    greedy = SamplingParams(max_tokens=32, temperature=0.0, logprobs=1, ignore_eos=True)
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(20 + 13 * i)] for i in range(16)]
    ref = LLM(device="cpu", num_kv_blocks=512).generate(prompts, greedy)
    for eager in (False, True):
        llm = LLM(device="cuda", num_kv_blocks=512, enforce_eager=eager)
        outs = llm.generate(prompts, greedy)
        same = sum(o.token_ids == r.token_ids for o, r in zip(outs, ref))
        dlp = max(abs(o.logprobs[i][o.token_ids[i]].logprob - r.logprobs[i][r.token_ids[i]].logprob)
                  for o, r in zip(outs, ref) for i in range(min(len(o.token_ids), len(r.token_ids)))
                  if o.token_ids[: i + 1] == r.token_ids[: i + 1])
        print(f"demo fp32 cuda {'eager' if eager else 'graphs'}: {same}/{len(prompts)} identical greedy sequences "
              f"vs CPU, max |dlogprob| {dlp:.2e}, graphs captured {len(llm.engine.runner.graphs)}")
        ok &= same >= len(prompts) - 1 and dlp < 1e-3
        del llm

    # 2. decode against the roofline
    path = Path(tempfile.mkdtemp()) / "llama-1b"
    write_random_llama(path, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                       hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
                       bos_token_id=256, eos_token_id=257)
    for bs in (1, 16, 64):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", max_num_seqs=bs, num_kv_blocks=bs * 40)
        eng = llm.engine
        weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        ctx, steps = 512, 64
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
        from splitnode.engine.sequence import Sequence
        seqs = [Sequence(i, [(i * 31 + j) % 250 + 3 for j in range(ctx)], params) for i in range(bs)]
        for s in seqs:
            eng.add(s)
        while any(s.num_computed < ctx for s in seqs):
            eng.step()
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        mc = eng.model_config
        kv_bytes = bs * (ctx + 8 + steps // 2) * 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 2
        roof = (weight_bytes + kv_bytes) / read
        print(f"decode 1B bf16 batch {bs:3d} ctx ~{ctx}: {dt * 1e3:.2f} ms/step, roofline {roof * 1e3:.2f} ms "
              f"({roof / dt:.2f} of the memory roofline), {bs / dt:.0f} tok/s")
        del llm, eng

    # 3. KV mover between two engines on the device
    cfg = EngineConfig(num_kv_blocks=2048)
    a = Engine(cfg, "prompt", "cuda", path, 0.5)
    b = Engine(cfg, "token", "cuda", path, 0.5)
    for k, v in a.kv_caches:
        k.normal_()
        v.normal_()
    from splitnode.runtime.transfer import KVMover
    mover = KVMover()
    n = 256  # 4096 tokens
    src = torch.randperm(2048)[:n].tolist()
    dst = torch.randperm(2048)[:n].tolist()
    layers = range(a.model_config.num_hidden_layers)
    with torch.cuda.stream(a.compute_stream):
        for _ in range(2):  # warm up (compile) both the whole-sequence and the per-layer kernels
            mover.send(a, b, src, dst, layers)
            mover.send(a, b, src, dst, range(0, 1))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for layer in layers:
            sent = mover.send(a, b, src, dst, range(layer, layer + 1))
        sent.written.synchronize()
        dt = time.perf_counter() - t
    intact = all(torch.equal(a.kv_caches[l][0][src], b.kv_caches[l][0][dst]) and
                 torch.equal(a.kv_caches[l][1][src], b.kv_caches[l][1][dst]) for l in layers)
    moved = 2 * n * 16 * 8 * 64 * 2 * len(layers)
    print(f"KV move, {n} blocks x {len(layers)} layers layer by layer ({moved / 2**20:.0f} MiB): intact={intact}, "
          f"{dt * 1e3:.2f} ms, {2 * moved / dt / 1e9:.0f} GB/s read+written = {2 * moved / dt / rate:.2f} of the copy rate")
    ok &= intact
    for k, v in b.kv_caches:  # poison, then the whole-sequence move: one pack, copy, unpack
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    with torch.cuda.stream(a.compute_stream):
        torch.cuda.synchronize()
        t = time.perf_counter()
        mover.send(a, b, src, dst, layers).written.synchronize()
        dt = time.perf_counter() - t
    intact = all(torch.equal(a.kv_caches[l][0][src], b.kv_caches[l][0][dst]) and
                 torch.equal(a.kv_caches[l][1][src], b.kv_caches[l][1][dst]) for l in layers)
    print(f"KV move, {n} blocks x {len(layers)} layers in one piece ({moved / 2**20:.0f} MiB): intact={intact}, "
          f"{dt * 1e3:.2f} ms, {2 * moved / dt / 1e9:.0f} GB/s read+written = {2 * moved / dt / rate:.2f} of the copy rate")
    ok &= intact
    del a, b

    # 4. the runtime on the device: one mixed GPU worker; then split across the GPU and a CPU
    # worker both ways, so the KV crosses between device and host (prompts on both sides of
    # layerwise_min_tokens=64)
    async def run_rt(devices, roles):
        cfg = RuntimeConfig(devices=devices, roles=roles, num_kv_blocks=512, autoscale=False,
                            layerwise_min_tokens=64)
        async with Runtime(cfg) as rt:
            async def one(p):
                async for ev in rt.generate(p, greedy):
                    pass
                return ev
            outs = await asyncio.gather(*[one(p) for p in prompts])
            return outs, rt.status()["transfers"]
    for devices, roles in [("cuda:0", None), ("cuda:0,cuda:0", {"cuda:0": "prompt", "cuda:0/1": "token"}),
                           ("cuda:0,cpu:0", {"cuda:0": "prompt", "cpu:0": "token"}),
                           ("cpu:0,cuda:0", {"cpu:0": "prompt", "cuda:0": "token"})]:
        outs, moved = asyncio.run(run_rt(devices, roles))
        same = sum(o.token_ids == r.token_ids for o, r in zip(outs, ref))
        print(f"runtime {devices} {roles or 'mixed'}: {same}/{len(prompts)} identical greedy sequences vs CPU; "
              f"{moved['num_sequences']} sequences moved, {moved['bytes_moved'] / 2**20:.1f} MiB, "
              f"{moved['num_failed']} failed")
        ok &= same >= len(prompts) - 1 and moved["num_failed"] == 0
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
