"""The dashboard's screens as pictures (pytest-textual-snapshot), driven by `CannedBackend`: a test
double of the Backend protocol that replays two fixed status samples of three H100s, two seconds
apart by its own clock, so every figure on screen, rates included, is the same on every run. The
GPU readings are what GPUSampler makes of `NVMLDouble`, a test double of the pynvml module.

`pytest --snapshot-update tests/tui/test_dashboard_snapshot.py` rewrites the pictures in
__snapshots__/; look at them before committing."""

from __future__ import annotations

import copy
import types
from collections.abc import Awaitable, Callable

from polling import wait_for
from textual.binding import Binding

from splitnode.telemetry import GPUSampler
from splitnode.tui.app import Dashboard, HelpScreen, help_rows, key_name
from splitnode.tui.view import pools_lines

SIZE = (140, 40)  # the device table needs 122 columns with GPU figures (120 clips GPU MEM)
GIB = 1024**3
MIB = 1024**2
T0, T1 = 100.0, 102.0  # the two samples' times on the dashboard's clock
UUIDS = {"cuda:0": "GPU-5f3c2a1e-0000-4000-8000-000000000000",
         "cuda:1": "GPU-5f3c2a1e-0000-4000-8000-000000000001",
         "cuda:2": "GPU-5f3c2a1e-0000-4000-8000-000000000002"}


