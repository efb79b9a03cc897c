"""`splitnode up` (the runtime in this process, its socket, and the dashboard) and `splitnode dash`
(the dashboard attached to a running server). cli.py wires them in, as it does the others."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

UP_DESCRIPTION = ("Start the phase-split runtime on DEVICES in this process, serve it on a Unix socket (so "
                  "`splitnode dash`, `splitnode status` and other clients can attach) and open the dashboard. "
                  "q in the dashboard stops everything and removes the socket.")
DASH_DESCRIPTION = "Open the dashboard on a running server (`splitnode up` or `splitnode serve`) through its socket."


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    from splitnode.api.commands import add_serve_arguments

    add_serve_arguments(parser)  # the runtime and its socket, as `serve` takes them
    parser.add_argument("--load", action="store_true",
                        help="start the dashboard's load generator at once (default: off; l toggles it)")


def add_dash_arguments(parser: argparse.ArgumentParser) -> None:
    from splitnode.api.commands import add_socket_arg

    add_socket_arg(parser)


def up(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from splitnode.api.commands import run_server

    return run_server("up", lambda config, path, grace_s, http: _up(config, path, args.load, grace_s, http), args,
                      engine_kwargs)


def dash(args: argparse.Namespace) -> int:
    from splitnode.api import protocol as p
    from splitnode.runtime import run_event_loop

    try:
        return run_event_loop(_dash(args.socket or p.default_socket_path()))
    except (OSError, p.RemoteError) as e:  # no server there (ServerNotRunning is a ConnectionError)
        print(f"splitnode dash: error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2



async def _up(config, path: Path, load: bool, shutdown_grace_s: float = 0.0, http: list | None = None) -> int:
    from splitnode.api.commands import serving
    from splitnode.tui.app import Dashboard
    from splitnode.tui.backend import LocalBackend

    # each worker's load line is shown here, before the dashboard owns the terminal
    async with serving(config, path, worker_progress=True, shutdown_grace_s=shutdown_grace_s,
                       http=http) as (rt, seconds, stop):
        roles = ", ".join(f"{d}={r}" for d, r in config.roles.items())
        print(f"splitnode: loaded in {seconds:.1f}s; {roles}; serving on {path}", file=sys.stderr, flush=True)
        app = Dashboard(LocalBackend(rt, where=f"in-process, socket {path}"), load=load)
        # SIGTERM (or SIGINT) stops `up` as q does: the app exits and gives the terminal back, then
        # the same shutdown runs (and a second signal cuts its grace short).
        on_stop = asyncio.get_running_loop().create_task(_exit_on(stop, app))
        try:
            await app.run_async()
        finally:
            on_stop.cancel()
    print("splitnode: stopped", file=sys.stderr)
    return 0


async def _exit_on(stop: asyncio.Event, app) -> None:
    await stop.wait()
    app.exit()


async def _dash(path: Path) -> int:
    from splitnode.api.client import Client
    from splitnode.tui.app import Dashboard
    from splitnode.tui.backend import RemoteBackend

    client = Client(path)
    await client.connect()
    backend = RemoteBackend(client, where=f"attached to {path}")  # it may replace the client: it closes it
    try:
        await client.status()  # fail here, with the server's reason, rather than inside the dashboard
        await Dashboard(backend).run_async()
    finally:
        await backend.close()
    return 0
