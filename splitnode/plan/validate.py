"""`splitnode plan --validate BENCH.json`: the simulator against measurement.

Every run of a `splitnode bench serve --json` file is simulated again: the same requests (the
lengths in the file's per-request records) sent at the same times (the records' send times), on
the run's roles, timed by the profile, and judged by the bench's own code (`goodput.slo.summarize`)
against the bench's SLOs: absolute limits as given, slowdowns against each request simulated alone
(the planner's yardstick: the bench's measured one is not in the file). Each layout's goodput is
predicted by the planner's rate search over simulated runs, from the rate the bench's sweep started
at, with as many runs at most and the bench's tolerance, so that the two searches differ only in
what the runs say.

What the file does not record is taken from this command line or inferred, and each such guess is
said on stderr: the engine's settings (KV pool, token budget: pass the bench's flags again), the
dtype, the cores of a CPU worker (this box's share, as the bench computes it), the sweep's run
limit (the length of a search it cut short), and, in a file without per-request records, the
requests themselves (regenerated from the workload, scale and --seed as the bench draws them).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from splitnode.goodput import slo as S
from splitnode.goodput import workloads as W
from splitnode.goodput.slo import Alone
from splitnode.goodput.workloads import RequestSpec
from splitnode.plan import planner as P
from splitnode.plan.profile import Profile, ProfileError, device_name, model_key, profile_dir, profile_path
from splitnode.plan.sim import Policy, alone, simulate

GOAL = 0.15  # issue 8: predicted goodput within 15% of the measured one
FINE_RUNS, FINE_TOLERANCE = 12, 0.03  # `splitnode plan`'s own search
_SEARCH = inspect.signature(S.search_rate).parameters
_BENCH_TOLERANCE, _FLOOR = _SEARCH["tolerance"].default, _SEARCH["floor"].default  # the bench passes neither
_RECORD_KEYS = ("prompt_len", "output_len", "sent_s")


def _bench_default(name: str):
    """A `bench serve` flag's default (the file records none of its flags)."""
    from splitnode.goodput.command import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.get_default(name)


# -- reading a bench file ---------------------------------------------------------------------------------


@dataclass
class Bench:
    path: Path
    meta: dict
    runs: list[dict]
    goodput: dict[str, dict]  # layout name -> {"rate", "per_device", "runs"}; empty without --sweep
    workload: str  # conversation, coding, or a trace's path
    scale: float | None  # None for a trace (the file does not record it)
    model: str | None  # None: the demo model
    devices: list[str]
    slo: dict[str, float]  # absolute limits in seconds; empty: the slowdown SLOs
    attainment: float
    notes: list[str] = field(default_factory=list)  # what the file lacked and what was assumed instead

    @property
    def title(self) -> str:
        return f"{self.meta.get('workload', self.workload)} ({self.path.name})"