class NVMLDouble:
    """Test double for the `pynvml` module: the calls GPUSampler makes, in NVML's units (mW, mJ,
    bytes, °C, MHz), for H100 boards found by UUID. `run_for(s)` advances each board's energy
    counter by its power draw over s seconds."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, boards: dict[str, dict]):
        self.boards = boards

    def run_for(self, seconds: float) -> None:
        for b in self.boards.values():
            b["energy_mj"] += round(b["power_mw"] * seconds)

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self.boards[uuid]

    def nvmlDeviceGetPowerUsage(self, h):
        return h["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return h["energy_mj"]

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        total = 81_559 * MIB  # what an H100 80GB reports
        return types.SimpleNamespace(used=h["mem_used"], total=total, free=total - h["mem_used"])

    def nvmlDeviceGetTemperature(self, h, sensor):
        return h["temp"]

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1_980


def h100(power_w: int, util: int, temp: int, mem_gib: float, energy_kj: int) -> dict:
    return {"power_mw": power_w * 1000, "util": util, "temp": temp, "mem_used": round(mem_gib * GIB),
            "energy_mj": energy_kj * 1_000_000}


def read_gpus(nvml: NVMLDouble, t: float) -> dict[str, dict]:
    """What GPUSampler makes of the double's boards now, stamped with the canned clock's time."""
    sampler = GPUSampler(UUIDS, interval_s=3600.0, nvml=nvml)  # start() takes one reading
    sampler.start()
    try:
        return {name: {**sampler.sample(name), "time": t} for name in UUIDS}
    finally:
        sampler.stop()


def device(name: str, role: str, used: int, reserved: int, queues: tuple[int, int, int], batch: tuple[int, int],
           pending: int, busy_s: float, gpu: dict, **extra) -> dict:
    return {"name": name, "device": name, "role": role, "target_role": None, "pinned": False, "borrowed_from": None,
            "kv_blocks_used": used, "kv_blocks_total": 4096, "kv_blocks_reserved": reserved,
            "waiting": queues[0], "running": queues[1], "arriving": queues[2],
            "batch_size": batch[0], "batch_tokens": batch[1], "pending_prompt_tokens": pending,
            "steps": round(busy_s * 40), "busy_s": busy_s, "error": None, "gpu": gpu, **extra}


def canned_status(t: float, gpus: dict[str, dict]) -> dict:
    """One status() of a busy box: cuda:0 prefills, cuda:1 (pinned) decodes, and cuda:2 was borrowed
    from the token pool because the prompt queue passed its threshold. Counters grow with t."""
    dt = t - T0
    devices = [
        device("cuda:0", "prompt", 212, 0, (3, 2, 0), (2, 6144), 9800, 410.0 + 0.93 * dt, gpus["cuda:0"]),
        device("cuda:1", "token", 3120, 48, (0, 57, 3), (57, 57), 0, 388.5 + 0.71 * dt, gpus["cuda:1"], pinned=True),
        device("cuda:2", "mixed", 1480, 16, (1, 22, 1), (23, 2070), 1024, 402.25 + 0.88 * dt, gpus["cuda:2"],
               borrowed_from="token"),
    ]
    return {
        "runtime": {"model": "meta-llama/Llama-3.1-8B-Instruct", "uptime_s": 12_317.4 + dt},
        "devices": devices,
        "requests": {
            "active": 83, "finished": 1520 + round(11 * dt), "num_generated_tokens": 412_000 + round(1450 * dt),
            "ttft_s": {"p50": 0.182, "p90": 0.412, "p99": 0.951},
            "tbt_s": {"p50": 0.021, "p90": 0.034, "p99": 0.058},
            "in_flight": [
                {"request_id": 1601, "e2e_s": 0.12},  # still prefilling: no first token yet
                {"request_id": 1598, "ttft_s": 0.204, "e2e_s": 1.87, "tbt_mean_s": 0.0213, "tbt_max_s": 0.049},
                {"request_id": 1590, "ttft_s": 0.377, "e2e_s": 3.41, "tbt_mean_s": 0.0256, "tbt_max_s": 0.118},
                {"request_id": 1577, "ttft_s": 0.161, "e2e_s": 6.02, "tbt_mean_s": 0.0198, "tbt_max_s": 0.061},
            ],
        },
        "transfers": {"num_transfers": 30_112 + round(244 * dt), "num_sequences": 1545 + round(12 * dt),
                      "bytes_moved": 48 * GIB + round(360 * MIB * dt), "seconds": 95.31 + 0.72 * dt,
                      "num_failed": 0, "in_flight": 3},
        "policy": {"autoscale": True, "borrow_prompt_tokens": 8192, "borrow_kv_occupancy": 0.9,
                   "repurpose_after_s": 120.0, "layerwise_min_tokens": 512, "transfer_timeout_s": 30.0,
                   "reservation_lease_s": 30.0, "max_num_batched_tokens": 8192},
        "signals": {"prompt_queue_tokens": 9800, "token_kv_occupancy": 3120 / 4096},
    }


def canned_samples() -> list[dict]:
    nvml = NVMLDouble({UUIDS["cuda:0"]: h100(655, 98, 78, 74.6, 1_234_567),
                       UUIDS["cuda:1"]: h100(412, 64, 66, 76.1, 1_108_223),
                       UUIDS["cuda:2"]: h100(598, 91, 74, 75.0, 1_199_870)})
    first = canned_status(T0, read_gpus(nvml, T0))
    nvml.run_for(T1 - T0)
    return [first, canned_status(T1, read_gpus(nvml, T1))]


class CannedBackend:
    """Test double of tui.backend.Backend: status() answers the canned samples in turn, then the
    last one again and again; `clock` is the dashboard's clock, the time of the sample last given.
    It takes no requests: the load generator stays off in these tests."""

    where = "canned test backend"
    session = 0

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.num_calls = 0

    def _index(self) -> int:
        return min(self.num_calls, len(self.samples)) - 1

    async def status(self) -> dict:
        self.num_calls += 1
        return copy.deepcopy(self.samples[self._index()])

    def clock(self) -> float:
        return (T0, T1)[self._index()]

    async def assign(self, device, role, mode="migrate", pin=True):
        raise AssertionError("not in these tests")

    async def release(self, device):
        raise AssertionError("not in these tests")

    def generate(self, prompt, params):
        raise AssertionError("not in these tests")

    async def cancel(self, request_id):
        raise AssertionError("not in these tests")


def canned_dashboard() -> tuple[Dashboard, Callable[..., Awaitable[None]]]:
    backend = CannedBackend(canned_samples())
    app = Dashboard(backend, poll_s=0.05, clock=backend.clock)

    async def both_samples_shown(pilot) -> None:
        await wait_for(pilot, lambda: backend.num_calls >= 2 and app.sample == backend.samples[-1])

    return app, both_samples_shown


def test_main_screen(snap_compare):
    app, run_before = canned_dashboard()
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare):
    app, run_before = canned_dashboard()
    assert snap_compare(app, press=["question_mark"], terminal_size=SIZE, run_before=run_before)


async def test_main_screen_figures():
    """The numbers the snapshot shows, as text: rates over the two samples' two seconds."""
    app, both_samples_shown = canned_dashboard()
    async with app.run_test(size=SIZE) as pilot:
        await both_samples_shown(pilot)
        table = app.query_one("#devices")
        row = {key: str(table.get_cell("cuda:0", key)) for key in ("busy", "power", "temp", "memory")}
        assert row == {"busy": "93%/98%", "power": "655/700 W", "temp": "78°C", "memory": "74.6/80 GiB"}
        assert str(table.get_cell("cuda:2", "role")) == "mixed borrowed"
        assert str(table.get_cell("cuda:1", "kv")) == "█████░░ 3120/4096"
        requests = str(app.query_one("#requests").content)
        assert "finished 1542  (11.0/s)" in requests and "throughput  1450 tok/s" in requests
        assert "TTFT p50/90/99  182 / 412 / 951 ms" in requests
        assert "energy  1665 W  0.87 tok/J" in requests
        transfers = str(app.query_one("#transfers").content)
        assert "rate      360.00 MiB/s" in transfers and "requests  1569  (12.0/s)" in transfers
        assert "up 3:25:19" in str(app.query_one("#header").content)


