"""The CPU decode mirror gives the paged reference's attention, step after step, as the decode
batch stays, changes and outgrows it."""

from __future__ import annotations

import torch

from splitnode.kernels.paged_attention import paged_decode_attention_ref
from splitnode.model.decode_mirror import DecodeMirror

LAYERS, BLOCK, HKV, H, D = 2, 4, 2, 4, 8


def test_mirror_matches_paged_attention_across_steps():
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(60, BLOCK, HKV, D, generator=g), torch.randn(60, BLOCK, HKV, D, generator=g))
              for _ in range(LAYERS)]
    free = list(torch.randperm(60, generator=g).tolist())
    seqs = {i: {"len": n, "blocks": [free.pop() for _ in range(-(-n // BLOCK))]} for i, n in enumerate((3, 9, 5, 6))}
    mirror = DecodeMirror(max_bytes=1 << 20, headroom=4)
    # (batch, sequences copied in from the paged cache at that step): the batch stays, one request
    # leaves (the others keep their rows), one joins at the end (only it is copied in), one comes
    # back in the middle (it and those after it are copied in); growth past the headroom reallocates
    schedule = [([0, 1, 2], 3), ([0, 1, 2], 0), ([0, 2], 0), ([0, 2], 0), ([0, 2, 3], 1), ([0, 2, 3], 0),
                ([0, 1, 2, 3], 3)] + [([0, 1, 2, 3], None)] * 6
    for step, (ids, refills) in enumerate(schedule):
        for i in ids:  # room for this step's token
            s = seqs[i]
            if s["len"] + 1 > len(s["blocks"]) * BLOCK:
                s["blocks"].append(free.pop())
        width = max(len(seqs[i]["blocks"]) for i in ids)
        tables = torch.tensor([seqs[i]["blocks"] + [-1] * (width - len(seqs[i]["blocks"])) for i in ids],
                              dtype=torch.int32)
        before = mirror.num_refills
        assert mirror.prepare(ids, [seqs[i]["len"] for i in ids], tables, caches)
        if refills is not None:
            assert mirror.num_refills - before == refills, f"step {step}"
        q = torch.randn(len(ids), H, D, generator=g)
        for layer, (kc, vc) in enumerate(caches):
            k_new, v_new = torch.randn(2, len(ids), HKV, D, generator=g)
            for row, i in enumerate(ids):  # what store_kv does
                p = seqs[i]["len"]
                kc[seqs[i]["blocks"][p // BLOCK], p % BLOCK] = k_new[row]
                vc[seqs[i]["blocks"][p // BLOCK], p % BLOCK] = v_new[row]
            lens = torch.tensor([seqs[i]["len"] + 1 for i in ids], dtype=torch.int32)
            want = paged_decode_attention_ref(q, kc, vc, tables, lens, D**-0.5)
            got = mirror.attend(layer, q, k_new, v_new, D**-0.5)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"step {step} layer {layer}")
        for i in ids:
            seqs[i]["len"] += 1
    assert mirror.num_rebuilds >= 2  # the first step, and growth past the headroom


def test_mirror_steps_aside_over_its_memory_budget():
    caches = [(torch.randn(8, BLOCK, HKV, D), torch.randn(8, BLOCK, HKV, D))]
    mirror = DecodeMirror(max_bytes=64)
    assert not mirror.prepare([0], [3], torch.tensor([[0]], dtype=torch.int32), caches)