def read_bench(path: Path) -> Bench:
    """A `bench serve --json` file, checked enough that every later error is about the
    simulation, not the file; a file that is not one is a one-line ValueError."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a bench JSON (`splitnode bench serve --json`): {e}") from None
    what = f"{path} is not a bench JSON (`splitnode bench serve --json`)"
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{what}: it needs a 'meta' object and a 'runs' list")
    meta, runs = data["meta"], data["runs"]
    devices = meta.get("devices")
    if not isinstance(devices, list) or not devices or not isinstance(meta.get("workload"), str):
        raise ValueError(f"{what}: 'meta' lacks its 'devices' list or its 'workload'")
    if not runs:
        raise ValueError(f"{path} has no runs to validate")
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not all(k in run for k in ("layout", "rate", "ttft_s", "tbt_s", "met")):
            raise ValueError(f"{what}: run {i} lacks one of layout, rate, ttft_s, tbt_s, met")
    goodput = data.get("goodput") or {}
    if not isinstance(goodput, dict) or not all(isinstance(g, dict) and "rate" in g and "runs" in g for g in goodput.values()):
        raise ValueError(f"{what}: 'goodput' is not {{layout: {{rate, runs}}}}")
    notes: list[str] = []
    name, _, times = meta["workload"].rpartition(" x")
    if name in W.WORKLOADS:
        workload, scale = name, float(times)
    else:
        workload, scale = meta["workload"], None
    slo = meta.get("slo", "slowdown")
    if slo != "slowdown" and not (isinstance(slo, dict) and set(slo) <= set(S.ABSOLUTE_KEYS)):
        raise ValueError(f"{what}: meta's 'slo' is neither 'slowdown' nor limits {{ttft, tbt, e2e: seconds}}")
    slo = {} if slo == "slowdown" else {k: float(v) for k, v in slo.items()}
    return Bench(Path(path), meta, runs, goodput, workload, scale, _model(meta, notes), [str(d) for d in devices],
                 slo, _attainment(runs, slo, notes), notes)


def _model(meta: dict, notes: list[str]) -> str | None:
    """The model, from meta's 'target' ("demo in this process", "MODEL in this process",
    "server at SOCKET (MODEL)"): the file has no field of its own for it."""
    target = str(meta.get("target", ""))
    m = re.fullmatch(r"server at .* \((.*)\)", target) or re.fullmatch(r"(.*) in this process", target)
    if m is None:
        notes.append(f"meta's target {target!r} names no model: assumed the demo model")
        return None
    return None if m.group(1) == "demo" else m.group(1)


def _attainment(runs: list[dict], slo: dict, notes: list[str]) -> float:
    """The bench's --attainment: meta lacks it; a run judged by absolute SLOs carries it."""
    for run in runs:
        target = (run.get("absolute") or {}).get("target")
        if target is not None:
            return float(target)
    default = _bench_default("attainment")
    if slo:
        notes.append(f"no run records its --attainment: assumed the bench's default {default:g}")
    return default


# -- the profile --------------------------------------------------------------------------------------------


def find_profile(bench: Bench, profile_file: Path | None, engine_kwargs: dict) -> Profile:
    """--profile-file, or the cache dir's profile of the bench's model on its devices as `splitnode
    plan` keys it; refused unless it profiles that model on that kind of device."""
    kind = bench.devices[0].partition(":")[0]
    if any(d.partition(":")[0] != kind for d in bench.devices):
        raise ProfileError(f"{bench.path} ran on devices of several kinds ({','.join(bench.devices)}); the simulator "
                           "takes one profile")
    key = model_key(bench.model)
    dtype = engine_kwargs.get("dtype") or "auto"
    if profile_file is None:
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ProfileError(f"{bench.path} ran on {bench.devices[0]}, which is not here: give its profile "
                                   "with --profile-file")
        name = device_name(bench.devices[0], _cores(bench, engine_kwargs))
        profile_file = profile_path(key, name, dtype)
        if not profile_file.is_file():
            raise ProfileError(f"no profile of {key} on {name} ({dtype}) in {profile_dir()}: measure it with "
                               f"`splitnode plan --profile --devices {P.devices_spec(bench.devices)}`"
                               + (f" --model {bench.model}" if bench.model else "") + " or give --profile-file")
        if "dtype" not in _given(engine_kwargs):
            bench.notes.append(f"the file does not record the dtype: read the {dtype} profile (--dtype picks another)")
    prof = Profile.load(profile_file)
    if prof.model != key:
        raise ProfileError(f"{profile_file} profiles {prof.model}, but {bench.path} ran {key}: give a profile of "
                           f"{bench.model or 'the demo model'}")
    if prof.kind != kind:
        raise ProfileError(f"{profile_file} profiles {prof.kind} devices ({prof.device}), but {bench.path} ran on "
                           f"{','.join(bench.devices)}")
    return prof


def _cores(bench: Bench, engine_kwargs: dict) -> int | None:
    """A CPU worker's cores as the bench shared them out (`--cpu-threads`, else this box's cores
    evenly): the file does not record them."""
    from splitnode.goodput.command import _cpu_share  # the bench's own rule

    if not bench.devices[0].startswith("cpu"):
        return None
    given = engine_kwargs.get("cpu_threads")
    share = _cpu_share(bench.devices, given)
    if not given:
        bench.notes.append(f"the file does not record a CPU worker's cores: assumed {share}, this box's share "
                           "(--cpu-threads sets it)")
    return share


