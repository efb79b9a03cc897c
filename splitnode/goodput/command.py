"""`splitnode bench serve`: the same request list through several role layouts of the same
devices, under open- or closed-loop load, with latency percentiles, SLO attainment and goodput.

The layouts share one runtime (or the server behind `--socket`): each run first moves the devices
to the layout's roles with `assign` (pinned, so the autoscaler leaves them; `policy` releases them
to it), which is what a user would do by hand, and the model is loaded once. Every request is
greedy with EOS ignored, so each layout does the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

from splitnode.goodput import slo as S
from splitnode.goodput import workloads as W
from splitnode.goodput.load import layout_roles, measure_alone, run_load
from splitnode.runtime.status import Percentiles

DESCRIPTION = (
    "Serve the same request list on several role layouts of the same devices and compare them: TTFT, every token "
    "gap (TBT) and end-to-end latency at p50/p90/p99, requests/s and output tokens/s, SLO attainment against the "
    "same requests alone on an idle device (Splitwise's slowdown SLOs) or against --slo limits, and with --sweep "
    "the goodput: the highest rate at which the SLOs hold, per device. Requests come from a synthetic workload "
    "shaped like the Azure LLM inference traces, or from --trace.")
EPILOG = """examples:
  splitnode bench serve --devices cpu:2 --workload conversation --scale 0.05 --rate 2,4,8
  splitnode bench serve --devices cpu:3 --workload conversation --scale 0.05 --num-requests 24 --compare colocated,split
  splitnode bench serve --devices cuda --workload coding --sweep --slo ttft=500,tbt=50 --json out.json --plot out.png
  splitnode bench serve --socket /run/user/1000/splitnode.sock --trace AzureLLMInferenceTrace_conv.csv --time-scale 2

layouts (--compare): colocated (every device mixed), split (a third prompt, the rest token), policy (split, with
the autoscaler free to move devices; needs --autoscale on the runtime), or counts like 1p1t, 1p2t, 2m, 1p1t1m."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=sorted(W.WORKLOADS), default="conversation",
                   help="synthetic lengths shaped like the Azure LLM inference 2023 trace of that name "
                        "(coding: median prompt 1500, output 13; conversation: 1020, 129) (default: %(default)s)")
    w.add_argument("--trace", type=Path, default=None, metavar="FILE.csv",
                   help="replay a trace with the columns TIMESTAMP,ContextTokens,GeneratedTokens instead")
    w.add_argument("--scale", type=float, default=1.0,
                   help="multiply every prompt and output length, for small devices (default: %(default)s)")
    w.add_argument("--num-requests", type=int, default=100, help="requests per run (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="seeds lengths, token ids and arrivals (default: %(default)s)")
    ld = p.add_argument_group("load")
    ld.add_argument("--rate", default=None, metavar="R[,R...]",
                    help="open-loop Poisson arrivals, requests/s; several rates run one after another (default: "
                         "a trace's own timestamps, else --concurrency)")
    ld.add_argument("--concurrency", type=int, default=None, metavar="N",
                    help="closed loop: N requests in flight, the next sent as one ends (default: 8 without --rate)")
    ld.add_argument("--time-scale", type=float, default=1.0, help="play a trace this many times faster (default: 1)")
    ld.add_argument("--duration", type=float, default=None, metavar="S",
                    help="stop sending after S seconds of a run (default: when --num-requests are sent)")
    ld.add_argument("--rounds", type=int, default=1,
                    help="alternating rounds over the layouts at each rate; the table shows the median round "
                         "(default: %(default)s)")
    ld.add_argument("--warmup", type=int, default=4, help="untimed requests before the first run (default: %(default)s)")
    s = p.add_argument_group("SLOs and goodput")
    s.add_argument("--slo", default=None, metavar="ttft=MS,tbt=MS,e2e=MS",
                   help="absolute limits (tbt: a request's mean token gap); a run meets them when --attainment of "
                        "its requests do (default: Splitwise's slowdown SLOs against the requests alone)")
    s.add_argument("--attainment", type=float, default=0.9, help="share of good requests --slo asks (default: 0.9)")
    s.add_argument("--sweep", action="store_true",
                   help="find each layout's goodput: the highest Poisson rate meeting the SLOs (bracketing search)")
    s.add_argument("--sweep-start", type=float, default=None, metavar="R",
                   help="the search's first rate (default: the devices' count over the mean idle E2E)")
    s.add_argument("--sweep-runs", type=int, default=7, help="runs per layout in the search (default: %(default)s)")
    t = p.add_argument_group("target and output")
    t.add_argument("--compare", default="colocated,split", metavar="LAYOUT,...",
                   help="layouts to run, the first is the baseline of the ratios (default: %(default)s)")
    t.add_argument("--devices", default=None,
                   help="devices of the in-process runtime: cuda, cuda:0,cuda:1, cpu:N (default: cuda if visible, "
                        "else cpu:3)")
    t.add_argument("--socket", type=Path, default=None, metavar="PATH",
                   help="benchmark a running server instead (its devices; layouts set with assign)")
    t.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every run's figures")
    t.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="latency percentiles and SLO attainment against rate, one line per layout (matplotlib)")


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    check_args(args)
    return asyncio.run(_main(args, engine_kwargs))


