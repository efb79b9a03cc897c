"""The model's linears on the CPU through oneDNN with prepacked weights, as vLLM's CPU build runs them.

torch's `F.linear` on the CPU goes to MKL's sgemm (float32) or oneDNN with the weight reordered on
every call (bfloat16). Reordering each weight once into oneDNN's blocked layout for a batch of 32
rows makes the decode step's GEMMs 1.5x (float32) and 1.2x (bfloat16) faster, and a 2048-token
prefill's 1.25x and 1.1x, on the development machine (BENCHMARKS.md, "CPU engine"). The packed op
keeps each dtype's arithmetic (float32 stays float32: no bf16 or TF32 inside), only the order of
the sums changes. The packed weight replaces the plain one, so memory stays the same (but for a
tied head, which gets a packed copy of the embedding); a packed model is for running, not for
reading its weights back. Where bf16 GEMMs are slower than float32 ones (an Intel Xeon without
AMX), a bf16 model's linears are not packed but multiply prefills in float32 (`UpcastLinear`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from splitnode.kernels.cpu import best_times

log = logging.getLogger("splitnode")

PACK_BATCH = 32  # the batch oneDNN picks the layout for; prefill-sized batches run as fast with it
# UpcastLinear's float32 from here: on an Intel Xeon without AMX, 1.25x (128 rows) to 1.6x (2048)
# faster than a bf16 GEMM, 0.93x at 64 rows (BENCHMARKS.md, "CPU engine")
UPCAST_ROWS = 128
UPCAST_CHUNK = 1 << 24  # weight entries converted at once (64 MB in float32): a big head's in slices


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight is in oneDNN's layout: `weight` can only be multiplied, not read."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bfloat16 in hardware: AVX-512 BF16 (Intel Cooper Lake on, AMD Zen 4 on) or
    AMX. oneDNN also runs bf16 on plain AVX-512, emulated: slower than float32 there."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


@functools.cache
def bf16_is_faster() -> bool:
    """Whether this CPU runs a decode step's GEMM faster in bfloat16 than in float32, measured once
    per process (about 50 ms, the packing included): a [32, 1024] x [1024, 2048] product both ways,
    the engine's packed linear where oneDNN has one, best of 5 alternating rounds, bfloat16 only
    when 1.15x faster. AVX-512 BF16 is no guarantee: AMD Zen 4 runs `vdpbf16ps` at twice its float32
    FMA rate, but an Intel Xeon without AMX at the same rate, and there oneDNN's bf16 GEMMs are
    0.6-0.9x float32 (BENCHMARKS.md, "CPU engine")."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(2048, 1024, generator=g), torch.randn(32, 1024, generator=g)
    calls = {}
    for dtype in (torch.float32, torch.bfloat16):
        wd, xd = w.to(dtype), x.to(dtype)
        f = PackedLinear(wd, None) if can_pack(dtype) else (lambda v, wd=wd: v @ wd.t())
        calls[dtype] = lambda f=f, xd=xd: f(xd)
    with torch.no_grad():
        best = best_times(calls, 5)
    ratio = best[torch.float32] / best[torch.bfloat16]
    log.info("CPU GEMM: bfloat16 %.2fx float32 here (dtype auto takes bfloat16 over 1.15x)", ratio)
    return ratio > 1.15


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN is built in, has the packing ops (internal to torch, used by inductor), and runs the
    dtype natively."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16())


class UpcastLinear(nn.Module):
    """A bfloat16 `nn.Linear` for a CPU whose bf16 GEMMs are slower than its float32 ones (an Intel
    Xeon without AMX: 0.6x; `bf16_is_faster`): batches of UPCAST_ROWS rows or more (prefills)
    multiply in float32, the weight converted for the call, the output rounded back to bfloat16;
    smaller ones (decodes) stay bf16 GEMMs, which read half the weight bytes. The products are the
    same either way (a bf16 product is exact in float32, and both sum in float32): only the order
    of the sums differs. The weight is the loaded one, not a copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] < UPCAST_ROWS:
            return F.linear(x, self.weight, self.bias)
        x32, out = x.float(), x.new_empty(x.shape[0], self.out_features)
        step = max(1, UPCAST_CHUNK // self.in_features)  # the float32 weight a slice at a time
        for i in range(0, self.out_features, step):
            bias = None if self.bias is None else self.bias[i:i + step].float()
            out[:, i:i + step] = F.linear(x32, self.weight[i:i + step].float(), bias)
        return out


def _agrees(packed: PackedLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """One product both ways, on rows of a batch size oneDNN did not pack for: the internal ops'
    contract could change between torch versions, and a wrong answer must never be fast."""
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    want = torch.nn.functional.linear(x, weight, bias).float()
    got = packed(x).float()
    tol = 1e-3 if weight.dtype == torch.float32 else 5e-2
    return got.shape == want.shape and bool(((got - want).abs() <= tol * (1 + want.abs())).all())


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Swaps every `nn.Linear` of a CPU model for a `PackedLinear` in place, or in bfloat16 on a CPU
    whose bf16 GEMMs are slower than float32's for an `UpcastLinear`; returns how many. None when
    oneDNN cannot run the model's dtype, or the first packed product disagrees with torch's."""
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"]
    if not linears:
        return 0
    if linears[0][2].weight.dtype == torch.bfloat16 and not bf16_is_faster():
        for parent, name, lin in linears:
            setattr(parent, name, UpcastLinear(lin.weight, lin.bias))
        return len(linears)  # a tied head stays the embedding's bf16 product: a step's few rows
    if not can_pack(linears[0][2].weight.dtype):
        return 0
    for i, (parent, name, lin) in enumerate(linears):
        packed = PackedLinear(lin.weight, lin.bias)
        if i == 0 and not _agrees(packed, lin.weight, lin.bias):
            log.warning("oneDNN's packed linear disagrees with torch's here: the CPU linears stay unpacked")
            return 0
        setattr(parent, name, packed)
    if getattr(model, "lm_head", False) is None:  # tied: the head gets a packed copy, the embedding stays
        model.lm_head = PackedLinear(model.model.embed_tokens.weight, None)
    return len(linears)