def _given(engine_kwargs: dict) -> set[str]:
    """The engine flags given on this command line (the others hold RuntimeConfig's defaults)."""
    from splitnode.runtime.config import RuntimeConfig

    defaults = {f.name: f.default for f in fields(RuntimeConfig)}
    return {k for k, v in engine_kwargs.items() if k not in defaults or v != defaults[k]}


# -- the validation -------------------------------------------------------------------------------------------


@dataclass
class RunCheck:
    """One measured run and the same run simulated."""

    run: dict  # as the file has it: layout, rate, ttft_s, tbt_s, met, ...
    layout: P.Layout
    specs: list[RequestSpec]
    arrivals: list[float]
    predicted: dict | None  # summarize() of the simulated run; None: it could not be replayed


@dataclass
class GoodputCheck:
    name: str  # as the bench named the layout (colocated, split, 1p1t, ...)
    layout: P.Layout
    measured: float
    predicted: float
    history: list[tuple[float, bool]]  # the predicted search's (rate, met)
    # The measured goodput is only known to lie between the highest rate that met the SLOs and the
    # lowest one above it that missed (None: none missed); `fine` is the planner's own finer search
    # (FINE_RUNS runs, FINE_TOLERANCE), judged against that bracket rather than one of its ends.
    bracket: tuple[float, float | None] = (0.0, None)
    fine: float | None = None

    @property
    def fine_error(self) -> float | None:
        """How far the fine prediction lies outside the measured bracket, relative to the bracket's
        end it passed (0 inside it; a bracket from 0 when no rate met); None without a search."""
        lo, hi = self.bracket
        if self.fine is None or (lo <= 0 and hi is None):
            return None
        if self.fine < lo:
            return (self.fine - lo) / lo
        return 0.0 if hi is None or self.fine <= hi else (self.fine - hi) / hi

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured; None where no measured rate met the SLOs."""
        return (self.predicted - self.measured) / self.measured if self.measured > 0 else None

    @property
    def is_close(self) -> bool:
        """Within the goal; where nothing met the SLOs, only a prediction of nothing is."""
        return abs(self.error) <= GOAL if self.measured > 0 else self.predicted == 0

    @property
    def fine_is_close(self) -> bool:
        """The fine prediction within the goal of the measured bracket."""
        return self.fine_error is not None and abs(self.fine_error) <= GOAL


@dataclass
class Validation:
    bench: Bench
    profile: Profile
    runs: list[RunCheck]
    goodput: list[GoodputCheck]
    max_runs: int | None  # the sweep's run limit the prediction used

    @property
    def ranking(self) -> tuple[list[list[str]], list[list[str]]]:
        """The layouts best first by measured and by predicted goodput; equal goodputs share a place."""
        def order(value) -> list[list[str]]:
            places: dict[float, list[str]] = {}
            for g in sorted(self.goodput, key=lambda g: -value(g)):
                places.setdefault(value(g), []).append(g.name)
            return list(places.values())

        return order(lambda g: g.measured), order(lambda g: g.predicted)

    @property
    def ranking_agrees(self) -> bool:
        measured, predicted = self.ranking
        return [sorted(p) for p in measured] == [sorted(p) for p in predicted]


def validate_bench(bench: Bench, prof: Profile, policy: Policy, seed: int = 0, max_len: int | None = None) -> Validation:
    """Every run of `bench` simulated on its own requests and send times, and every layout's
    goodput predicted by the planner's search."""
    n = len(bench.devices)
    replays = [_replay(run) for run in bench.runs]
    if any(r is None for r in replays):
        replays = _regenerate(bench, replays, seed, max_len)
    if bench.scale is not None and any(run["rate"] is None and r is not None for run, r in zip(bench.runs, replays)):
        bench.notes.append("closed-loop runs are replayed open loop at their recorded send times (the simulator has "
                           "no closed loop)")
    specs, base = _request_list(bench, replays)
    planner = P.Planner(prof, n, specs, base, policy, bench.slo, bench.attainment)
    yardstick = dict(planner.alone or {})
    layouts = {run["layout"]: _layout(run, n) for run in bench.runs}
    runs = []
    for run, replay in zip(bench.runs, replays):
        lay = layouts[run["layout"]]
        if replay is None:
            runs.append(RunCheck(run, lay, [], [], None))
            continue
        run_specs, arrivals = replay
        if not bench.slo:
            missing = [s for s in run_specs if (s.prompt_len, s.output_len) not in yardstick]
            yardstick.update(alone(prof, missing, policy))
        runs.append(RunCheck(run, lay, run_specs, arrivals, predict(planner, lay, run_specs, arrivals, yardstick)))
    max_runs = _max_runs(bench) if bench.goodput else None
    goodput = []
    for name, measured in bench.goodput.items():
        lay = layouts.get(name) or P.parse_layout(name, n)
        start = measured["runs"][0][0] if measured["runs"] else planner.sweep_start()
        rate, history = planner.goodput(lay, start, max_runs, _BENCH_TOLERANCE)
        fine, _ = planner.goodput(lay, start, FINE_RUNS, FINE_TOLERANCE)
        goodput.append(GoodputCheck(name, lay, float(measured["rate"]), rate, history, _bracket(measured["runs"]), fine))
    return Validation(bench, prof, runs, goodput, max_runs)


