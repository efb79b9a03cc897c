"""`splitnode plan --validate`: bench files replayed through the simulator. The files are written
here as `bench serve --json` writes them, their "measurements" simulated with a profile of our
choosing, so what the validation must predict can be worked out beside it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import flat_profile

from splitnode.cli import main
from splitnode.goodput import slo as S
from splitnode.goodput import workloads as W
from splitnode.goodput.load import layout_roles
from splitnode.model.demo import DEMO_NAME
from splitnode.plan import planner as P
from splitnode.plan import validate as V
from splitnode.plan.sim import Policy, alone, simulate

DEVICES = ["cpu:0", "cpu:1"]
LAYOUTS = ["colocated", "1p1t", "1t1m"]
NUM, SCALE = 16, 0.05


def demo_profile(**kw):
    """A profile of the demo model, as the bench files here say they ran."""
    return flat_profile(**{"prefill_s": 0.020, "decode_s": 0.004, "per_token_s": 2e-5, "per_seq_s": 1e-4,
                           "model": DEMO_NAME, **kw})


def bench_json(path, truth, slo=None, attainment=0.9, jitter=0.0, max_runs=5, records=True):
    """A bench file as `bench serve --sweep --json` writes it (meta, runs, goodput), each run
    simulated on `truth`; `jitter` delays each request's send by up to that many seconds, as a
    real bench's event loop does."""
    specs = W.synthetic("conversation", NUM, SCALE, 0)
    base = W.poisson_arrivals(NUM, 1.0, 0)
    yard = alone(truth, specs)
    runs, goodput = [], {}

    def one_run(layout, rate):
        roles = layout_roles(layout, DEVICES)[0]
        sent = [t + jitter * ((7 * i) % 5) / 4 for i, t in enumerate(P.arrivals_at(base, rate))]
        sim = simulate([(d, r, truth) for d, r in roles.items()], specs, sent)
        s = S.summarize(sim.results, None if slo else yard, slo, attainment)
        if records:
            s["requests"] = [{"prompt_len": r.prompt_len, "output_len": r.output_len, "sent_s": r.sent_s,
                              "ttft_s": r.ttft, "e2e_s": r.e2e, "tpot_s": r.tpot, "error": r.error} for r in sim.results]
        s.update(layout=layout, rate=rate, roles=roles)
        runs.append(s)
        return s["met"]

    start = len(DEVICES) / (sum(a.e2e for a in yard.values()) / len(yard))
    for layout in LAYOUTS:
        async def meets(rate, layout=layout):
            return one_run(layout, rate)

        good, history = asyncio.run(S.search_rate(meets, start, max_runs))
        goodput[layout] = {"rate": good, "per_device": good / 2, "runs": history}
    meta = {"devices": DEVICES, "target": "demo in this process", "workload": f"conversation x{SCALE:g}",
            "num_requests": NUM, "prompt_median": 0, "output_median": 0, "slo": slo or "slowdown"}
    path.write_text(json.dumps({"meta": meta, "runs": runs, "goodput": goodput}, indent=1))
    return path


@pytest.fixture
def profile_file(tmp_path):
    return demo_profile().save(tmp_path / "demo.json")


def test_a_bench_measured_by_the_simulator_itself_is_predicted_exactly(tmp_path):
    prof = demo_profile()
    bench = V.read_bench(bench_json(tmp_path / "b.json", prof))
    v = V.validate_bench(bench, prof, Policy())
    assert len(v.runs) == len(bench.runs) >= 3 * len(LAYOUTS)
    assert {c.run["layout"] for c in v.runs} == set(LAYOUTS)
    for c in v.runs:
        for key in ("ttft_s", "tbt_s", "e2e_s"):
            assert c.predicted[key] == pytest.approx(c.run[key], rel=1e-9)
        assert c.predicted["met"] == c.run["met"]
    assert [g.name for g in v.goodput] == LAYOUTS
    for g in v.goodput:
        assert g.predicted == pytest.approx(g.measured, rel=1e-9) and g.is_close
        assert g.history == [tuple(x) for x in bench.goodput[g.name]["runs"]]  # the same search, run for run
    assert v.ranking_agrees