async def test_help_lists_every_binding_by_its_keys():
    app, both_samples_shown = canned_dashboard()
    async with app.run_test(size=SIZE) as pilot:
        await both_samples_shown(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        rows = help_rows(app, Dashboard.BINDINGS)
        text = str(app.screen.query_one("#help").content)
        for binding in Binding.make_bindings(Dashboard.BINDINGS):
            what = binding.tooltip or binding.description
            assert any(key_name(app, binding) in keys.split() and w == what for keys, w in rows), binding
        assert ("? h", "This help") in rows and ("+ =", "Load rate up (requests per second)") in rows
        assert ("P", "The same as p, in drain mode") in rows  # shift+p is the same key
        assert ("j k", "Select a device (as ↓ ↑ do)") in rows
        assert "  ? h  This help\n" in text
        assert "migrate moves the device's decodes to another token worker, drain finishes them" in text
        assert "shows its reason and changes nothing.\n" in text
        assert text.endswith("esc, q, ? or h closes this help")


def test_pools_read_the_runtimes_signals_and_work_them_out_for_an_older_server():
    status = canned_samples()[-1]
    lines = pools_lines(status)
    assert "prompt queue  9800 tok  borrow>8192" in lines and "token KV       76%      borrow>90%" in lines
    older = {k: v for k, v in status.items() if k != "signals"}
    assert pools_lines(older) == lines  # the same figures, from the devices
    status["signals"] = {"prompt_queue_tokens": 123, "token_kv_occupancy": 0.5}
    assert "prompt queue   123 tok" in pools_lines(status) and "token KV       50%" in pools_lines(status)


PREDICTION = {"available": True, "computing": False, "current_layout": "1p1t1m+policy", "layout": "1p1t1m+policy",
              "goodput": 31.4, "best_layout": "2p1t+policy", "best_goodput": 38.25,
              "layouts": {"1p1t1m+policy": 31.4, "2p1t+policy": 38.25}, "num_requests": 200,
              "profile": "/root/.cache/splitnode/profiles/llama--NVIDIA_H100--auto.json", "computed_at": 1.7e9,
              "age_s": 12.2, "compute_s": 3.1, "warnings": []}


async def test_the_prediction_is_a_line_under_the_requests_in_flight_and_absent_for_an_older_server():
    app, both_samples_shown = canned_dashboard()
    async with app.run_test(size=SIZE) as pilot:
        await both_samples_shown(pilot)
        await pilot.pause()  # until idle: the layout pass after the sample's rows went in
        line = app.query_one("#prediction")
        assert not line.display  # the canned server is of the kind that sends no prediction
        in_flight_height = app.query_one("#in-flight").region.height

    app, both_samples_shown = canned_dashboard()
    for sample in app.backend.samples:
        sample["prediction"] = dict(PREDICTION)
    async with app.run_test(size=SIZE) as pilot:
        await both_samples_shown(pilot)
        await pilot.pause()
        line = app.query_one("#prediction")
        assert str(line.content) == ("predicted goodput at this layout 1p1t1m+policy: 31.40 req/s (best: 2p1t+policy, "
                                     "38.25 req/s); 200 requests, 12 s ago")
        assert line.display and line.region.height == 1 and line.region.y == SIZE[1] - 2  # just above the keys
        assert app.query_one("#in-flight").region.height == in_flight_height - 1  # the rest of the screen stays put
        assert str(app.query_one("#header").content).startswith("splitnode  model meta-llama")


def test_the_prediction_says_which_layout_it_is_for_and_what_it_waits_for():
    from splitnode.runtime.status import format_prediction

    moved = {**PREDICTION, "current_layout": "2p1t+policy", "computing": True, "age_s": 300.0}
    assert format_prediction(moved) == ("predicted goodput at 1p1t1m+policy (the layout before 2p1t+policy): 31.40 "
                                        "req/s (best: 2p1t+policy, 38.25 req/s); 200 requests, 5 min ago; recomputing")
    assert format_prediction({"available": False, "reason": "waiting for 20 finished requests, 3 so far"}) == (
        "predicted goodput: n/a (waiting for 20 finished requests, 3 so far)")
    assert format_prediction(None) == "predicted goodput: n/a (this server predicts none)"