def _bracket(runs: list) -> tuple[float, float | None]:
    """(the highest rate that met, the lowest rate above it that missed) of a measured search."""
    lo = max((float(r) for r, met in runs if met), default=0.0)
    above = [float(r) for r, met in runs if not met and float(r) > lo]
    return lo, min(above) if above else None


def predict(planner: P.Planner, layout: P.Layout, specs: list[RequestSpec], arrivals: list[float],
            yardstick: dict[tuple[int, int], Alone]) -> dict:
    """The bench's summary of `specs` sent at `arrivals` to `layout`, simulated (Planner.judge,
    with the run's own send times instead of a rate)."""
    prof = planner.profile
    devices = [(f"{prof.kind}:{i}", role, prof) for i, role in enumerate(layout.roles())]
    sim = simulate(devices, specs, arrivals, replace(planner.policy, autoscale=layout.autoscale))
    return S.summarize(sim.results, None if planner.slo else yardstick, planner.slo, planner.attainment)


def _layout(run: dict, n: int) -> P.Layout:
    """The roles the bench set (its record of them), the autoscaler from the layout's name."""
    named = P.parse_layout(run["layout"], n)
    roles = list((run.get("roles") or {}).values())
    if len(roles) != n:
        return named
    return P.Layout(roles.count("prompt"), roles.count("token"), roles.count("mixed"), named.autoscale)


def _replay(run: dict) -> tuple[list[RequestSpec], list[float]] | None:
    """The run's requests and send times from its per-request records; None without them."""
    records = run.get("requests")
    if not records or not all(isinstance(r, dict) and all(r.get(k) is not None for k in _RECORD_KEYS) for r in records):
        return None
    return ([RequestSpec(int(r["prompt_len"]), int(r["output_len"])) for r in records],
            [float(r["sent_s"]) for r in records])


