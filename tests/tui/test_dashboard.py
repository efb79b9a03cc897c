"""The dashboard driven by Textual's pilot against a real Runtime on three CPU workers (the demo
model): what the table shows is what status() says, keys move roles, a refused move is a
notification, and the load generator sends real requests."""

from __future__ import annotations

import asyncio

from polling import wait_for
from textual.notifications import Notify

from splitnode.tui.app import Dashboard, HelpScreen
from splitnode.tui.backend import LocalBackend, RemoteBackend

SIZE = (120, 35)


def cell(app, device: str, column: str) -> str:
    return str(app.query_one("#devices").get_cell(device, column))


def roles(rt) -> dict[str, str]:
    return {d["name"]: d["role"] for d in rt.status()["devices"]}


async def test_rows_show_roles_and_kv_blocks_from_status(rt):
    app = Dashboard(LocalBackend(rt))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.query_one("#devices").row_count == 3)
        for dev in rt.status()["devices"]:
            assert cell(app, dev["name"], "role") == dev["role"]
            assert cell(app, dev["name"], "kv").endswith(f" {dev['kv_blocks_used']}/{dev['kv_blocks_total']}")
            assert cell(app, dev["name"], "power") == "n/a (cpu)"
            assert cell(app, dev["name"], "memory") == "n/a (cpu)"
        assert [cell(app, f"cpu:{i}", "kv") for i in range(3)] == ["░░░░░░░ 0/256"] * 3
        header = str(app.query_one("#header").content)
        assert "3 devices: 1 prompt · 2 token · 0 mixed" in header and "in-process" in header
        pools = str(app.query_one("#pools").content)
        assert "prompt 1  cpu:0" in pools and "token  2  cpu:1 cpu:2" in pools and "borrow>8192" in pools
        assert "energy  n/a (cpu)" in str(app.query_one("#requests").content)


async def test_keys_move_the_selected_device_and_release_its_pin(rt):
    app = Dashboard(LocalBackend(rt))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.query_one("#devices").row_count == 3)
        await pilot.press("j", "p")  # cpu:1: token -> prompt
        await wait_for(pilot, lambda: roles(rt)["cpu:1"] == "prompt" and cell(app, "cpu:1", "role") == "prompt pinned")
        assert rt.status()["devices"][1]["pinned"]
        assert app.query_one("#devices").cursor_row == 1

        await pilot.press("r")
        await wait_for(pilot, lambda: cell(app, "cpu:1", "role") == "prompt")
        assert not rt.status()["devices"][1]["pinned"]

        await pilot.press("down", "X")  # shift: drain mode, cpu:2 -> mixed
        await wait_for(pilot, lambda: roles(rt)["cpu:2"] == "mixed")
        assert rt.worker("cpu:2").mode == "drain"

        await pilot.press("d", "k", "k", "x")  # drain as the default now; cpu:0 -> mixed
        assert "role changes: drain" in str(app.query_one("#header").content)
        await wait_for(pilot, lambda: roles(rt)["cpu:0"] == "mixed")
        assert rt.worker("cpu:0").mode == "drain"
        assert roles(rt) == {"cpu:0": "mixed", "cpu:1": "prompt", "cpu:2": "mixed"}
        await wait_for(pilot, lambda: "0 token" in str(app.query_one("#header").content))


async def test_refused_move_is_a_notification_and_changes_nothing(rt):
    notes = []
    app = Dashboard(LocalBackend(rt))

    def hook(message):
        if isinstance(message, Notify):
            notes.append(message.notification)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await wait_for(pilot, lambda: app.query_one("#devices").row_count == 3)
        await pilot.press("t")  # cpu:0 is the only prompt worker
        await wait_for(pilot, lambda: any(n.severity == "error" for n in notes))
        (note,) = [n for n in notes if n.severity == "error"]
        assert note.title == "cpu:0 → token refused"
        assert "no worker could run the prompt phase" in note.message
        assert roles(rt) == {"cpu:0": "prompt", "cpu:1": "token", "cpu:2": "token"}
        assert not any(d["pinned"] or d["target_role"] for d in rt.status()["devices"])
        assert app.is_running


