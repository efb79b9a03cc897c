"""Soak: many clients misbehaving against one `splitnode serve` for a bounded time, then checks.

    python examples/soak.py                                  # 30 s, 32 clients, cpu:3, demo model
    python examples/soak.py --duration-s 1800 --clients 128  # the 30-minute soak of BENCHMARKS.md

Starts `splitnode serve` on a private Unix socket (or attaches to one with --socket) and runs
`--clients` clients until `--duration-s` or `--max-requests`. Each request is one behaviour,
drawn at random: read to the end, cancel mid-stream, leave the stream early, read slowly, drop the
connection mid-stream, send a request and vanish, pipeline a burst of pings. Another task moves a
device to a random role every `--role-change-every-s`. Loopback only: nothing leaves the machine.

At the end it checks, and exits 1 if any check fails:
- lost 0: every request ended (a final event, or an error the server sent), none hung;
- greedy outputs unchanged: a sample of the completed requests, re-run alone, gives the same tokens;
- 0 KV blocks used or reserved on any device once the server is idle;
- the server's idle RSS grew by at most --max-rss-growth-mib from its idle size after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from splitnode.api import protocol as p
from splitnode.api.client import Client

BEHAVIOURS = ("complete", "cancel", "leave", "slow", "disconnect", "vanish", "pings")
REQUEST_TIMEOUT_S = 300.0  # a request still open after this is lost (a hang)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The checks and the figures are printed at the end; exit 1 if a check fails.")
    ap.add_argument("--duration-s", type=float, default=30.0, help="how long clients send (default: %(default)s)")
    ap.add_argument("--max-requests", type=int, default=None, help="stop after this many requests in all")
    ap.add_argument("--rounds", type=int, default=1,
                    help="split the duration into this many load rounds, the server's idle RSS read after "
                         "each (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default: %(default)s)")
    ap.add_argument("--devices", default="cpu:3", help="serve --devices (default: %(default)s)")
    ap.add_argument("--num-kv-blocks", type=int, default=256, help="serve --num-kv-blocks (default: %(default)s)")
    ap.add_argument("--role-change-every-s", type=float, default=5.0,
                    help="move a device to a random role this often; 0: never (default: %(default)s)")
    ap.add_argument("--socket", type=Path, default=None, help="attach to this running server instead of starting one")
    ap.add_argument("--sample", type=int, default=16, help="greedy requests re-run alone at the end (default: %(default)s)")
    ap.add_argument("--max-rss-growth-mib", type=float, default=512.0,
                    help="idle RSS growth allowed over the run (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return ap.parse_args(argv)


class Soak:
    def __init__(self, args: argparse.Namespace, path: Path):
        self.args = args
        self.path = path
        self.rng = random.Random(args.seed)
        self.prompts = [[self.rng.randrange(3, 256) for _ in range(self.rng.randint(16, 600))] for _ in range(48)]
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.lost = 0
        self.completed: dict[tuple[int, int], list[int]] = {}  # (prompt index, max_tokens) -> tokens
        self.changed: list[tuple[int, int]] = []
        self.num_requests = 0
        self.role_changes = collections.Counter()
        self.deadline = 0.0

    def _more(self) -> bool:
        limit = self.args.max_requests
        return time.monotonic() < self.deadline and (limit is None or self.num_requests < limit)

    async def run(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.args.clients)]
        mover = asyncio.ensure_future(self._move_roles()) if self.args.role_change_every_s > 0 else None
        await asyncio.gather(*tasks)
        if mover is not None:
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)

    async def _client(self, i: int) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        async with Client(self.path) as c:
            while self._more():
                self.num_requests += 1
                behaviour = rng.choice(BEHAVIOURS)
                self.counts[behaviour] += 1
                try:
                    await asyncio.wait_for(self._one(c, behaviour, rng), REQUEST_TIMEOUT_S)
                except asyncio.TimeoutError:
                    self.lost += 1
                except p.RemoteError as e:
                    self.errors[f"{behaviour}: {e.type}"] += 1
                except (ConnectionError, OSError) as e:
                    self.errors[f"{behaviour}: {type(e).__name__}"] += 1
                if c.error is not None:  # this client's connection broke: the server's fault
                    self.errors["client connection broke"] += 1
                    return

    async def _one(self, c: Client, behaviour: str, rng: random.Random) -> None:
        k = rng.randrange(len(self.prompts))
        n = rng.randint(4, 64)
        params = {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}
        if behaviour == "complete":
            events = [ev async for ev in c.generate(self.prompts[k], params)]
            if events[-1].finish_reason == "length":
                self._check_or_keep((k, n), events[-1].token_ids)
        elif behaviour in ("cancel", "leave", "slow"):
            stop_at = rng.randint(1, n)
            async for ev in c.generate(self.prompts[k], params):
                if behaviour == "slow":
                    await asyncio.sleep(0.02)  # load shaping: a reader slower than the server
                elif len(ev.token_ids) >= stop_at and not ev.finished:
                    if behaviour == "cancel":
                        await c.cancel(ev.request_id)  # the stream then ends "abort"
                    else:
                        break  # leaving the loop cancels it
        elif behaviour == "disconnect":
            other = Client(self.path)
            await other.connect()
            stop_at = rng.randint(1, n)
            async for ev in other.generate(self.prompts[k], params):
                if len(ev.token_ids) >= stop_at:
                    break
            other._writer.transport.abort()  # gone without a goodbye
            await other.close()
        elif behaviour == "vanish":
            await asyncio.to_thread(self._send_and_vanish, self.prompts[k], params)
        else:  # pings: a pipelined burst on this connection
            answers = await asyncio.gather(*(c.ping() for _ in range(rng.randint(10, 80))))
            assert all(a == "pong" for a in answers)

    def _send_and_vanish(self, prompt, params) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.path))
            s.sendall(p.pack([p.REQUEST, 1, "generate", [prompt, params]]))

    def _check_or_keep(self, key: tuple[int, int], tokens: list[int]) -> None:
        seen = self.completed.setdefault(key, tokens)
        if seen != tokens:
            self.changed.append(key)

    async def _move_roles(self) -> None:
        rng = random.Random(self.args.seed + 7)
        async with Client(self.path) as c:
            devices = [d["name"] for d in (await c.status())["devices"]]
            while True:
                await asyncio.sleep(self.args.role_change_every_s)
                dev, role = rng.choice(devices), rng.choice(("prompt", "token", "mixed"))
                try:
                    await asyncio.wait_for(c.assign(dev, role, rng.choice(("migrate", "drain")), pin=False),
                                           REQUEST_TIMEOUT_S)
                    self.role_changes["done"] += 1
                except p.RemoteError:
                    self.role_changes["refused"] += 1  # it would leave a phase without workers
                except asyncio.TimeoutError:
                    self.role_changes["hung"] += 1

    async def rerun_alone(self) -> list[tuple[int, int]]:
        """Greedy outputs are a function of the request: re-run a sample with nothing else running."""
        keys = sorted(self.completed)
        sample = random.Random(self.args.seed).sample(keys, min(self.args.sample, len(keys)))
        changed = []
        async with Client(self.path) as c:
            for k, n in sample:
                params = {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}
                events = [ev async for ev in c.generate(self.prompts[k], params)]
                if events[-1].token_ids != self.completed[(k, n)]:
                    changed.append((k, n))
        return changed


async def idle_status(path: Path, timeout_s: float = 120.0) -> dict:
    """The server's status once nothing is in flight (bounded)."""
    async with Client(path) as c:
        for _ in range(int(timeout_s / 0.1)):
            st = await c.status()
            if st["requests"]["active"] == 0 and all(not d["arriving"] for d in st["devices"]):
                return st
            await asyncio.sleep(0.1)
        return await c.status()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def idle_rss(pid: int, settle_s: float = 6.0) -> float:
    """RSS once idle long enough for the server to trim its heap (runtime.IDLE_TRIM_S); the lowest
    of a few readings."""
    readings = []
    for _ in range(int(settle_s / 0.5)):
        await asyncio.sleep(0.5)
        readings.append(rss_mib(pid))
    return min(readings)


