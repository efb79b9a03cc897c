"""The socket's subcommands: `splitnode serve` (runtime + socket, no dashboard) and the client
commands `status`, `assign`, `release`. cli.py wires them in, as it does bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from splitnode.api import protocol as p

SERVE_DESCRIPTION = ("Start the phase-split runtime on DEVICES and serve it on a Unix socket (msgpack-RPC), "
                     "and with --http / --http-uds the OpenAI-compatible API, without the dashboard. Runs until "
                     "SIGINT (Ctrl-C) or SIGTERM, then stops accepting, lets open requests finish for "
                     "--shutdown-grace-s and ends the rest with a 'shutting down' error. "
                     "Refuses to start where a server already answers on the socket; a stale socket is removed.")
DEFAULT_SHUTDOWN_GRACE_S = 10.0


def add_socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None, metavar="PATH",
                        help=f"the server's Unix socket (default: {p.default_socket_path()})")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default=None,
                        help="devices to run on: cuda (all GPUs), cuda:0,cuda:2, or cpu:N for N CPU workers "
                             "(default: cuda if a GPU is visible, else cpu:3)")
    parser.add_argument("--roles", default=None, metavar="DEV=ROLE,...",
                        help="initial roles, e.g. cpu:0=prompt,cpu:1=token; roles are prompt, token, mixed "
                             "(default: a third of the devices prompt, the rest token; one device mixed)")
    parser.add_argument("--autoscale", action=argparse.BooleanOptionalAction, default=True,
                        help="let the policy borrow and re-purpose devices that no one pinned (default: %(default)s)")
    parser.add_argument("--power-cap", default=None, metavar="ROLE=WATTS,...",
                        help="cap the power limit of the GPUs of a role through NVML, e.g. token=450; set at start "
                             "and on every role change, restored on exit; needs root on most systems (default: off)")
    parser.add_argument("--shutdown-grace-s", type=_seconds, default=DEFAULT_SHUTDOWN_GRACE_S, metavar="S",
                        help="on stopping, how long open requests may take to finish before each is ended with a "
                             "'shutting down' error; a second Ctrl-C or SIGTERM ends them at once (default: %(default)s)")
    add_socket_arg(parser)
    add_http_arguments(parser)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("OpenAI-compatible HTTP and Prometheus")
    group.add_argument("--http", type=_address, default=None, metavar="HOST:PORT",
                       help="also serve the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, "
                            "/health, /metrics) over HTTP there; a port alone is 127.0.0.1:PORT; a host beyond "
                            "loopback gets a warning (default: off)")
    group.add_argument("--http-uds", type=Path, default=None, metavar="PATH",
                       help="the same HTTP API on a Unix socket (0600, in a folder only you may write to, as --socket); "
                            "may be given with --http (default: off)")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on the /v1 routes (default: $SPLITNODE_API_KEY, "
                            "else none)")
    group.add_argument("--metrics-port", type=_address, default=None, metavar="[HOST:]PORT",
                       help="serve Prometheus's /metrics alone there (127.0.0.1 for a port alone), with or without "
                            "--http, whose /metrics is the same (default: off)")


def _address(text: str) -> tuple[str, int]:
    from splitnode.api.http import parse_address

    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def http_servers(args: argparse.Namespace) -> list:
    """The HTTP servers the flags ask for, not yet bound: the API (TCP and/or Unix socket), then
    the metrics-only one. Imported only when asked for (aiohttp is not the client commands' cost)."""
    if not (args.http or args.http_uds or args.metrics_port):
        return []
    from splitnode.api.http import HTTPServer

    servers = []
    if args.http or args.http_uds:
        api_key = args.api_key if args.api_key is not None else os.environ.get("SPLITNODE_API_KEY") or None
        servers.append(HTTPServer([args.http] if args.http else [], args.http_uds, api_key=api_key))
    if args.metrics_port:
        servers.append(HTTPServer([args.metrics_port], metrics_only=True))
    return servers


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def parse_roles(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    roles = {}
    for item in spec.split(","):
        device, sep, role = item.strip().partition("=")
        if not sep or not device or not role:
            raise ValueError(f"--roles: {item!r} is not DEVICE=ROLE (e.g. cpu:0=prompt)")
        roles[device] = role
    return roles


def parse_power_caps(spec: str | None) -> dict[str, float] | None:
    if not spec:
        return None
    caps = {}
    for item in spec.split(","):
        role, sep, watts = item.strip().partition("=")
        try:
            value = float(watts.strip().rstrip("Ww"))  # "450" or "450W"
        except ValueError:
            value = None
        if not sep or not role or value is None:
            raise ValueError(f"--power-cap: {item!r} is not ROLE=WATTS (e.g. token=450)")
        caps[role.strip()] = value
    return caps


def serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    return run_server("serve", _serve, args, engine_kwargs)


def run_server(command: str, main, args: argparse.Namespace, engine_kwargs: dict) -> int:
    """`serve` and `up`: the RuntimeConfig from the flags (bad values fail here, before the model
    loads), then `main(config, socket_path, shutdown_grace_s)` on the event loop, and the start-up
    errors that are the user's to fix as one line and exit 2."""
    from splitnode.runtime import RuntimeConfig, run_event_loop

    config = RuntimeConfig(devices=args.devices, roles=parse_roles(args.roles), autoscale=args.autoscale,
                           power_caps=parse_power_caps(args.power_cap), **engine_kwargs)
    try:
        return run_event_loop(main(config, args.socket or p.default_socket_path(), args.shutdown_grace_s,
                                   http_servers(args)))
    except (p.SocketInUse, PermissionError, FileExistsError) as e:
        print(f"splitnode {command}: error: {e}", file=sys.stderr)
        return 2
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("splitnode: interrupted", file=sys.stderr)
        return 130


@contextlib.asynccontextmanager
async def serving(config, path: Path, worker_progress: bool = False, shutdown_grace_s: float = 0.0,
                  http: list | None = None):
    """What `serve` and `up` both run in: the socket checked free (before minutes of loading, not
    after), the runtime loaded, the socket served. Yields (runtime, seconds the start took, stop):
    `stop` is set by the first SIGINT or SIGTERM. On the way out the server shuts down (open
    requests get `shutdown_grace_s`; a second signal cuts it short), then the runtime stops.
    `worker_progress` prints each worker's load line (the runtime logs them), for a caller about
    to hand the terminal to a dashboard. `http`: HTTPServers (`http_servers`), bound here with the
    socket's check and served once the socket is, sharing one set of metrics; they stop with it."""
    from splitnode.api import server, socket_file
    from splitnode.plan.predict import Predictor
    from splitnode.runtime import Runtime

    socket_file.prepare_socket_dir(path)
    await socket_file.check_socket_free(path)
    http = http or []
    await _bind_http(http)
    t0 = time.perf_counter()
    rt = Runtime(config, predictor=Predictor(config))  # status() gains the predicted goodput of its layout
    try:
        with _interrupt_on_signals(), (
                _log_to_stderr(logging.getLogger("splitnode")) if worker_progress else contextlib.nullcontext()):
            print(f"splitnode: loading {config.model or 'the demo model'} on {', '.join(config.devices)} ...",
                  file=sys.stderr, flush=True)
            await rt.start()
    except BaseException:
        await asyncio.gather(*(h.close() for h in http))
        raise
    try:
        servers = [await server.serve(rt, path)]
        stop = asyncio.Event()
        with _stop_signals(stop, servers):
            try:
                await _start_http(rt, http, servers)
                yield rt, time.perf_counter() - t0, stop
            finally:
                await _shut_down(servers, shutdown_grace_s)
    finally:
        await asyncio.gather(*(h.close() for h in http))  # bound and never started (the socket failed)
        await rt.stop()


async def _bind_http(http: list) -> None:
    """Before the model loads, as the socket's check: a taken port fails now, not minutes later."""
    try:
        for h in http:
            await h.bind()
    except BaseException:
        await asyncio.gather(*(h.close() for h in http))
        raise
    from splitnode.api.http import is_loopback

    for h in http:
        for host, port in h.tcp:
            if not is_loopback(host):
                what = "read the metrics" if h.metrics_only else "generate" + ("" if h.api_key else " (no --api-key)")
                print(f"splitnode: warning: HTTP on {host}:{port} is reachable beyond this machine: anyone who can "
                      f"reach it can {what}", file=sys.stderr, flush=True)


async def _start_http(rt, http: list, servers: list) -> None:
    from splitnode.api.metrics import Metrics

    if not http:
        return
    metrics = Metrics(rt)
    for h in http:
        servers.append(h)
        await h.start(rt, metrics)
        for url in h.urls:
            print(f"splitnode: {'Prometheus /metrics' if h.metrics_only else 'OpenAI-compatible HTTP'} on {url}",
                  file=sys.stderr, flush=True)


@contextlib.contextmanager
def _interrupt_on_signals():
    """While the model loads (nothing served yet), SIGINT or SIGTERM interrupts the start as
    Ctrl-C does (`run_server` says so and exits 130) instead of killing the process mid-load."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def _stop_signals(stop: asyncio.Event, servers: list):
    """The first SIGINT or SIGTERM sets `stop`; the next one (or the first once the shutdown has
    begun, after `q` in `up`) ends the shutdown's grace: each open request still gets its
    "shutting down" error, and the exit status is still 0. After that they are Python's own, for
    a shutdown that hangs."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        if not stop.is_set() and not any(s.stopping for s in servers):
            stop.set()
            return
        for s in servers:
            s.hurry()
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _shut_down(servers: list, grace_s: float) -> None:
    """Every server at once (the msgpack socket's and the HTTP ones): one grace for all."""
    open_requests = sum(s.open_requests for s in servers)
    if open_requests and grace_s > 0:
        print(f"splitnode: stopping; {open_requests} open request(s) get up to {grace_s:g}s to finish "
              f"(Ctrl-C ends them now)", file=sys.stderr, flush=True)
    await asyncio.gather(*(s.shutdown(grace_s) for s in servers))


@contextlib.contextmanager
def _log_to_stderr(logger: logging.Logger):
    """The logger's INFO lines on stderr, for as long as the context lasts."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("splitnode: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _serve(config, path: Path, shutdown_grace_s: float, http: list | None = None) -> int:
    async with serving(config, path, shutdown_grace_s=shutdown_grace_s, http=http) as (rt, seconds, stop):
        roles = ", ".join(f"{d}={r}" for d, r in config.roles.items())
        print(f"splitnode: loaded in {seconds:.1f}s; {roles}", file=sys.stderr)
        print(f"splitnode: serving on {path} (Ctrl-C stops)", file=sys.stderr, flush=True)
        await stop.wait()
    print("splitnode: stopped", file=sys.stderr)
    return 0


# -- client commands --------------------------------------------------------------------------------------

def call(args: argparse.Namespace, fn):
    """Runs `fn(client)` against the server; a missing server or an error answer is one line, exit 2."""
    from splitnode.api.client import Client

    async def go():
        async with Client(args.socket) as c:
            return await fn(c)

    try:
        return 0, asyncio.run(go())
    except (OSError, p.RemoteError) as e:
        print(f"splitnode {args.command}: error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2, None


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the status as JSON instead of a table")
    add_socket_arg(parser)


def status(args: argparse.Namespace) -> int:
    rc, st = call(args, lambda c: c.status())
    if rc == 0:
        print(json.dumps(st, indent=2) if args.json else format_status(st))
    return rc


def add_assign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", metavar="DEVICE", help="a device of the server, e.g. cuda:1 or cpu:0")
    parser.add_argument("role", metavar="ROLE", choices=["prompt", "token", "mixed"], help="prompt, token or mixed")
    parser.add_argument("--mode", choices=["migrate", "drain"], default="migrate",
                        help="what happens to the device's work of the old kind: migrate moves it to another "
                             "device now, drain lets it finish here first (default: %(default)s)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="leave the device unpinned (a pin set before is released), so the autoscaling policy "
                             "may move it again (default: pinned until release)")
    add_socket_arg(parser)


def assign(args: argparse.Namespace) -> int:
    rc, _ = call(args, lambda c: c.assign(args.device, args.role, args.mode, args.pin))
    if rc == 0:
        print(f"{args.device}: {args.role} " + ("(pinned)" if args.pin else "(not pinned: the autoscaling policy may move it)"))
    return rc


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", metavar="DEVICE", help="a device of the server, e.g. cuda:1 or cpu:0")
    add_socket_arg(parser)


def release(args: argparse.Namespace) -> int:
    rc, _ = call(args, lambda c: c.release(args.device))
    if rc == 0:
        print(f"{args.device}: released (the autoscaling policy may move it)")
    return rc


def format_status(st: dict) -> str:
    from splitnode.runtime.status import format_ms, format_prediction

    header = ("DEVICE", "ROLE", "PIN", "KV USED/TOTAL", "RESERVED", "WAITING", "RUNNING", "ARRIVING", "BATCH")
    rows = []
    for d in st["devices"]:
        role = d["role"] + (f" -> {d['target_role']}" if d.get("target_role") else "")
        if d.get("borrowed_from"):
            role += f" (from {d['borrowed_from']})"
        used, total = d["kv_blocks_used"], d["kv_blocks_total"]
        rows.append((d["name"], role, "yes" if d["pinned"] else "", f"{used}/{total} ({100 * used / max(total, 1):.0f}%)",
                     str(d["kv_blocks_reserved"]), str(d["waiting"]), str(d["running"]), str(d["arriving"]),
                     f"{d['batch_size']} seq / {d['batch_tokens']} tok"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    for d in st["devices"]:
        if d.get("error"):
            lines.append(f"{d['name']} failed: {d['error']}")
    req = st["requests"]
    ttft, tbt = (format_ms(req.get(key), sep="/") for key in ("ttft_s", "tbt_s"))
    lines.append(f"requests: {req['active']} active, {req['finished']} finished; TTFT p50/p90/p99 {ttft}; TBT {tbt}")
    t = st["transfers"]
    lines.append(f"transfers: {t['num_sequences']} sequences, {t['num_transfers']} moves, "
                 f"{t['bytes_moved'] / 2**20:.1f} MiB, {t['num_failed']} failed, {t['in_flight']} in flight")
    lines.append(format_prediction(st.get("prediction")))
    return "\n".join(lines)
