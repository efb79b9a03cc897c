"""`splitnode plan`: profile the devices, simulate every role layout on a workload, recommend one,
and (with --apply) move a running server to it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from splitnode.goodput import slo as S
from splitnode.goodput import workloads as W
from splitnode.plan import planner as P
from splitnode.plan.measure import measure
from splitnode.plan.profile import Profile, ProfileError, device_name, model_key, profile_path

DESCRIPTION = (
    "Recommend the roles of a box's devices for a workload. A profile of the devices (measured once with the real "
    "engine, stored in the cache dir) times a simulation of splitnode's own scheduling: the router's choice at "
    "arrival, FCFS chunked prefill under the token budget, continuous decode under KV memory, mixed batches with "
    "decode ageing and bounded preemption, layer-wise or whole KV moves. Every layout (prompt/token/mixed counts) is "
    "simulated on the same requests as `splitnode bench serve` sends and judged by the same SLO code; the table ranks "
    "them by predicted goodput: the highest request rate meeting the SLOs.")
EPILOG = """profile (once per model, device and dtype; about a minute, stored in ~/.cache/splitnode/profiles):
  splitnode plan --profile --devices cpu:2
  measures prefill against batch tokens, decode against batch size and context, mixed batches, KV moves
  between two devices and the slowdown of devices stepping at once, then plans; --profile-file PATH keeps
  it elsewhere (a profile from another box plans hardware that is not here).

plan (reads the profile; seconds):
  splitnode plan --devices cpu:2 --workload conversation --scale 0.05
  splitnode plan --devices cpu:2 --workload coding --scale 0.05 --rate 4 --slo ttft=500,tbt=50
  splitnode plan --profile-file h200-llama3-8b.json --devices 8 --workload conversation --num-requests 2000
  --devices N plans N devices of the profile's kind; without --slo the SLOs are Splitwise's slowdowns
  against each request simulated alone on an idle device.

apply (moves a running server to the recommended layout with assign, through mixed so that no phase is
ever left without a device; the devices stay pinned there):
  splitnode plan --socket /run/user/1000/splitnode/splitnode.sock --workload conversation --scale 0.05 --apply