async def wait_for_server(path: Path, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    for _ in range(int(timeout_s / 0.2)):
        if proc.poll() is not None:
            raise RuntimeError(f"splitnode serve exited with {proc.returncode} before it served")
        try:
            async with Client(path) as c:
                await c.ping()
            return
        except (ConnectionError, OSError):
            await asyncio.sleep(0.2)
    raise RuntimeError(f"splitnode serve did not answer on {path} within {timeout_s:.0f} s")


async def main_async(args: argparse.Namespace) -> int:
    proc = None
    tmp = None
    path = args.socket
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="splitnode-soak-")
        os.chmod(tmp.name, 0o700)
        path = Path(tmp.name) / "soak.sock"
        cmd = [sys.executable, "-c", "from splitnode.cli import main; raise SystemExit(main())", "serve",
               "--socket", str(path), "--devices", args.devices, "--num-kv-blocks", str(args.num_kv_blocks)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if proc is not None:
            await wait_for_server(path, proc)
        soak = Soak(args, path)
        # warm-up: one of each prompt length class, so the idle baseline counts the model and caches
        async with Client(path) as c:
            for prompt in soak.prompts[:4]:
                [ev async for ev in c.generate(prompt, {"max_tokens": 8, "temperature": 0.0})]
        rss0 = await idle_rss(proc.pid) if proc is not None else None
        sys.stderr.write(f"soak: {args.clients} clients for {args.duration_s:.0f} s against {path}\n")
        rss_rounds, seconds = [], 0.0
        for _ in range(args.rounds):
            t0 = time.monotonic()
            await soak.run(args.duration_s / args.rounds)
            seconds += time.monotonic() - t0
            await idle_status(path)
            if proc is not None:
                rss_rounds.append(round(await idle_rss(proc.pid), 1))
        changed = soak.changed + await soak.rerun_alone()
        st = await idle_status(path)
        rss1 = await idle_rss(proc.pid) if proc is not None else None
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    held = {d["name"]: (d["kv_blocks_used"], d["kv_blocks_reserved"]) for d in st["devices"]}
    checks = {
        "lost 0": soak.lost == 0 and soak.role_changes["hung"] == 0,
        "greedy outputs unchanged": not changed,
        "0 KV blocks used or reserved": all(u == 0 and r == 0 for u, r in held.values()),
        "no worker failed": all(d["error"] is None for d in st["devices"]),
        "no broken client connection": soak.errors["client connection broke"] == 0,
    }
    if rss0 is not None:
        checks[f"idle RSS growth <= {args.max_rss_growth_mib:.0f} MiB"] = rss1 - rss0 <= args.max_rss_growth_mib
    figures = {
        "seconds": round(seconds, 1), "clients": args.clients, "devices": args.devices,
        "requests": soak.num_requests, "by_behaviour": dict(soak.counts), "lost": soak.lost,
        "errors": dict(soak.errors), "role_changes": dict(soak.role_changes),
        "greedy_checked": len(soak.completed), "greedy_changed": len(changed),
        "kv_blocks_held_at_idle": held, "rss_idle_mib_before": rss0 and round(rss0, 1),
        "rss_idle_mib_after": rss1 and round(rss1, 1), "rss_idle_mib_by_round": rss_rounds,
        "finished_server_side": st["requests"]["finished"],
        "checks": checks,
    }
    print(f"soak: {soak.num_requests} requests from {args.clients} clients in {seconds:.0f} s on {args.devices}; "
          f"lost {soak.lost}; errors {sum(soak.errors.values())} {dict(soak.errors) or ''}")
    print(f"      behaviours {dict(soak.counts)}; role changes {dict(soak.role_changes)}")
    print(f"      greedy outputs re-checked {len(soak.completed)} distinct, changed {len(changed)}; "
          f"KV blocks held at idle {held}")
    if rss0 is not None:
        print(f"      server idle RSS {rss0:.0f} MiB -> {rss1:.0f} MiB ({rss1 - rss0:+.0f} MiB); "
              f"after each round {rss_rounds}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(checks.values()) else 1


def main(argv=None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