def test_each_run_is_predicted_by_simulating_its_own_requests_at_their_send_times(tmp_path):
    """Measured on a slower device with send delays; predicted with another profile: each
    prediction is the simulation of the run's own requests at their recorded send times, judged
    against the same requests simulated alone, and each goodput the planner's search from the
    bench's first rate with as many runs."""
    truth, prof = demo_profile(prefill_s=0.030, decode_s=0.006), demo_profile()
    bench = V.read_bench(bench_json(tmp_path / "b.json", truth, jitter=0.003))
    v = V.validate_bench(bench, prof, Policy())
    specs = W.synthetic("conversation", NUM, SCALE, 0)
    yard = alone(prof, specs)
    roles = {"colocated": ["mixed", "mixed"], "1p1t": ["prompt", "token"], "1t1m": ["token", "mixed"]}
    for c, run in zip(v.runs, bench.runs):
        sent = [r["sent_s"] for r in run["requests"]]
        assert c.specs == specs and c.arrivals == sent
        direct = S.summarize(simulate([(f"cpu:{i}", r, prof) for i, r in enumerate(roles[run["layout"]])], specs,
                                      sent).results, yard)
        assert c.predicted["ttft_s"] == direct["ttft_s"] and c.predicted["tbt_s"] == direct["tbt_s"]
        assert c.predicted["met"] == direct["met"]
    lowest = min(bench.runs, key=lambda r: r["rate"])
    base = [r["sent_s"] - min(x["sent_s"] for x in lowest["requests"]) for r in lowest["requests"]]
    planner = P.Planner(prof, 2, specs, base)
    for g in v.goodput:
        history = bench.goodput[g.name]["runs"]
        want = planner.goodput(P.parse_layout(g.name, 2), history[0][0], v.max_runs, 0.15)
        assert (g.predicted, g.history) == want
        if g.measured:
            assert g.error == pytest.approx(g.predicted / g.measured - 1)


def test_a_real_bench_file_replays_every_run_on_its_recorded_requests(profile_file, capsys):
    """bench_serve_cpu2.json: `splitnode bench serve --devices cpu:2 --workload conversation --scale 0.02
    --num-requests 6 --warmup 1 --sweep --sweep-start 3 --sweep-runs 3 --compare colocated,1p1t
    --num-kv-blocks 256 --json ...` on the demo model, as the bench writes it."""
    path = Path(__file__).with_name("bench_serve_cpu2.json")
    bench = V.read_bench(path)
    assert (bench.workload, bench.scale, bench.model, bench.slo) == ("conversation", 0.02, None, {})
    prof = demo_profile()
    v = V.validate_bench(bench, prof, Policy(num_kv_blocks=256))
    yard = alone(prof, v.runs[0].specs, Policy(num_kv_blocks=256))
    for c in v.runs:
        records = c.run["requests"]
        assert [(s.prompt_len, s.output_len) for s in c.specs] == [(r["prompt_len"], r["output_len"]) for r in records]
        roles = list(c.run["roles"].values())
        direct = S.summarize(simulate([(f"cpu:{i}", r, prof) for i, r in enumerate(roles)], c.specs,
                                      [r["sent_s"] for r in records], Policy(num_kv_blocks=256)).results, yard)
        assert (c.predicted["ttft_s"], c.predicted["tbt_s"], c.predicted["met"]) == \
            (direct["ttft_s"], direct["tbt_s"], direct["met"])
    assert v.max_runs == 3 and [g.history[0][0] for g in v.goodput] == [3.0, 3.0]
    assert main(["plan", "--validate", str(path), "--profile-file", str(profile_file), "--num-kv-blocks", "256"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("colocated (2m) ", "1p1t ")) for line in out) == len(bench.runs) + 2


def test_the_sweeps_run_limit_is_read_from_a_search_it_cut_short(tmp_path):
    prof = demo_profile()
    bench = V.read_bench(bench_json(tmp_path / "b.json", prof, max_runs=3))
    assert any(len(g["runs"]) == 3 for g in bench.goodput.values())
    assert V.validate_bench(bench, prof, Policy()).max_runs == 3


def test_absolute_slos_and_attainment_come_from_the_file(tmp_path):
    prof = demo_profile()
    bench = V.read_bench(bench_json(tmp_path / "b.json", prof, slo={"ttft": 0.08, "tbt": 0.02}, attainment=0.8))
    assert bench.slo == {"ttft": 0.08, "tbt": 0.02} and bench.attainment == 0.8
    v = V.validate_bench(bench, prof, Policy())
    for c in v.runs:
        assert c.predicted["absolute"]["target"] == 0.8 and "slowdown" not in c.predicted
        assert c.predicted["absolute"]["good"] == c.run["absolute"]["good"]


def test_the_ranking_agrees_only_where_the_order_and_its_ties_are_the_same():
    lay = P.Layout(0, 0, 2)

    def ranked(measured, predicted):
        goods = [V.GoodputCheck(n, lay, m, p, []) for n, m, p in zip("abc", measured, predicted)]
        return V.Validation(None, None, [], goods, None)

    assert ranked([2.0, 1.0, 0.0], [3.0, 2.5, 0.0]).ranking_agrees
    assert ranked([1.0, 0.0, 0.0], [1.5, 0.0, 0.0]).ranking == ([["a"], ["b", "c"]], [["a"], ["b", "c"]])
    assert not ranked([2.0, 1.0, 0.0], [1.0, 2.0, 0.0]).ranking_agrees
    assert not ranked([1.0, 0.0, 0.0], [1.0, 0.5, 0.0]).ranking_agrees  # a tie measured, an order predicted
    assert V.GoodputCheck("a", lay, 0.0, 0.0, []).is_close and not V.GoodputCheck("a", lay, 0.0, 0.3, []).is_close


