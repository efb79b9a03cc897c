"""The batched sampler against a reference: the distribution it draws from (chi-square over many
seeded draws), its top-k / top-p / min-p masks (exact), the same draw from every window size a
device may use, and seeded draws that depend on nothing but the request (not the batch, not the
number of threads)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splitnode import SamplingParams
from splitnode.engine import sampling
from splitnode.engine.sampling import filtered_probs, sample, uniforms

ARCH = "LlamaForCausalLM"


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row the way the sampler used to draw it, one row at a time: temperature, top-k on the
    logits (ties kept), softmax, min_p against the most likely, top-p on the sorted probabilities."""
    row = row / p.temperature
    if p.top_k > 0:
        kth = row.topk(min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        drop = (sp.cumsum(0) - sp) > p.top_p
        probs = probs.index_fill(0, si[drop], 0.0)
    return probs


def chi2_bound(df: int) -> float:
    """The chi-square distribution's 0.999 quantile (Wilson-Hilferty): a fixed threshold."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def peaked_logits(n: int, vocab: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * spread


def draws(row: torch.Tensor, p: SamplingParams, num: int, seed: int = 11) -> torch.Tensor:
    """`num` draws of one request at positions 0..num-1, in batches of 1000 rows."""
    out = []
    for start in range(0, num, 1000):
        n = min(1000, num - start)
        out.append(sample(row.expand(n, -1).contiguous(), [p] * n, [seed] * n, list(range(start, start + n)),
                          [[]] * n))
    return torch.cat(out)


@pytest.mark.parametrize("vocab, params", [
    (4096, SamplingParams(temperature=0.8)),  # the whole vocabulary, in blocks of 256
    (4096, SamplingParams(temperature=1.0, min_p=0.02)),
    (4099, SamplingParams(temperature=1.0)),  # a vocabulary of no block size: one level
    (4096, SamplingParams(temperature=1.0, top_p=0.9)),  # past the first window: the second one
    (4096, SamplingParams(temperature=1.3, top_k=20)),
    (4096, SamplingParams(temperature=1.0, top_k=50, top_p=0.8, min_p=0.01)),
    (4099, SamplingParams(temperature=0.7, top_p=0.95)),
])
def test_seeded_draws_follow_the_reference_distribution(vocab, params):
    row = peaked_logits(1, vocab, seed=vocab)[0]
    want = reference_probs(row, params).double()
    want /= want.sum()
    num = 6000
    got = torch.bincount(draws(row, params, num), minlength=vocab).double()
    assert got.sum() == num
    assert got[want == 0].sum() == 0  # nothing outside what the filters keep
    expected = want * num
    big = expected >= 5
    obs = torch.cat([got[big], got[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = (obs, exp) if exp[-1] >= 5 else (obs[:-1], exp[:-1])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    assert df >= 3, df
    assert stat < chi2_bound(df), (stat, df, chi2_bound(df))


MASK_CASES = [SamplingParams(top_p=0.5), SamplingParams(top_p=0.97, temperature=0.6), SamplingParams(top_k=7),
              SamplingParams(top_k=3000, temperature=2.0), SamplingParams(min_p=0.1), SamplingParams(min_p=0.3, top_p=0.9),
              SamplingParams(top_k=40, top_p=0.7), SamplingParams(top_k=100, min_p=0.05, temperature=1.5),
              SamplingParams(top_p=0.999, temperature=3.0), SamplingParams(temperature=0.5)]


@pytest.mark.parametrize("spread", [1.0, 4.0])  # flat rows (whole-row sorts) and peaked ones (windows)
def test_top_k_top_p_min_p_masks_match_the_reference_exactly(spread):
    logits = peaked_logits(len(MASK_CASES) * 2, 3000, seed=5, spread=spread)
    params = MASK_CASES * 2
    got = filtered_probs(logits, params)
    for i, p in enumerate(params):
        want = reference_probs(logits[i], p)
        assert torch.equal(got[i] > 0, want > 0), (i, p, int((got[i] > 0).sum()), int((want > 0).sum()))
        if p.top_k == 0:  # the same softmax: the kept probabilities are the reference's own
            assert torch.equal(got[i], want)
        else:  # the reference renormalised over the top k before min_p and top-p
            torch.testing.assert_close(got[i] / got[i].sum(), want / want.sum(), rtol=1e-5, atol=1e-8)


def test_ties_at_the_kth_logit_are_all_kept():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    kept = filtered_probs(logits, [SamplingParams(top_k=2)])[0] > 0
    assert kept.tolist() == [True, False, True, True, True, False]


def test_the_full_sort_and_the_cpu_windows_draw_the_same_ids(monkeypatch):
    """A GPU sorts each whole row, the CPU looks in windows first: a window is a prefix of the
    sorted row, so every draw is the same. (The torch path's windows: the CPU kernels, which find
    the kept ids without sorting, are off.)"""
    from splitnode.kernels import cpu

    monkeypatch.setattr(cpu, "ENABLED", False)
    logits = torch.cat([peaked_logits(48, 8192, seed=1, spread=4.0), peaked_logits(16, 8192, seed=2, spread=0.5)])
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=30, temperature=1.4), SamplingParams(top_p=0.6, min_p=0.02),
              SamplingParams(top_k=2000, top_p=0.95)] * 16
    seeds, positions = list(range(64)), [17 * i for i in range(64)]
    widths = [ids.shape[1] for _, ids, _ in sampling._filtered(*sampling._probs(logits, params), params)]
    assert widths == [64, 1024, 8192]  # peaked rows in the windows, flat ones sorted whole
    windows = sample(logits, params, seeds, positions, [[]] * 64)
    monkeypatch.setattr(sampling, "CPU_WINDOWS", ())
    assert torch.equal(sample(logits, params, seeds, positions, [[]] * 64), windows)
    assert len(set(windows.tolist())) > 32


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch_on_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vocab = 32000
        logits = peaked_logits(8, vocab, seed=3)
        target = SamplingParams(temperature=1.0, seed=5)
        others = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.8), SamplingParams(top_k=5, temperature=1.5),
                  SamplingParams(min_p=0.05), SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=0.5),
                  SamplingParams(top_p=0.9, seed=5)]
        for spot, p in enumerate((target, SamplingParams(top_p=0.9, seed=9), SamplingParams(top_k=40, min_p=0.01))):
            params = others[:spot] + [p] + others[spot:]
            for pos in range(0, 400, 40):
                alone = sample(logits[spot:spot + 1], [p], [5], [pos + spot], [[1, 2, 3]])
                batch = sample(logits, params, [5] * 8, [pos + i for i in range(8)], [[1, 2, 3]] * 8)
                assert batch[spot] == alone[0], (spot, pos)
    finally:
        torch.set_num_threads(threads)


def test_uniforms_are_a_fixed_hash_of_seed_and_position():
    u = uniforms([0, 0, 7, -1, 2**63 - 1], [0, 1, 100, 5, 2**40])
    assert u.tolist() == [0.8833108082136426, 0.43152799704850997, 0.1913075714958974, 0.05588332997080059,
                          0.614665179395258]
    many = uniforms([3] * 20000, list(range(20000)))
    assert 0.0 <= many.min() and many.max() < 1.0 and len(set(many.tolist())) == 20000
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.1).mean() - 0.1) < 0.01


def test_repetition_penalty_is_the_per_row_reference_exactly():
    logits = peaked_logits(4, 500, seed=8)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=0.0), SamplingParams(repetition_penalty=0.6),
              SamplingParams(temperature=0.0, repetition_penalty=1e4)]
    histories = [[1, 5, 5, 9, 499], [1, 2], [0, 3, 3, 3], [7, 8, 8]]
    want = logits.clone()
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            idx = torch.tensor(sorted(set(histories[i])))
            row = want[i, idx]
            want[i, idx] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
    before = logits.clone()
    assert torch.equal(sampling._penalise(logits, params, histories), want)
    assert torch.equal(logits, before)  # the caller's logits (which give the logprobs) are left as they are


def test_a_row_with_nan_or_inf_gives_minus_one_and_the_others_draw():
    logits = peaked_logits(4, 256, seed=4)
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    params = [SamplingParams(seed=1), SamplingParams(seed=1), SamplingParams(top_p=0.9), SamplingParams(temperature=0.0)]
    out = sample(logits, params, [1] * 4, [3] * 4, [[]] * 4)
    assert out[1] == -1 and out[2] == -1
    assert out[0] == sample(logits[:1], params[:1], [1], [3], [[]])[0] and out[3] == logits[3].argmax()


def test_a_seeded_request_gives_the_same_tokens_alone_and_among_seven_others(make_llm):
    llm = make_llm(ARCH)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, 256, (5 + 9 * i,), generator=g).tolist() for i in range(8)]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([ps[3]], seeded)[0].token_ids
    others = [SamplingParams(temperature=0.0, max_tokens=10), SamplingParams(top_p=0.7, max_tokens=30, ignore_eos=True),
              SamplingParams(top_k=5, temperature=1.5, seed=9, max_tokens=5), SamplingParams(min_p=0.2, max_tokens=40),
              SamplingParams(repetition_penalty=1.5, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.3, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)]
    outs = llm.generate(ps, others[:3] + [seeded] + others[3:])
    assert outs[3].token_ids == alone
    assert len(set(alone)) > 6  # drawn, not stuck
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_the_cpu_kernel_and_the_torch_path_draw_the_same_plain_ids(monkeypatch):
    """kernels/cpu.c's one-read draw (rows without top-k or top-p) against sampling's torch ops: the
    same inverse CDF in vocabulary order, so the same uniform gives the same id (but where the two
    float sums round across a boundary: none in these 3 x 300 draws)."""
    from splitnode.kernels import cpu

    if cpu.lib() is None:
        pytest.skip("the CPU kernels could not be built here")
    logits = torch.cat([peaked_logits(150, 4099, seed=3, spread=4.0), peaked_logits(150, 4099, seed=4, spread=0.3)])
    u = sampling.uniforms(list(range(300)), [9] * 300)
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.6), SamplingParams(temperature=1.7, min_p=0.05)):
        fast = sampling._draw_plain(logits, [p] * 300, u)
        monkeypatch.setattr(cpu, "ENABLED", False)
        plain = sampling._draw_plain(logits, [p] * 300, u)
        monkeypatch.setattr(cpu, "ENABLED", True)
        assert torch.equal(fast, plain), (p, int((fast != plain).sum()))
        assert len(set(fast.tolist())) > 100


@pytest.mark.parametrize("spread", [0.5, 4.0, 8.0])
def test_the_cpu_kernel_keeps_what_the_reference_keeps(spread):
    """kernels/cpu.c's filtered draw (no sort: a threshold from candidates) against the reference's
    kept ids: 4000 draws of each MASK_CASES row land only on kept ids, and every kept id of
    probability 0.5% or more is drawn (missing one by chance: under 1e-8)."""
    from splitnode.kernels import cpu

    if cpu.lib() is None:
        pytest.skip("the CPU kernels could not be built here")
    logits = peaked_logits(len(MASK_CASES), 3000, seed=8, spread=spread)
    for i, p in enumerate(MASK_CASES):
        if not (p.top_k or p.top_p < 1.0):
            continue  # the plain draw: its own test above
        want = reference_probs(logits[i], p).double()
        want /= want.sum()
        n = 4000
        got = cpu.sample_filtered(logits[i].expand(n, -1).contiguous(), [p] * n, np.random.default_rng(i).random(n))
        drawn = torch.bincount(got, minlength=3000)
        assert drawn[want == 0].sum() == 0, (p, spread)
        assert bool((drawn[want >= 0.005] > 0).all()), (p, spread)


def test_the_one_read_top_p_path_draws_what_the_general_path_draws():
    """kernels/cpu.c takes rows with top-p alone in one read (candidates over a floor that rises as
    the row is read); a min_p too small to drop anything sends the same rows down the general path
    (the row's maximum first, then its mass, then the candidates). Same kept set, same draw for a
    given u, at a Llama-3 vocabulary; a NaN or +inf in the first block, a late one or the last
    partial one gives -1 on either path, and a row of -inf too."""
    from splitnode.kernels import cpu

    if cpu.lib() is None:
        pytest.skip("the CPU kernels could not be built here")
    vocab, n = 128256, 24
    logits = peaked_logits(n, vocab, seed=3) * torch.linspace(0.5, 3.0, n)[:, None]  # nuclei of thousands to a few
    logits[3, 5:300] += 40.0  # a block far over the ones read before it: the two-pass form
    bad = {18: (7, float("nan")), 19: (90_000, float("nan")), 20: (vocab - 3, float("inf")), 21: (60_000, float("inf"))}
    for row, (col, value) in bad.items():
        logits[row, col] = value
    logits[22] = float("-inf")
    k = 6  # draws per row
    rows, u = logits.repeat_interleave(k, 0), np.random.default_rng(0).random(n * k)
    alone = cpu.sample_filtered(rows, [SamplingParams(top_p=0.9, temperature=0.8)] * (n * k), u).view(n, k)
    general = cpu.sample_filtered(rows, [SamplingParams(top_p=0.9, temperature=0.8, min_p=1e-30)] * (n * k), u).view(n, k)
    assert torch.equal(alone, general), (alone, general)
    assert bool((alone[[*bad, 22]] == -1).all()) and bool((alone[:18] >= 0).all())
    assert len(set(alone[:3].flatten().tolist())) == 3 * k  # wide nuclei: every draw its own id
