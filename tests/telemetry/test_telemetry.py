"""The NVML sampler, against `FakeNVML` (tests/fake_nvml.py: a test double with pynvml's calls and units), and where
its numbers end up: Runtime.status() and the dashboard's device table. Without NVML (this machine,
CPU workers) the fields say why."""

from __future__ import annotations

import time
import types

import pytest
from fake_nvml import GIB, FakeNVML, board

from splitnode.runtime import Runtime, RuntimeConfig
from splitnode.telemetry import GPUSampler, nvml_targets
from splitnode.tui.app import Dashboard
from splitnode.tui.backend import LocalBackend


def test_sampler_reads_each_board_in_watts_joules_bytes():
    nvml = FakeNVML({"GPU-aaaa": board(), "00000000:17:00.0": board(power_mw=100_500, temp=40)})
    sampler = GPUSampler({"cuda:0": "GPU-aaaa", "cuda:1": "00000000:17:00.0", "cpu:0": None}, nvml=nvml)
    sampler.start()
    try:
        s0, s1 = sampler.sample("cuda:0"), sampler.sample("cuda:1")
    finally:
        sampler.stop()
    assert s0["available"] is True
    assert {k: s0[k] for k in ("power_w", "power_limit_w", "energy_j", "util_pct", "mem_used_bytes",
                               "mem_total_bytes", "temp_c", "sm_clock_mhz")} == {
        "power_w": 250.0, "power_limit_w": 700.0, "energy_j": 5000.0, "util_pct": 87,
        "mem_used_bytes": 12 * GIB, "mem_total_bytes": 80 * GIB, "temp_c": 61, "sm_clock_mhz": 1980}
    assert (s1["power_w"], s1["temp_c"]) == (100.5, 40)  # found by PCI bus id
    assert sampler.sample("cpu:0") == {"available": False, "reason": "cpu worker"}
    assert (nvml.num_inits, nvml.num_shutdowns) == (1, 1)


def test_sampler_thread_follows_the_board():
    b = board()
    sampler = GPUSampler({"cuda:0": "GPU-aaaa"}, interval_s=0.01, nvml=FakeNVML({"GPU-aaaa": b}))
    sampler.start()
    try:
        b["power_mw"], b["temp"] = 410_000, 75
        deadline = time.monotonic() + 5
        while sampler.sample("cuda:0")["power_w"] != 410.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sampler.sample("cuda:0")["power_w"] == 410.0
        assert sampler.sample("cuda:0")["temp_c"] == 75
    finally:
        sampler.stop()
    assert sampler._thread is None


def test_unsupported_counter_is_none_not_made_up():
    sampler = GPUSampler({"cuda:0": "GPU-aaaa"}, nvml=FakeNVML({"GPU-aaaa": board()}, unsupported=("energy_mj",)))
    sampler.start()
    s = sampler.sample("cuda:0")
    sampler.stop()
    assert s["available"] and s["energy_j"] is None and s["power_w"] == 250.0
    assert sampler.sample("cuda:0") == {"available": False, "reason": "telemetry stopped"}


def test_a_board_that_answers_nothing_is_unavailable_with_nvmls_reason():
    """A GPU lost mid-run (off the bus, reset): every read fails; the sample says so instead of a
    fresh timestamp over empty fields."""
    lost = ("power_mw", "limit_mw", "energy_mj", "util", "mem_used", "temp", "sm_mhz")
    sampler = GPUSampler({"cuda:0": "GPU-aaaa"}, nvml=FakeNVML({"GPU-aaaa": board()}, unsupported=lost))
    sampler.start()
    try:
        s = sampler.sample("cuda:0")
    finally:
        sampler.stop()
    assert s == {"available": False, "reason": "NVML read failed: Not Supported"}


