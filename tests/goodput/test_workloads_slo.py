"""The serving benchmark's machinery on hand-made inputs: workload shapes, the trace reader, the
SLO and goodput arithmetic, the rate search and the layouts."""

import math
import statistics

import pytest

from splitnode.goodput import slo as S
from splitnode.goodput import workloads as W
from splitnode.goodput.command import energy_per_token
from splitnode.goodput.load import layout_roles


@pytest.mark.parametrize("name,prompt,output", [("coding", 1500, 13), ("conversation", 1020, 129)])
def test_synthetic_medians_match_the_azure_traces(name, prompt, output):
    specs = W.synthetic(name, 20000, scale=1.0, seed=1)
    assert statistics.median(s.prompt_len for s in specs) == pytest.approx(prompt, rel=0.05)
    assert statistics.median(s.output_len for s in specs) == pytest.approx(output, rel=0.05)
    assert W.synthetic(name, 50, seed=3) == W.synthetic(name, 50, seed=3)  # seeded


def test_scale_shrinks_lengths_and_max_len_is_respected():
    small = W.synthetic("conversation", 4000, scale=0.05, seed=2)
    assert statistics.median(s.prompt_len for s in small) == pytest.approx(51, rel=0.08)
    assert min(s.output_len for s in small) >= 1
    fitted = W.synthetic("coding", 2000, seed=2, max_len=512)
    assert max(s.prompt_len + s.output_len for s in fitted) <= 512
    assert min(s.output_len for s in fitted) >= 1
    with pytest.raises(ValueError, match="unknown workload 'chat'"):
        W.synthetic("chat", 1)


def test_trace_reader_reports_bad_rows_by_line(tmp_path):
    f = tmp_path / "trace.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:50.5000000,100,10\n"
                 "2023-11-16 18:15:46.0000000,374,44\n"
                 "2023-11-16 18:15:47,abc,5\n"
                 ",12,3\n"
                 "2023-11-16 18:15:48,12,0\n"
                 "2023-11-16 18:15:49.25,7,2\n")
    specs, bad = W.read_trace(f)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(374, 44), (7, 2), (100, 10)]  # in time order
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 3.25, 4.5])
    assert [b.split(":")[0] for b in bad] == ["trace.csv line 4", "trace.csv line 5", "trace.csv line 6"]
    assert "'abc' is not an integer" in bad[0] and "TIMESTAMP is empty" in bad[1] and "0 is not >= 1" in bad[2]
    assert W.trace_arrivals(specs, time_scale=2.0) == pytest.approx([0.0, 1.625, 2.25])
    (tmp_path / "seconds.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,3,4\n12,5,6\n")
    assert [s.arrival_s for s in W.read_trace(tmp_path / "seconds.csv")[0]] == [0.0, 1.5]
    (tmp_path / "wrong.csv").write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match="lacks TIMESTAMP, ContextTokens, GeneratedTokens"):
        W.read_trace(tmp_path / "wrong.csv")


def test_poisson_arrivals_have_the_rate():
    ts = W.poisson_arrivals(20000, rate=4.0, seed=5)
    assert ts[0] == 0.0 and all(b > a for a, b in zip(ts, ts[1:]))
    assert (len(ts) - 1) / ts[-1] == pytest.approx(4.0, rel=0.03)
    with pytest.raises(ValueError, match="--rate must be > 0"):
        W.poisson_arrivals(3, 0)


def _result(prompt, out, sent, first, gap, error=None):
    return S.RequestResult(prompt, out, sent, [first + i * gap for i in range(out)], error)


def test_slowdown_slos_on_made_up_timings():
    alone = {(10, 3): S.Alone(ttft=0.1, tbt=0.01, e2e=0.12)}
    # TTFT slowdowns 1..10x (request i: TTFT 0.1 * (i+1)); every gap 2x the idle one
    results = [_result(10, 3, 0.0, 0.1 * (i + 1), 0.02) for i in range(10)]
    sd = S.slowdowns(results, alone)
    assert sd["ttft"] == pytest.approx([float(i + 1) for i in range(10)])
    assert sd["tbt"] == pytest.approx([2.0] * 20)
    assert sd["e2e"][0] == pytest.approx((0.1 + 0.04) / 0.12)
    check = S.slowdown_check(results, alone)
    assert check["percentiles"]["ttft"]["p50"] == pytest.approx(5.5)  # inclusive quantiles of 1..10
    assert not check["met"]
    assert any(f.startswith("tbt p50 2.00x > 1.25x") for f in check["failing"])
    fast = [_result(10, 3, 0.0, 0.1, 0.01) for _ in range(5)]
    assert S.slowdown_check(fast, alone)["met"]
    failed = fast + [S.RequestResult(10, 3, 0.0, [], "Overloaded: try again")]
    assert S.slowdowns(failed, alone)["ttft"][-1] == math.inf