def _regenerate(bench: Bench, replays: list, seed: int, max_len: int | None) -> list:
    """Requests for runs without records, drawn as the bench draws them (workload, scale, seed)
    and sent at its Poisson times for the run's rate; a closed-loop run stays None (its send
    times depended on the responses)."""
    which = [i for i, r in enumerate(replays) if r is None]
    if bench.scale is None:
        raise ValueError(f"{bench.path}: run {which[0]} has no per-request records ({', '.join(_RECORD_KEYS)}) and "
                         f"its workload is a trace, whose --scale the file does not record: re-run the bench")
    num = bench.meta.get("num_requests")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"{bench.path}: run {which[0]} has no per-request records and meta has no 'num_requests' "
                         "to draw them again")
    specs = W.synthetic(bench.workload, num, bench.scale, seed, max_len)
    base = W.poisson_arrivals(num, 1.0, seed)
    bench.notes.append(f"{len(which)} run(s) lack per-request records ({', '.join(_RECORD_KEYS)}): drew {num} "
                       f"{bench.workload} x{bench.scale:g} requests again with --seed {seed} (the file does not "
                       "record the seed) and the bench's Poisson send times")
    out = list(replays)
    for i in which:
        rate = bench.runs[i]["rate"]
        out[i] = None if rate is None else (specs, P.arrivals_at(base, rate))
    if any(out[i] is None for i in which):
        bench.notes.append("a closed-loop run without records cannot be replayed (its send times followed the "
                           "responses): shown measured only")
    return out


def _request_list(bench: Bench, replays: list) -> tuple[list[RequestSpec], list[float]]:
    """The request list of the goodput searches and its base arrivals: the open-loop run with the
    lowest rate (its send times are the least disturbed by the bench's own delays), from 0."""
    open_loop = [(run["rate"], r) for run, r in zip(bench.runs, replays) if r is not None and run["rate"]]
    chosen = min(open_loop, key=lambda x: x[0])[1] if open_loop else next((r for r in replays if r is not None), None)
    if chosen is None:
        raise ValueError(f"{bench.path}: no run can be replayed (closed-loop runs without per-request records)")
    specs, sent = chosen
    t0 = min(sent)
    return specs, [t - t0 for t in sent]


def _max_runs(bench: Bench) -> int:
    """The bench's --sweep-runs, which the file does not record: the length of a search that
    stopped before its bracket closed (it ran out of runs), else the longest search or the
    bench's default, whichever is more."""
    default = _bench_default("sweep_runs")
    for g in bench.goodput.values():
        if g["runs"] and not _closed(g["runs"]):
            return len(g["runs"])
    longest = max((len(g["runs"]) for g in bench.goodput.values()), default=0)
    bench.notes.append(f"the file does not record --sweep-runs and every search finished: the predicted searches "
                       f"may run {max(default, longest)}")
    return max(default, longest)


def _closed(history: list) -> bool:
    """Whether search_rate stopped on its own: a bracket within its tolerance, or below its floor."""
    met = [r for r, ok in history if ok]
    missed = [r for r, ok in history if not ok]
    if met and missed:
        return min(missed) / max(met) <= 1 + _BENCH_TOLERANCE
    return not met and history[-1][0] / 2 < _FLOOR


# -- what is printed ---------------------------------------------------------------------------------------------


def _ms(p: dict | None, q: str) -> str:
    if not p or p.get(q) is None:
        return "-"
    v = p[q] * 1000
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _pair(measured: str, predicted: str) -> str:
    return f"{measured} / {predicted}"


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _rate(rate) -> str:
    return "closed loop" if rate is None else f"{rate:.3g}"


def _name(name: str, lay: P.Layout) -> str:
    return name if name == lay.name else f"{name} ({lay.name})"