validate (the simulator against measurement: every run of bench serve --json files replayed on its own requests
and send times; measured against predicted percentiles, SLOs met and goodput, and the layouts' ranking):
  splitnode bench serve --devices cpu:2 --workload conversation --scale 0.25 --compare 2m,1p1t,1p1m --sweep --json conv.json
  splitnode plan --validate conv.json [--markdown]"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    pr = p.add_argument_group("profile")
    pr.add_argument("--profile", action="store_true",
                    help="measure the devices first (and store the profile), then plan")
    pr.add_argument("--profile-budget-s", type=float, default=60.0, metavar="S",
                    help="time the measurement may take, model load aside (default: %(default)s)")
    pr.add_argument("--profile-file", type=Path, default=None, metavar="PATH",
                    help="read (or with --profile write) this profile instead of the cache dir's")
    w = p.add_argument_group("workload (as splitnode bench serve)")
    w.add_argument("--workload", choices=sorted(W.WORKLOADS), default="conversation",
                   help="synthetic lengths shaped like the Azure LLM inference 2023 trace of that name (default: %(default)s)")
    w.add_argument("--trace", type=Path, default=None, metavar="FILE.csv",
                   help="a trace with the columns TIMESTAMP,ContextTokens,GeneratedTokens instead")
    w.add_argument("--scale", type=float, default=1.0, help="multiply every prompt and output length (default: %(default)s)")
    w.add_argument("--num-requests", type=int, default=200, help="requests per simulated run (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="seeds lengths and arrivals (default: %(default)s)")
    w.add_argument("--time-scale", type=float, default=1.0, help="play a trace this many times faster (default: 1)")
    s = p.add_argument_group("load, SLOs and goodput")
    s.add_argument("--rate", type=float, default=None, metavar="R",
                   help="show every layout at R requests/s (Poisson); without --sweep, rank at R only")
    s.add_argument("--sweep", action="store_true",
                   help="predict each layout's goodput by the bench's rate search (the default without --rate)")
    s.add_argument("--sweep-runs", type=int, default=12, help="simulated runs per layout in the search (default: %(default)s)")
    s.add_argument("--slo", default=None, metavar="ttft=MS,tbt=MS,e2e=MS",
                   help="absolute limits (tbt: a request's mean token gap), met when --attainment of the requests "
                        "are within them (default: Splitwise's slowdown SLOs)")
    s.add_argument("--attainment", type=float, default=0.9, help="share of good requests --slo asks (default: 0.9)")
    t = p.add_argument_group("devices, layouts and output")
    t.add_argument("--devices", default=None,
                   help="cuda, cuda:0,cuda:1, cpu:N, or N (N devices of the profile's kind) (default: a server's with "
                        "--socket, else cuda if visible, else cpu:N with a core each, at most 3)")
    t.add_argument("--layouts", default=None, metavar="LAYOUT,...",
                   help="only these layouts: counts like 1p1t, 2m, 1p2t1m, or colocated, split; +policy adds the "
                        "autoscaler (default: every layout)")
    t.add_argument("--autoscale", action="store_true",
                   help="also simulate each layout with prompt and token devices with the autoscaler on (+policy)")
    t.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every layout's figures")
    t.add_argument("--apply", action="store_true", help="move the server at --socket to the recommended layout")
    t.add_argument("--socket", type=Path, default=None, metavar="PATH",
                   help="a running server: its devices and model are planned, and --apply moves it")
    v = p.add_argument_group("validate (the simulator against measurement)")
    v.add_argument("--validate", type=Path, nargs="+", default=None, metavar="BENCH.json",
                   help="simulate every run of these `splitnode bench serve --json` files on its own requests and send "
                        "times, and print measured against predicted TTFT, TBT, SLOs met and goodput per layout "
                        "(the profile: --profile-file, else the cache dir's for the bench's model and devices)")
    v.add_argument("--markdown", action="store_true", help="print --validate's tables as GitHub Markdown")


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    if args.validate:
        from splitnode.plan.validate import validate

        return validate(args, engine_kwargs)
    if args.markdown:
        raise ValueError("--markdown formats the tables of --validate BENCH.json")
    if args.num_requests < 1 or args.sweep_runs < 2 or not args.profile_budget_s > 0:
        raise ValueError("--num-requests must be >= 1, --sweep-runs >= 2 and --profile-budget-s > 0")
    if args.rate is not None and not 0 < args.rate < float("inf"):
        raise ValueError(f"--rate must be > 0 requests/s, got {args.rate}")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1], got {args.attainment}")
    if args.apply and args.socket is None:
        raise ValueError("--apply moves a running server: give its --socket")
    slo = S.parse_slo(args.slo)
    server = asyncio.run(_server_status(args.socket)) if args.socket is not None else None
    kwargs = dict(engine_kwargs)
    if server is not None and kwargs.get("model") is None and server["runtime"]["model"] != "demo":
        kwargs["model"] = server["runtime"]["model"]
    devices, count = _devices(args.devices, server)
    prof = _profile(args, devices, count, kwargs)
    n = count or len(devices)
    policy = P.policy_for(kwargs, prof)
    specs, base = _requests(args, P.longest_request(prof, policy))
    candidates = ([P.parse_layout(x.strip(), n) for x in args.layouts.split(",") if x.strip()] if args.layouts
                  else P.layouts(n, args.autoscale))
    if not candidates:
        raise ValueError("--layouts names no layout")
    sweep = args.sweep or args.rate is None
    planner = P.Planner(prof, n, specs, base, policy, slo, args.attainment)
    _header(prof, n, specs, args, slo)
    with _Bar(f"simulating {len(candidates)} layouts", len(candidates)) as bar:
        evals = planner.evaluate(candidates, args.rate, sweep, max_runs=args.sweep_runs, on_done=lambda _: bar.advance())
    print(table(evals, sweep))
    best = evals[0]
    print(recommendation(evals, sweep))
    if args.json is not None:
        args.json.write_text(json.dumps(_to_json(evals, prof, args, n), indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.apply:
        if sweep and not best.goodput:
            raise ValueError("nothing to apply: no layout meets the SLOs")
        if best.layout.num_devices != len(server["devices"]):
            raise ValueError(f"the plan is for {best.layout.num_devices} devices; the server has {len(server['devices'])}")
        roles = asyncio.run(apply(args.socket, best.layout.name))
        print("applied: " + ", ".join(f"{d}={r}" for d, r in roles.items()))
    return 0


async def _server_status(path: Path) -> dict:
    from splitnode.api.client import Client

    try:
        async with Client(path) as client:
            return await client.status()
    except OSError as e:
        raise ValueError(f"no server answers at {path}: {e}") from None


async def apply(socket: Path, layout: str) -> dict[str, str]:
    """Moves the server's devices to `layout` through the bench's own ordering (`Target.apply`:
    every changing device through mixed first, pinned; `+policy` unpins them for the autoscaler)."""
    from splitnode.api.client import Client
    from splitnode.goodput.command import Target

    counts, _, policy = layout.partition("+")
    async with Client(socket) as client:
        devices = [d["name"] for d in (await client.status())["devices"]]
        roles = await Target(client, devices).apply(counts)
        if policy:
            for d in devices:
                await client.release(d)
        return roles


def _devices(spec: str | None, server: dict | None) -> tuple[list[str], int | None]:
    """The devices' names, or (with a bare count) none and the count."""
    from splitnode.runtime.config import parse_devices

    if spec is not None and spec.strip().isdigit():
        if int(spec) < 1:
            raise ValueError(f"--devices {spec}: plan at least one device")
        return [], int(spec)
    if spec is None and server is not None:
        return [d["name"] for d in server["devices"]], None
    if spec is None:
        import torch

        spec = "cuda" if torch.cuda.is_available() else f"cpu:{min(3, len(os.sched_getaffinity(0)))}"
    devices = parse_devices(spec)
    kinds = {d.partition(":")[0] for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"--devices {spec}: the planner takes devices of one kind (one profile); got {', '.join(sorted(kinds))}")
    return devices, None


def _threads(devices: list[str], kwargs: dict) -> int | None:
    """A CPU worker's cores, as the runtime shares them out; refused where workers would share."""
    if not devices or not devices[0].startswith("cpu"):
        return None
    cores = len(os.sched_getaffinity(0))
    each = kwargs.get("cpu_threads") or cores // len(devices)
    if each < 1 or each * len(devices) > cores:
        raise ValueError(f"{len(devices)} CPU workers on {cores} cores would share cores; the planner models workers with "
                         f"cores of their own: give --devices cpu:{cores} or fewer")
    return each


def _profile(args, devices: list[str], count: int | None, kwargs: dict) -> Profile:
    if count is not None and args.profile:
        raise ValueError("--profile measures devices that are here: name them (cpu:2, cuda), not a count")
    if count is not None and args.profile_file is None:
        import torch

        devices = ["cuda:0"] if torch.cuda.is_available() else ["cpu:0"]  # this box's kind, one device's profile
    threads = _threads(devices, kwargs) if count is None else None
    dtype = kwargs.get("dtype") or "auto"
    path = args.profile_file
    if args.profile:
        with _Bar(f"profiling {devices[0]}", 1.0) as bar:
            prof = measure(devices, {**kwargs, "cpu_threads": threads}, args.profile_budget_s, bar.set)
        target = path or profile_path(prof.model, prof.device, prof.dtype)
        prof.save(target)
        skipped = prof.measured.get("skipped") or []
        print(f"splitnode plan: profiled {prof.device} in {prof.measured['seconds']:.0f} s (model load "
              f"{prof.measured['load_s']:.0f} s); wrote {target}"
              + (f" ({len(skipped)} points skipped for time: {', '.join(skipped[:4])})" if skipped else ""), file=sys.stderr)
        return prof
    if path is None:
        name = device_name(devices[0], threads)
        path = profile_path(model_key(kwargs.get("model")), name, dtype)
        if not path.is_file():
            raise ProfileError(f"no profile of {model_key(kwargs.get('model'))} on {name} ({dtype}) in {path.parent}: "
                               f"measure it with `splitnode plan --profile --devices {P.devices_spec(devices)}` (about a minute)")
    prof = Profile.load(path)
    if count is None and prof.kind != devices[0].partition(":")[0]:
        raise ProfileError(f"{path} profiles {prof.kind} devices ({prof.device}), not {devices[0]}")
    return prof




def _requests(args, max_len: int) -> tuple[list[W.RequestSpec], list[float]]:
    """The request list and base arrivals `bench serve` builds from the same flags."""
    if args.trace is not None:
        specs, bad = W.read_trace(args.trace)
        for line in bad[:20]:
            print(f"splitnode plan: skipped {line}", file=sys.stderr)
        specs = [W.fit(W.RequestSpec(max(1, round(s.prompt_len * args.scale)), max(1, round(s.output_len * args.scale)),
                                     s.arrival_s), max_len) for s in specs[:args.num_requests]]
        return specs, W.trace_arrivals(specs, args.time_scale)
    specs = W.synthetic(args.workload, args.num_requests, args.scale, args.seed, max_len)
    return specs, W.poisson_arrivals(len(specs), 1.0, args.seed)


def _header(prof: Profile, n: int, specs, args, slo) -> None:
    p = sorted(s.prompt_len for s in specs)
    o = sorted(s.output_len for s in specs)
    source = str(args.trace) if args.trace else f"{args.workload} x{args.scale:g}"
    when = prof.measured.get("at", "?")
    print(f"profile: {prof.model} on {prof.device} ({prof.resolved_dtype}), measured {when} by splitnode {prof.version}",
          file=sys.stderr)
    print(f"{n} devices; {len(specs)} requests ({source}): prompts median {p[len(p) // 2]}, outputs median "
          f"{o[len(o) // 2]} tokens; SLOs: " + (", ".join(f"{k} <= {v * 1000:g} ms" for k, v in slo.items())
                                               + f" for {args.attainment:.0%}" if slo else "slowdown against alone"),
          file=sys.stderr)


def _ms(p, q: str) -> str:
    return f"{p[q] * 1000:.0f}" if p else "-"


def table(evals: list[P.Evaluation], sweep: bool) -> str:
    """One row per layout, best first: its goodput (with --sweep) and its run at the one rate
    every layout is shown at."""
    rate = (evals[0].at_rate or {}).get("rate") if evals else None
    base = next((e for e in evals if e.layout.num_prompt == e.layout.num_token == 0 and not e.layout.autoscale), None)
    head = f"{'layout':<14}"
    if sweep:
        head += f"{'goodput/s':>10}{'per device':>11}{'vs ' + (base.layout.name if base else '-'):>9}"
    head += f"   at {rate:.2f} req/s: TTFT p50/p99 ms  TBT p50/p99 ms  E2E p99 ms  SLOs    J/token"
    rows = [head]
    for e in evals:
        at = e.at_rate or {}
        line = f"{e.layout.name:<14}"
        if sweep:
            ratio = f"{e.goodput / base.goodput:.2f}x" if base and base.goodput else "-"
            line += f"{e.goodput:>10.2f}{e.per_device:>11.2f}{ratio:>9}"
        ttft, tbt, energy = at.get("ttft_s"), at.get("tbt_s"), at.get("energy_j_per_token")
        line += (f"{'':>18}{_ms(ttft, 'p50') + '/' + _ms(ttft, 'p99'):>15}{_ms(tbt, 'p50') + '/' + _ms(tbt, 'p99'):>16}"
                 f"{_ms(at.get('e2e_s'), 'p99'):>12}  {'met' if at.get('met') else 'missed':<7}"
                 f"{(f'{energy:.3g}' if energy is not None else 'n/a'):>8}")
        rows.append(line)
    return "\n".join(rows)


def recommendation(evals: list[P.Evaluation], sweep: bool) -> str:
    best = evals[0]
    lay = best.layout
    counts = ((lay.num_prompt, "prompt"), (lay.num_token, "token"), (lay.num_mixed, "mixed"))
    roles = ", ".join(f"{n} {r}" for n, r in counts if n)
    roles += ", autoscaler on" if lay.autoscale else ""
    if sweep:
        if not best.goodput:
            return "recommended: none: no layout meets the SLOs at any rate searched (loosen --slo or shorten --scale)"
        return f"recommended: {lay.name} ({roles}): predicted goodput {best.goodput:.2f} req/s, {best.per_device:.2f} per device"
    at = best.at_rate or {}
    return f"recommended: {lay.name} ({roles}) at {at.get('rate', 0):.2f} req/s: SLOs {'met' if at.get('met') else 'missed'}"


def _to_json(evals, prof: Profile, args, n: int) -> dict:
    return {"profile": {"model": prof.model, "device": prof.device, "dtype": prof.resolved_dtype, "version": prof.version},
            "devices": n, "workload": str(args.trace) if args.trace else args.workload, "scale": args.scale,
            "num_requests": args.num_requests, "seed": args.seed,
            "layouts": [{"layout": e.layout.name, "goodput": e.goodput, "per_device": e.per_device, "runs": e.runs,
                         "at_rate": {k: v for k, v in (e.at_rate or {}).items() if k != "devices"},
                         "devices": (e.at_rate or {}).get("devices")} for e in evals]}


class _Bar:
    """A rich progress bar on stderr: `advance()` by one, or `set(description, fraction)`."""

    def __init__(self, description: str, total: float):
        self.description, self.total = description, total

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=not sys.stderr.isatty())
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def set(self, description: str, fraction: float) -> None:
        self.bar.update(self.task, description=f"{self.description}: {description}", completed=fraction * self.total)