def test_the_command_prints_one_row_per_run_and_the_goodputs_in_text_and_markdown(tmp_path, profile_file, capsys):
    conv = bench_json(tmp_path / "conv.json", demo_profile(prefill_s=0.025))
    num_runs = len(json.loads(conv.read_text())["runs"])
    assert main(["plan", "--validate", str(conv), str(conv), "--profile-file", str(profile_file)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in ("colocated", "1p1t", "1t1m")]
    assert len(rows) == 2 * (num_runs + len(LAYOUTS))  # two files: a row per run, then one per layout's goodput
    assert out.count("conversation x0.05 (conv.json)") == 2 and "Ranking by goodput: measured" in out
    assert main(["plan", "--validate", str(conv), "--profile-file", str(profile_file), "--markdown"]) == 0
    md = capsys.readouterr().out
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table_rows) == (1 + num_runs) + (1 + len(LAYOUTS))  # header and rows of both tables
    assert md.startswith("### conversation x0.05 (conv.json)") and "|---|---:|" in md


def test_a_file_without_request_records_is_drawn_again_from_its_workload_and_said(tmp_path, profile_file, capsys):
    prof = demo_profile()
    path = bench_json(tmp_path / "old.json", prof, records=False)
    bench = V.read_bench(path)
    v = V.validate_bench(bench, prof, Policy())
    specs, base = W.synthetic("conversation", NUM, SCALE, 0), W.poisson_arrivals(NUM, 1.0, 0)
    for c in v.runs:
        assert c.specs == specs and c.arrivals == P.arrivals_at(base, c.run["rate"])
        assert c.predicted["ttft_s"] == pytest.approx(c.run["ttft_s"], rel=1e-9)
    assert any("lack per-request records (prompt_len, output_len, sent_s)" in n for n in bench.notes)
    assert main(["plan", "--validate", str(path), "--profile-file", str(profile_file)]) == 0
    assert "does not record the seed" in capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("not json", "is not a bench JSON"),
    ("a profile", "it needs a 'meta' object and a 'runs' list"),
    ("no runs", "has no runs to validate"),
    ("another model", "profiles hand-made, but"),
    ("another kind", "profiles cuda devices"),
    ("no cached profile", "no profile of demo-v1 on"),
])
def test_bad_files_and_profiles_are_one_line_errors(case, message, tmp_path, profile_file, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bench = tmp_path / "b.json"
    meta = {"devices": DEVICES, "target": "demo in this process", "workload": "coding x0.1", "slo": "slowdown"}
    run = {"layout": "colocated", "rate": 1.0, "ttft_s": None, "tbt_s": None, "met": False}
    bench.write_text(json.dumps({"meta": meta, "runs": [run], "goodput": {}}))
    prof = profile_file
    if case == "missing":
        bench = tmp_path / "nothing.json"
    elif case == "not json":
        bench.write_text("TIMESTAMP,ContextTokens\n")
    elif case == "a profile":
        bench = profile_file
    elif case == "no runs":
        bench.write_text(json.dumps({"meta": meta, "runs": []}))
    elif case == "another model":
        prof = flat_profile().save(tmp_path / "other.json")
    elif case == "another kind":
        prof = demo_profile(kind="cuda", device="NVIDIA H200").save(tmp_path / "gpu.json")
    argv = ["plan", "--validate", str(bench)] + ([] if case == "no cached profile" else ["--profile-file", str(prof)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitnode plan: error:") and message in err[0]


def test_the_fine_prediction_is_judged_against_the_measured_bracket():
    """A measured search only brackets the goodput: between the highest rate met and the next
    rate above it that missed. Inside the bracket is no error; outside, the distance to its end."""
    from splitnode.plan.validate import GoodputCheck, _bracket

    assert _bracket([(8.0, False), (4.0, True), (6.0, False), (5.0, True)]) == (5.0, 6.0)
    assert _bracket([(2.0, False), (1.0, False)]) == (0.0, 1.0)
    assert _bracket([(1.0, True), (2.0, True)]) == (2.0, None)

    def check(bracket, fine):
        return GoodputCheck("2m", None, bracket[0], 0.0, [], bracket, fine)

    assert check((2.0, 2.4), 2.2).fine_error == 0.0
    assert check((2.0, 2.4), 1.75).fine_error == pytest.approx(-0.125) and check((2.0, 2.4), 1.75).fine_is_close
    assert check((2.0, 2.4), 3.0).fine_error == pytest.approx(0.25) and not check((2.0, 2.4), 3.0).fine_is_close
    assert check((0.0, 1.1), 0.9).fine_error == 0.0  # nothing met at 1.1: a prediction below it agrees
    assert check((0.0, 1.1), 1.5).fine_error == pytest.approx(0.4 / 1.1)
    assert check((3.0, None), 5.0).fine_error == 0.0  # met at every rate tried