def render(v: Validation, markdown: bool = False) -> str:
    b, prof = v.bench, v.profile
    slo = ("slowdown against each request simulated alone" if not b.slo else
           ", ".join(f"{k} <= {x * 1000:g} ms" for k, x in b.slo.items()) + f" for {b.attainment:.0%} of requests")
    intro = (f"{len(b.runs)} runs on {','.join(b.devices)}, predicted with the profile of {prof.model} on {prof.device} "
             f"({prof.resolved_dtype}); SLOs: {slo}. Each cell: measured / predicted.")
    head = ["layout", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TBT p50 ms", "TBT p99 ms", "SLOs met"]
    rows = []
    order = list(dict.fromkeys(c.run["layout"] for c in v.runs))
    rounds = any(c.run.get("round") for c in v.runs)
    for c in sorted(v.runs, key=lambda c: (order.index(c.run["layout"]), c.run["rate"] or 0.0)):
        r, p = c.run, c.predicted or {}
        label = _name(r["layout"], c.layout) + (f" round {r.get('round', 0) + 1}" if rounds else "")
        rows.append([label, _rate(r["rate"])]
                    + [_pair(_ms(r[k], q), _ms(p.get(k), q)) for k in ("ttft_s", "tbt_s") for q in ("p50", "p99")]
                    + [_pair(_yes(r["met"]), _yes(p.get("met") if c.predicted else None))])
    replayed = [c for c in v.runs if c.predicted is not None]
    agree = sum(bool(c.run["met"]) == bool(c.predicted["met"]) for c in replayed)
    out = [f"### {b.title}" if markdown else b.title, "", intro, "", _table(head, rows, markdown, "<>>>>>>"), "",
           f"SLOs met: the prediction agrees with the measurement in {agree} of {len(replayed)} runs."]
    if v.goodput:
        head = ["layout", "measured req/s (met / missed)", "predicted, same search", "error",
                "predicted, fine search", "off the bracket", f"within {GOAL:.0%}"]
        rows = []
        for g in v.goodput:
            lo, hi = g.bracket
            fe = g.fine_error
            rows.append([_name(g.name, g.layout), f"{g.measured:.2f} ({lo:.2f} / {'-' if hi is None else f'{hi:.2f}'})",
                         f"{g.predicted:.2f}", "-" if g.error is None else f"{g.error:+.0%}",
                         "-" if g.fine is None else f"{g.fine:.2f}", "-" if fe is None else f"{fe:+.0%}",
                         _yes(g.fine_is_close)])
        measured, predicted = v.ranking
        out += ["", _table(head, rows, markdown, "<>>>>>>"), "",
                f"Ranking by goodput: measured {_places(measured)}; predicted {_places(predicted)}: "
                f"{'agrees' if v.ranking_agrees else 'differs'}. Predicted searches start at the bench's first rate "
                f"({v.goodput[0].history[0][0]:.3g} req/s); the same search: at most {v.max_runs} runs, tolerance "
                f"{_BENCH_TOLERANCE:.0%}, as the bench's; the fine one: {FINE_RUNS} runs, {FINE_TOLERANCE:.0%}, judged "
                f"against the measured bracket (the measured goodput lies between the highest rate met and the next "
                f"rate missed)."]
    return "\n".join(out)


def _places(places: list[list[str]]) -> str:
    return " > ".join(" = ".join(p) for p in places)


def _table(head: list[str], rows: list[list[str]], markdown: bool, align: str) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if a == "<" else "---:" for a in align) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(head)] + [line(r) for r in rows])


# -- the command -----------------------------------------------------------------------------------------------


def validate(args: argparse.Namespace, engine_kwargs: dict) -> int:
    """`splitnode plan --validate BENCH.json ...`: every file read and its profile found before
    anything is simulated, so a bad file or profile fails at once."""
    if args.profile or args.apply or args.socket is not None:
        raise ValueError("--validate replays bench files with a stored profile: drop --profile, --apply and --socket")
    benches = [read_bench(path) for path in args.validate]
    profiles = [find_profile(b, args.profile_file, engine_kwargs) for b in benches]
    sections = []
    for b, prof in zip(benches, profiles):
        policy = P.policy_for(engine_kwargs, prof)
        v = validate_bench(b, prof, policy, args.seed, P.longest_request(prof, policy))
        if not _given(engine_kwargs) & {"num_kv_blocks", "kv_cache_gib", "block_size", "max_num_batched_tokens"}:
            b.notes.append("the file does not record the engine's settings: simulated with this command's (pass the "
                           "bench's --num-kv-blocks, --max-num-batched-tokens, ... again if it had any)")
        for note in dict.fromkeys(b.notes):
            print(f"splitnode plan: {b.path.name}: {note}", file=sys.stderr)
        sections.append(render(v, args.markdown))
    print("\n\n".join(sections))
    return 0