def test_board_nvml_cannot_find_says_so():
    sampler = GPUSampler({"cuda:0": "GPU-missing", "cuda:1": "GPU-aaaa"}, nvml=FakeNVML({"GPU-aaaa": board()}))
    sampler.start()
    missing, found = sampler.sample("cuda:0"), sampler.sample("cuda:1")
    sampler.stop()
    assert missing["available"] is False and missing["reason"].startswith("NVML has no device GPU-missing")
    assert found["available"] is True
    assert sampler.sample("cuda:0") == missing  # after stop the reason stays


def test_nvml_that_fails_to_start_says_why():
    nvml = FakeNVML({})

    def init():
        raise FakeNVML.NVMLError("Driver Not Loaded")

    nvml.nvmlInit = init
    sampler = GPUSampler({"cuda:0": "GPU-aaaa"}, nvml=nvml)
    sampler.start()
    sampler.stop()
    assert sampler.sample("cuda:0") == {"available": False, "reason": "NVML not available: Driver Not Loaded"}


def test_real_pynvml_without_the_library_says_why():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    sampler = GPUSampler({"cuda:0": "GPU-aaaa"})  # the production path: pynvml itself
    sampler.start()
    sampler.stop()
    s = sampler.sample("cuda:0")
    assert s["available"] is False and s["reason"].startswith("NVML not available: ")


def test_cuda_devices_are_found_by_uuid_or_pci_bus_id_not_torch_index(monkeypatch):
    import torch

    props = {0: types.SimpleNamespace(uuid="58e6a1c2-0000-1111-2222-333344445555"),
             1: types.SimpleNamespace(uuid=None, pci_bus_id=0x17, pci_device_id=0, pci_domain_id=0),
             2: types.SimpleNamespace()}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    assert nvml_targets(["cuda:0", "cuda:1", "cuda:2", "cpu:0"]) == {
        "cuda:0": "GPU-58e6a1c2-0000-1111-2222-333344445555", "cuda:1": "00000000:17:00.0",
        "cuda:2": "unresolved:cuda:2", "cpu:0": None}
    sampler = GPUSampler({"cuda:2": "unresolved:cuda:2"}, nvml=FakeNVML({}))
    sampler.start()
    sampler.stop()
    assert "neither a UUID nor a PCI bus id" in sampler.sample("cuda:2")["reason"]


async def test_cpu_workers_report_why_there_are_no_gpu_numbers():
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)) as rt:
        st = rt.status()
    assert [d["gpu"] for d in st["devices"]] == [{"available": False, "reason": "cpu worker"}] * 2


async def test_doubled_readings_reach_status_and_the_dashboard():
    # The test double stands in for two boards; the sampler is told the workers run on them.
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board(power_mw=120_000, temp=44)}, energy_step_mj=1000)
    sampler = GPUSampler({"cpu:0": "GPU-fake0", "cpu:1": "GPU-fake1"}, interval_s=0.05, nvml=nvml)
    cfg = RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)
    async with Runtime(cfg, telemetry=sampler) as rt:
        gpu = rt.status()["devices"][1]["gpu"]
        assert (gpu["available"], gpu["power_w"], gpu["power_limit_w"], gpu["temp_c"]) == (True, 120.0, 700.0, 44)
        app = Dashboard(LocalBackend(rt))
        async with app.run_test(size=(120, 35)) as pilot:
            table = app.query_one("#devices")
            for _ in range(100):
                if table.row_count == 2 and "W" in str(app.query_one("#requests").content):
                    break
                await pilot.pause(0.05)
            assert str(table.get_cell("cpu:0", "power")) == "250/700 W"
            assert str(table.get_cell("cpu:1", "power")) == "120/700 W"
            assert str(table.get_cell("cpu:0", "temp")) == "61°C"
            assert str(table.get_cell("cpu:0", "memory")) == "12.0/80 GiB"
            assert str(table.get_cell("cpu:0", "busy")).endswith("/87%")
            # energy counters advance 1 J per read on each board: the panel shows a power figure
            assert " W" in str(app.query_one("#requests").content)
    assert nvml.num_shutdowns == 1