def check_args(args: argparse.Namespace) -> None:
    if args.num_requests < 1 or args.rounds < 1 or args.warmup < 0 or args.sweep_runs < 2:
        raise ValueError("--num-requests and --rounds must be >= 1, --warmup >= 0, --sweep-runs >= 2")
    if args.rate is not None and args.concurrency is not None:
        raise ValueError("--rate (open loop) and --concurrency (closed loop) exclude each other")
    if args.sweep and args.concurrency is not None:
        raise ValueError("--sweep searches over open-loop rates; drop --concurrency")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1], got {args.attainment}")
    if args.duration is not None and not args.duration > 0:
        raise ValueError(f"--duration must be > 0 seconds, got {args.duration}")
    args.rates = parse_rates(args.rate)
    args.slo_s = S.parse_slo(args.slo)
    args.layouts = [x.strip() for x in args.compare.split(",") if x.strip()]
    if not args.layouts:
        raise ValueError("--compare names no layout")
    args.trace_specs = None
    if args.trace is not None:  # read now: a bad file is refused before a model loads
        args.trace_specs, bad = W.read_trace(args.trace)
        for line in bad[:20]:
            print(f"splitnode bench serve: skipped {line}", file=sys.stderr)
        if len(bad) > 20:
            print(f"splitnode bench serve: skipped {len(bad) - 20} more bad rows", file=sys.stderr)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'splitnode[plot]'") from None


def parse_rates(text: str | None) -> list[float]:
    if text is None:
        return []
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < float("inf") for r in rates):
        raise ValueError(f"--rate: {text!r} is not one or more rates > 0, comma-separated (e.g. 2 or 1,2,4)")
    return rates


# -- the targets ----------------------------------------------------------------------------------------


class Target:
    """A runtime in this process, or a server behind its socket: requests, status, role moves."""

    def __init__(self, runner, devices: list[str]):
        self.runner, self.devices = runner, devices

    async def generate(self, prompt, params):
        async for ev in self.runner.generate(prompt, params):
            yield ev

    async def status(self) -> dict:
        st = self.runner.status()
        return await st if asyncio.iscoroutine(st) else st

    async def apply(self, layout: str) -> dict[str, str]:
        """Moves the devices to `layout`'s roles: those that change go through mixed first (a move
        from prompt to token could otherwise leave a phase without devices), pinned; `policy`
        unpins them for the autoscaler."""
        roles, free = layout_roles(layout, self.devices)
        now = {d["name"]: d["role"] for d in (await self.status())["devices"]}
        changing = [d for d in self.devices if now[d] != roles[d]]
        for d in changing:
            if now[d] != "mixed":
                await self.runner.assign(d, "mixed", "migrate", True)
        for d in self.devices:
            if roles[d] != "mixed" or d not in changing:
                await self.runner.assign(d, roles[d], "migrate", True)
        if free:
            for d in self.devices:
                result = self.runner.release(d)
                if asyncio.iscoroutine(result):
                    await result
        return roles


