"""The dashboard's lifecycle against a real Runtime on CPU workers: quitting with the load on,
and `splitnode dash` reattaching to a server that went away and came back."""

from __future__ import annotations

from polling import until, wait_for

from splitnode.api.client import Client
from splitnode.api.server import serve
from splitnode.runtime import Runtime, RuntimeConfig
from splitnode.tui.app import Dashboard
from splitnode.tui.backend import LocalBackend, RemoteBackend
from splitnode.tui.rates import Rates

SIZE = (120, 35)


def device_rows(app) -> list[str]:
    return [row.key.value for row in app.query_one("#devices").ordered_rows]


def kv_held(rt) -> int:
    return sum(d["kv_blocks_used"] + d["kv_blocks_reserved"] for d in rt.status()["devices"])


async def test_quitting_with_the_load_on_cancels_its_requests_and_frees_their_blocks(rt):
    app = Dashboard(LocalBackend(rt), load=True, load_rate=32.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: rt.status()["requests"]["active"] >= 2)
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, timeout_s=5)
    sent = app.load.num_sent
    await until(lambda: rt.status()["requests"]["active"] == 0 and kv_held(rt) == 0)
    assert app.load.num_in_flight == 0 and app.load.num_sent == sent


async def test_attached_dashboard_reattaches_when_the_server_comes_back(rt, sock_dir):
    """A failed Client stays failed: the remote backend connects a new one once a server answers
    on the socket again, and the dashboard's rates start over with the new server's counters."""
    path = sock_dir / "s.sock"
    srv = await serve(rt, path)
    client = Client(path)
    await client.connect()
    app = Dashboard(RemoteBackend(client, where="attached"), poll_s=0.05)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.sample is not None)
            first_rates = app.rates
            await srv.close()
            await wait_for(pilot, lambda: app.error is not None)
            srv = await serve(rt, path)
            await wait_for(pilot, lambda: app.error is None)  # the reconnect backs off: allow for a loaded host
            assert app.backend.session == 1 and app.backend.client is not client
            assert app.rates is not first_rates
    finally:
        await app.backend.close()
        await client.close()
        await srv.close()


async def test_reattached_to_a_server_with_other_devices_the_rows_are_the_new_ones(rt, sock_dir):
    """Issue: the old server's rows stayed, and acting on one answered "unknown device"."""
    path = sock_dir / "s.sock"
    srv = await serve(rt, path)  # cpu:0..2
    client = Client(path)
    await client.connect()
    app = Dashboard(RemoteBackend(client, where="attached"), poll_s=0.05)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: device_rows(app) == ["cpu:0", "cpu:1", "cpu:2"])
            await pilot.press("j", "j")  # cpu:2, which the next server does not have
            await srv.close()
            await wait_for(pilot, lambda: app.error is not None)
            async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)) as rt2:
                srv = await serve(rt2, path)
                await wait_for(pilot, lambda: device_rows(app) == ["cpu:0", "cpu:1"])
                assert str(app.query_one("#devices").get_cell("cpu:1", "kv")).endswith(" 0/64")  # the new server's
                assert app.selected_device() == "cpu:0"
                await pilot.press("x")
                await wait_for(pilot, lambda: rt2.status()["devices"][0]["role"] == "mixed")
                await srv.close()
    finally:
        await app.backend.close()
        await client.close()
        await srv.close()


def test_rates_are_unknown_while_a_counter_went_down():
    rates = Rates()
    rates.add(0.0, {"n": 100})
    rates.add(1.0, {"n": 150})
    assert rates.rate(lambda s: s["n"]) == 50.0
    rates.add(1.5, {"n": 3})  # a restarted server counts from zero
    assert rates.rate(lambda s: s["n"]) is None


class FailingBackend(LocalBackend):
    """The real runtime's status until `fail()`, then a new error on every call, as a server that is
    gone says while the client retries: the poll keeps posting failures, each with other text."""

    def __init__(self, rt):
        super().__init__(rt)
        self.num_failures = 0
        self.failing = False

    async def status(self):
        if self.failing:
            self.num_failures += 1
            raise ConnectionError(f"connection lost; reconnecting (attempt {self.num_failures})")
        return await super().status()


async def test_failures_polled_while_the_app_shuts_down_reach_no_widget_that_is_gone(rt):
    """Issue: NoMatches for '#header' from _show_header at the end of a reattach test. Leaving
    run_test calls App._shutdown, which removes the screens while the message loop still runs;
    the poll worker, cancelled only when that loop ends, posted one more failure with new text,
    and the header was updated after it was gone. Polling without a pause makes that certain."""
    backend = FailingBackend(rt)
    app = Dashboard(backend, poll_s=0.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.sample is not None)
        backend.failing = True
        await wait_for(pilot, lambda: app.error is not None and backend.num_failures > 5)
        assert "disconnected: connection lost" in str(app.query_one("#header").content)
    assert backend.num_failures > 5  # and leaving run_test raised nothing