def test_tbt_slowdown_is_charged_only_for_spread_beyond_the_idle_one():
    # idle gaps spread 1x..3x their median; under load every gap is twice its idle counterpart
    spread = tuple(1.0 + 2.0 * i / 99 for i in range(100))
    alone = {(5, 101): S.Alone(ttft=0.1, tbt=0.01, e2e=1.1, gap_ratios=spread)}
    loaded = S.RequestResult(5, 101, 0.0, [0.1])
    for ratio in spread:
        loaded.token_s.append(loaded.token_s[-1] + 0.02 * ratio)
    tbt = S.slowdown_check([loaded], alone)["percentiles"]["tbt"]
    assert tbt == {q: pytest.approx(2.0) for q in ("p50", "p90", "p99")}


def test_absolute_slos_and_attainment():
    slo = S.parse_slo("ttft=150,tpot=15")
    assert slo == {"ttft": 0.15, "tbt": 0.015}
    results = [_result(10, 3, 0.0, 0.1, 0.01), _result(10, 3, 0.0, 0.2, 0.01),   # TTFT too long
               _result(10, 3, 0.0, 0.1, 0.02), _result(10, 1, 0.0, 0.05, 0.0)]   # TPOT too long; one token
    assert [S.is_good(r, slo) for r in results] == [True, False, False, True]
    a = S.absolute_check(results, slo, attainment=0.5)
    assert a["good"] == 2 and a["attainment"] == 0.5 and a["met"]
    summary = S.summarize(results, slo=slo, attainment=0.9)
    assert summary["absolute"]["attainment"] == 0.5 and not summary["met"]
    assert summary["num_ok"] == 4 and summary["wall_s"] == pytest.approx(0.22)
    assert summary["output_tokens_per_s"] == pytest.approx(10 / 0.22)
    for bad in ("ttft", "ttft=-1", "speed=3", "ttft=abc"):
        with pytest.raises(ValueError, match="--slo"):
            S.parse_slo(bad)


@pytest.mark.parametrize("start", [0.1, 1.0, 50.0])
async def test_rate_search_converges_on_a_latency_curve(start):
    # p99 latency of an M/M/1-like queue of capacity 4 requests/s: 1 / (4 - rate), SLO 1 s -> 3 req/s
    async def meets(rate):
        return rate < 4 and 1 / (4 - rate) <= 1.0

    best, history = await S.search_rate(meets, start, max_runs=12, tolerance=0.05)
    assert 3.0 / 1.05 <= best <= 3.0
    assert all(met == (r <= 3.0) for r, met in history)
    assert len(history) <= 12


async def test_rate_search_with_no_rate_meeting_returns_zero():
    async def never(rate):
        return False

    best, history = await S.search_rate(never, 1.0, max_runs=20, floor=0.01)
    assert best == 0.0 and history[-1][0] < 0.02 and not any(m for _, m in history)


def test_layouts():
    devs = ["cpu:0", "cpu:1", "cpu:2"]
    assert layout_roles("colocated", devs) == (dict.fromkeys(devs, "mixed"), False)
    assert layout_roles("split", devs) == ({"cpu:0": "prompt", "cpu:1": "token", "cpu:2": "token"}, False)
    assert layout_roles("policy", devs)[1] is True
    assert layout_roles("2p1t", devs)[0] == {"cpu:0": "prompt", "cpu:1": "prompt", "cpu:2": "token"}
    assert layout_roles("1p1t1m", devs)[0]["cpu:2"] == "mixed"
    with pytest.raises(ValueError, match="names 2 devices; there are 3"):
        layout_roles("1p1t", devs)
    with pytest.raises(ValueError, match="use colocated, split, policy"):
        layout_roles("fast", devs)


def test_energy_per_token_is_measured_or_na():
    def st(*devs):
        return {"devices": [{"role": r, "gpu": {"energy_j": e} if e is not None else {"available": False}}
                            for r, e in devs]}

    results = [_result(1, 4, 0, 0.1, 0.1), _result(1, 6, 0, 0.1, 0.1)]  # 10 tokens
    e = energy_per_token(st(("prompt", 100.0), ("token", 500.0)), st(("prompt", 130.0), ("token", 520.0)), results)
    assert e == {"prompt": pytest.approx(3.0), "token": pytest.approx(2.0), "all": pytest.approx(5.0)}
    cpu = energy_per_token(st(("mixed", None)), st(("mixed", None)), results)
    assert cpu == {"mixed": "n/a", "all": "n/a"}