def _cpu_share(devices: list[str], cpu_threads: int | None) -> int | None:
    n = sum(d.startswith("cpu") for d in devices)
    if not n:
        return None
    return cpu_threads or max(1, len(os.sched_getaffinity(0)) // n)


async def _main(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from splitnode.runtime import Runtime, RuntimeConfig

    out = Report()
    alone: dict[tuple[int, int], S.Alone] = {}
    if args.socket is not None:
        from splitnode.api.client import Client

        async with Client(args.socket) as client:
            st = await client.status()
            devices = [d["name"] for d in st["devices"]]
            target = Target(client, devices)
            specs, prompts, base = _requests(args, st["runtime"]["max_model_len"], _vocab(None))
            out.header(args, devices, specs, f"server at {args.socket} ({st['runtime']['model']})")
            with out.progress() as bar:
                await _warm(target, prompts, specs, args.warmup)
                await measure_alone(target, prompts, specs, alone, bar.task("alone on the idle server", len(specs)))
                await _bench(args, target, specs, prompts, base, alone, out, bar)
        return out.finish(args)

    policy = "policy" in args.layouts
    cfg = RuntimeConfig(devices=args.devices, autoscale=policy, **engine_kwargs)
    devices = cfg.devices
    for name in args.layouts:
        layout_roles(name, devices)  # a bad layout fails before anything loads
    share = _cpu_share(devices, cfg.cpu_threads)
    alone_cfg = RuntimeConfig(devices=devices[:1], roles={devices[0]: "mixed"}, autoscale=False,
                              **{**engine_kwargs, "cpu_threads": share})
    async with Runtime(alone_cfg) as rt:
        specs, prompts, base = _requests(args, rt.max_model_len, _vocab(rt.tokenizer))
        out.header(args, devices, specs, f"{cfg.model or 'demo'} in this process", share)
        with out.progress() as bar:
            t = Target(rt, devices[:1])
            await _warm(t, prompts, specs, args.warmup)
            await measure_alone(t, prompts, specs, alone, bar.task(f"each request alone on {devices[0]}", len(specs)))
    async with Runtime(cfg) as rt:
        for w in rt.status()["runtime"]["warnings"]:
            print(f"splitnode bench serve: warning: {w}", file=sys.stderr)
        target = Target(rt, devices)
        with out.progress() as bar:
            await _warm(target, prompts, specs, args.warmup)
            await _bench(args, target, specs, prompts, base, alone, out, bar)
    return out.finish(args)


def _vocab(tokenizer) -> list[int]:
    """Prompt token ids: the byte tokens every tokenizer here has, minus specials (EOS never
    matters: it is ignored), so the same ids work on any model."""
    special = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    return [t for t in range(3, 256) if t not in special]


def _requests(args, max_len: int | None, vocab: list[int]):
    """The request list (the same for every layout, rate and round) and its base arrivals (unit
    rate for Poisson; the trace's own times otherwise)."""
    if args.trace is not None:
        specs = [W.fit(W.RequestSpec(max(1, round(s.prompt_len * args.scale)), max(1, round(s.output_len * args.scale)),
                                     s.arrival_s), max_len) for s in args.trace_specs[:args.num_requests]]
        base = W.trace_arrivals(specs, args.time_scale)
    else:
        specs = W.synthetic(args.workload, args.num_requests, args.scale, args.seed, max_len)
        base = W.poisson_arrivals(len(specs), 1.0, args.seed)
    return specs, W.prompt_ids(specs, vocab, args.seed), base


async def _warm(target, prompts, specs, n: int) -> None:
    if n:
        await run_load(target, prompts[:n], specs[:n], concurrency=min(n, 4))


def _arrivals(base: list[float], rate: float | None) -> list[float]:
    """`base` played at `rate` requests/s on average (None: as it is)."""
    if rate is None:
        return base
    span = base[-1] - base[0] if len(base) > 1 else 0.0
    mean_rate = (len(base) - 1) / span if span > 0 else 1.0
    return [t * mean_rate / rate for t in base]


async def _bench(args, target: Target, specs, prompts, base, alone, out: Report, bar) -> None:
    async def one_run(layout: str, rate: float | None, label: str) -> dict:
        roles = await target.apply(layout)
        before = await target.status()
        kw = ({"concurrency": args.concurrency or 8} if rate is None and args.trace is None
              else {"arrivals": _arrivals(base, rate)})
        results = await run_load(target, prompts, specs, duration_s=args.duration,
                                 on_done=bar.task(f"{label}: {layout}", len(specs)), **kw)
        after = await target.status()
        summary = S.summarize(results, alone, args.slo_s, args.attainment)
        summary["requests"] = [{"prompt_len": r.prompt_len, "output_len": r.output_len, "sent_s": r.sent_s,
                                "ttft_s": r.ttft if r.ok else None, "e2e_s": r.e2e if r.ok else None, "tpot_s": r.tpot,
                                "error": r.error} for r in results]
        summary.update(layout=layout, rate=rate, roles=roles, energy=energy_per_token(before, after, results),
                       transfers={k: after["transfers"][k] - before["transfers"][k]
                                  for k in ("bytes_moved", "num_sequences", "num_failed")})
        return summary

    if args.sweep:
        # The layouts' searches take turns (the lock is FIFO: each run waits for one of every other
        # layout), so a slow spell of the host weighs on all of them alike.
        start = args.sweep_start or len(target.devices) / statistics.mean(a.e2e for a in alone.values())
        turn = asyncio.Lock()

        async def search(layout: str) -> None:
            async def meets(rate: float) -> bool:
                async with turn:
                    s = await one_run(layout, rate, f"sweep {rate:.3g}/s")
                out.runs.append(s)
                return s["met"]

            good, history = await S.search_rate(meets, start, args.sweep_runs)
            out.goodput[layout] = {"rate": good, "per_device": good / len(target.devices), "runs": history}

        await asyncio.gather(*(search(layout) for layout in args.layouts))
        out.goodput = {layout: out.goodput[layout] for layout in args.layouts}
        return
    rates = args.rates or [None]
    for rate in rates:
        for rnd in range(args.rounds):
            for layout in args.layouts:
                label = (f"{rate:g}/s" if rate else ("trace" if args.trace else f"closed loop x{args.concurrency or 8}"))
                s = await one_run(layout, rate, label + (f" round {rnd + 1}" if args.rounds > 1 else ""))
                s["round"] = rnd
                out.runs.append(s)


def energy_per_token(before: dict, after: dict, results) -> dict:
    """Joules per output token per pool, from NVML's energy counters where every device of the
    pool has one; "n/a" otherwise (a CPU has none here: nothing is estimated)."""
    tokens = sum(len(r.token_s) for r in results if r.ok)
    pools: dict[str, list] = {}
    for b, a in zip(before["devices"], after["devices"]):
        e0, e1 = b.get("gpu", {}).get("energy_j"), a.get("gpu", {}).get("energy_j")
        pools.setdefault(a["role"], []).append(None if e0 is None or e1 is None else e1 - e0)
    out = {role: (sum(js) / tokens if tokens and None not in js else "n/a") for role, js in pools.items()}
    total = [j for js in pools.values() for j in js]
    out["all"] = sum(total) / tokens if tokens and total and None not in total else "n/a"
    return out


# -- what is printed -----------------------------------------------------------------------------------


def _ms(p: Percentiles | None) -> str:
    return "/".join(f"{p[q] * 1000:.0f}" for q in S.QUANTILES) if p else "-"


class Report:
    def __init__(self):
        self.runs: list[dict] = []
        self.goodput: dict[str, dict] = {}
        self.meta: dict = {}

    def header(self, args, devices, specs, what: str, share: int | None = None) -> None:
        p = sorted(s.prompt_len for s in specs)
        o = sorted(s.output_len for s in specs)
        source = str(args.trace) if args.trace else f"{args.workload} x{args.scale:g}"
        cores = f", {share} core(s) per CPU worker" if share else ""
        self.meta = {"devices": devices, "target": what, "workload": source, "num_requests": len(specs),
                     "prompt_median": p[len(p) // 2], "output_median": o[len(o) // 2], "slo": args.slo_s or "slowdown"}
        print(f"{what}; devices {','.join(devices)}{cores}", file=sys.stderr)
        print(f"{len(specs)} requests ({source}): prompts median {p[len(p) // 2]} (max {p[-1]}), outputs median "
              f"{o[len(o) // 2]} (max {o[-1]}) tokens; greedy, EOS ignored", file=sys.stderr)

    def progress(self):
        return _Progress()

    def finish(self, args) -> int:
        if self.runs:
            print(self.table(args))
        if self.goodput:
            print(self.goodput_table(args))
        if args.json is not None:
            args.json.write_text(json.dumps({"meta": self.meta, "runs": self.runs, "goodput": self.goodput},
                                            indent=1, default=str))
            print(f"wrote {args.json}", file=sys.stderr)
        if args.plot is not None:
            from splitnode.goodput.plot import plot

            plot(self.runs, args.plot, self.meta)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0

    def table(self, args) -> str:
        """One row per (rate, layout): the median round's figures, ratios against the first layout."""
        rows = [f"{'layout':<11}{'rate':>6}{'req/s':>7}{'tok/s':>8}{'TTFT p50/90/99 ms':>20}{'TBT p50/90/99 ms':>19}"
                f"{'E2E p50/90/99 ms':>20}  {'SLOs':<6}{'attain':>7}{'vs ' + args.layouts[0]:>14}"]
        by_rate: dict = {}
        for s in self.runs:
            by_rate.setdefault(s["rate"], {}).setdefault(s["layout"], []).append(s)
        for rate, layouts in by_rate.items():
            first = None
            for layout, runs in layouts.items():
                s = sorted(runs, key=lambda r: r["output_tokens_per_s"])[len(runs) // 2]
                first = first or s
                att = s.get("absolute", {}).get("attainment")
                ratio = s["output_tokens_per_s"] / max(first["output_tokens_per_s"], 1e-9)
                met = "met" if s["met"] else "missed"
                rows.append(f"{layout:<11}{(f'{rate:.3g}' if rate else '-'):>6}{s['requests_per_s']:>7.2f}"
                            f"{s['output_tokens_per_s']:>8.1f}{_ms(s['ttft_s']):>20}{_ms(s['tbt_s']):>19}"
                            f"{_ms(s['e2e_s']):>20}  {met:<6}{(f'{att:.0%}' if att is not None else '-'):>7}"
                            f"{f'{ratio:.2f}x tok/s':>14}")
                fails = s.get("slowdown", {}).get("failing", [])
                if fails and not s.get("absolute"):
                    rows.append(f"{'':<13}slowdown over the limits: {'; '.join(fails[:4])}")
                if s["num_failed"]:
                    rows.append(f"{'':<13}{s['num_failed']} failed: {'; '.join(s['errors'])}")
        return "\n".join(rows)

    def goodput_table(self, args) -> str:
        first = self.goodput[args.layouts[0]]["rate"]
        rows = [f"{'layout':<11}{'goodput req/s':>15}{'per device':>12}{'vs ' + args.layouts[0]:>16}  runs (rate: met)"]
        for layout, g in self.goodput.items():
            ratio = f"{g['rate'] / first:.2f}x" if first else "-"
            runs = " ".join(f"{r:.2f}:{'y' if ok else 'n'}" for r, ok in g["runs"])
            rows.append(f"{layout:<11}{g['rate']:>15.2f}{g['per_device']:>12.2f}{ratio:>16}  {runs}")
        return "\n".join(rows)


class _Progress:
    """A rich progress bar on stderr, one task per run; `task(...)` returns its advance callback."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=not sys.stderr.isatty())
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def task(self, description: str, total: int):
        tid = self.bar.add_task(description, total=total)
        return lambda *_: self.bar.advance(tid)