async def test_load_generator_sends_real_requests_until_stopped(rt):
    app = Dashboard(LocalBackend(rt), load_rate=8.0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("l")
        await wait_for(pilot, lambda: rt.status()["requests"]["finished"] >= 4, timeout_s=30)
        st = rt.status()
        assert st["requests"]["num_generated_tokens"] >= 4 * 16
        assert st["transfers"]["num_sequences"] >= 4  # prefilled on cpu:0, decoded on a token worker
        await wait_for(pilot, lambda: "throughput  -" not in str(app.query_one("#requests").content))
        assert "load: on, 8 req/s" in str(app.query_one("#header").content)
        await pilot.press("plus")
        assert app.load.rate == 16.0
        await pilot.press("l")
        await wait_for(pilot, lambda: rt.status()["requests"]["active"] == 0)
        sent = app.load.num_sent
        assert app.load.num_done >= 4 and app.load.num_failed == 0
        assert "load: off" in str(app.query_one("#header").content)
        await pilot.pause(0.3)
        assert app.load.num_sent == sent  # stopped: nothing more is sent
    assert all(d["kv_blocks_used"] == 0 for d in rt.status()["devices"])


async def test_help_opens_and_closes_and_q_quits(rt):
    app = Dashboard(LocalBackend(rt))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("h")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("h")
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, timeout_s=5)


async def test_attached_over_the_socket(rt, tmp_path):
    from splitnode.api.client import Client
    from splitnode.api.server import serve

    notes = []
    srv = await serve(rt, tmp_path / "s.sock")
    try:
        async with Client(tmp_path / "s.sock") as client:
            app = Dashboard(RemoteBackend(client, where="attached"))

            def hook(message):
                if isinstance(message, Notify):
                    notes.append(message.notification)

            async with app.run_test(size=SIZE, message_hook=hook) as pilot:
                await wait_for(pilot, lambda: app.query_one("#devices").row_count == 3)
                assert cell(app, "cpu:2", "role") == "token"
                await pilot.press("t")  # refused: the server's reason comes back
                await wait_for(pilot, lambda: any(n.severity == "error" for n in notes))
                assert "no worker could run the prompt phase" in notes[-1].message
                await pilot.press("down", "down", "x")
                await wait_for(pilot, lambda: cell(app, "cpu:2", "role") == "mixed pinned")
                assert roles(rt)["cpu:2"] == "mixed"
    finally:
        await srv.close()


class WarningBackend(LocalBackend):
    """The real runtime's status with one runtime warning in it, whatever this machine's cores."""

    warning = "3 CPU workers on 2 cores: the workers share cores"

    def __init__(self, rt):
        super().__init__(rt)
        self.num_samples = 0

    async def status(self):
        st = await super().status()
        st["runtime"]["warnings"] = [self.warning]
        self.num_samples += 1
        return st


async def test_a_runtime_warning_is_a_toast_shown_once(rt):
    notes = []
    backend = WarningBackend(rt)
    app = Dashboard(backend, poll_s=0.02)

    def hook(message):
        if isinstance(message, Notify):
            notes.append(message.notification)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await wait_for(pilot, lambda: backend.num_samples >= 6)  # the same warning in every sample
    assert [(n.title, n.message) for n in notes if n.severity == "warning"] == [("runtime", WarningBackend.warning)]


async def test_the_prediction_line_says_what_it_waits_for_then_what_is_missing(tmp_path):
    """A real runtime with a predictor: the line under the requests in flight shows its status:
    first the traffic it waits for, then (with no profile at the path given) how to measure one."""
    from splitnode.engine.sampling import SamplingParams
    from splitnode.plan.predict import Predictor
    from splitnode.runtime import Runtime, RuntimeConfig

    config = RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)
    missing = tmp_path / "no-such-profile.json"
    async with Runtime(config, predictor=Predictor(config, profile_file=missing)) as rt:
        app = Dashboard(LocalBackend(rt), poll_s=0.05)
        async with app.run_test(size=SIZE) as pilot:
            line = app.query_one("#prediction")
            await wait_for(pilot, lambda: "waiting for" in str(line.content))
            assert str(line.content) == "predicted goodput: n/a (waiting for 20 finished requests, 0 so far)"
            assert line.display and line.region.height == 1

            async def one(i: int) -> None:
                async for _ in rt.generate(f"hi {i}", SamplingParams(max_tokens=2)):
                    pass

            await asyncio.gather(*(one(i) for i in range(20)))
            await wait_for(pilot, lambda: "no profile at" in str(line.content))
            assert str(line.content) == (f"predicted goodput: n/a (no profile at {missing}: measure one with "
                                         "`splitnode plan --profile`)")
            assert rt.predictor.helper_pid is None  # nothing to simulate
