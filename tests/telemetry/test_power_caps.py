"""Per-role power caps (splitnode.power, RuntimeConfig.power_caps, --power-cap) against `FakeNVML`,
the NVML test double in tests/fake_nvml.py: the runtime runs on CPU workers and is told they sit on
the double's boards. No test here may reach a real card's settings: the fixture below makes any call
of pynvml's own set function fail the test."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
from fake_nvml import FakeNVML, board

from splitnode import cli, power
from splitnode.power import PowerCaps
from splitnode.runtime import Runtime, RuntimeConfig

BOARDS = {"cpu:0": "GPU-fake0", "cpu:1": "GPU-fake1"}  # worker -> the double's board it "runs on"


@pytest.fixture(autouse=True)
def never_the_real_nvml_set(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def refuse(*args):
        raise AssertionError("a test called pynvml's real nvmlDeviceSetPowerManagementLimit")

    monkeypatch.setattr(pynvml, "nvmlDeviceSetPowerManagementLimit", refuse)


@pytest.fixture
def atexit_calls(monkeypatch):
    """What power.py registers with atexit, kept here instead of in the interpreter's list (only
    power.py's name for the module is replaced: torch and the rest keep the real one)."""
    registered = []
    unregister = lambda fn: registered.remove(fn) if fn in registered else None  # noqa: E731
    monkeypatch.setattr(power, "atexit", types.SimpleNamespace(register=registered.append, unregister=unregister))
    return registered


def limits_w(nvml: FakeNVML) -> dict[str, float]:
    return {key: b["limit_mw"] / 1000 for key, b in nvml.boards.items()}


def runtime(nvml: FakeNVML, caps: dict[str, float], **overrides) -> Runtime:
    cfg = RuntimeConfig(**{"devices": "cpu:2", "num_kv_blocks": 64, "autoscale": False, **overrides})
    return Runtime(cfg, power=PowerCaps(caps, BOARDS, nvml=nvml))


async def test_caps_follow_the_roles_from_start_through_role_changes_and_are_restored_on_stop(atexit_calls):
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board(limit_mw=650_000)})
    async with runtime(nvml, {"token": 450, "mixed": 600}) as rt:  # cpu:0 prompt, cpu:1 token
        assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 450.0}  # the token GPU only
        assert [d["power_cap_w"] for d in rt.status()["devices"]] == [None, 450.0]
        assert len(atexit_calls) == 1
        await rt.assign("cpu:1", "mixed")
        assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 600.0}
        await rt.assign("cpu:0", "token")
        await rt.assign("cpu:1", "prompt")  # a role with no cap: its own 650 W back
        assert limits_w(nvml) == {"GPU-fake0": 450.0, "GPU-fake1": 650.0}
        assert [d["power_cap_w"] for d in rt.status()["devices"]] == [450.0, None]
    assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 650.0}
    assert nvml.sets[-1] == ("GPU-fake0", 700_000)
    assert (nvml.num_inits, nvml.num_shutdowns) == (1, 1)
    assert atexit_calls == []  # stop restored them: nothing left for exit to do


def test_the_function_left_for_atexit_restores_every_gpu(atexit_calls):
    """A process that ends without Runtime.stop (an exception past the runtime, sys.exit) still
    puts the limits back: atexit runs what apply() registered."""
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board()})
    caps = PowerCaps({"prompt": 300, "token": 450}, BOARDS, nvml=nvml)
    caps.apply({"cpu:0": "prompt", "cpu:1": "token"})
    assert limits_w(nvml) == {"GPU-fake0": 300.0, "GPU-fake1": 450.0}
    (at_exit,) = atexit_calls
    at_exit()
    assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 700.0}
    assert (caps.cap_w("cpu:0"), caps.cap_w("cpu:1"), nvml.num_shutdowns) == (None, None, 1)
    caps.set_role("cpu:0", "token")  # a worker reaching a role after that changes nothing
    assert limits_w(nvml)["GPU-fake0"] == 700.0


@pytest.mark.parametrize("failure", ["missing model folder", "interrupted load"])
async def test_a_start_that_fails_after_the_caps_went_on_restores_them(failure, monkeypatch, tmp_path, atexit_calls):
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board()})
    if failure == "missing model folder":
        with pytest.raises(FileNotFoundError):
            await runtime(nvml, {"token": 450}, model=str(tmp_path / "nowhere")).start()
    else:  # SIGINT while the model loads cancels the start task (api.commands._interrupt_on_signals)
        loading, release = threading.Event(), threading.Event()

        def load(*args):
            loading.set()
            release.wait(10)
            raise RuntimeError("the load that was interrupted")

        monkeypatch.setattr("splitnode.runtime.runtime.Engine", load)
        start = asyncio.ensure_future(runtime(nvml, {"token": 450}).start())
        assert await asyncio.to_thread(loading.wait, 10)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        release.set()
    # every GPU written at start (the uncapped one with its own limit), then the capped one put back
    assert nvml.sets == [("GPU-fake0", 700_000), ("GPU-fake1", 450_000), ("GPU-fake1", 700_000)]
    assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 700.0}
    assert atexit_calls == []


async def test_no_permission_is_one_clear_error_with_nothing_changed():
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board()}, no_permission=True)
    rt = runtime(nvml, {"token": 450})
    with pytest.raises(ValueError) as e:
        await rt.start()
    assert str(e.value) == ("power caps: NVML may not set the power limit of cpu:0 (Insufficient Permissions); "
                            "setting GPU power limits needs root (or admin) rights on most systems")
    assert nvml.sets == [] and limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 700.0}
    assert rt.workers == []  # refused before the model loaded
    assert nvml.num_shutdowns == 1


async def test_a_cap_outside_the_cards_range_is_refused_with_the_range():
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board()})
    with pytest.raises(ValueError, match=r"^power cap token=900 W is outside cpu:0's range 200-700 W$"):
        await runtime(nvml, {"token": 900}).start()
    with pytest.raises(ValueError, match=r"^power cap prompt=150.5 W is outside cpu:0's range 200-700 W$"):
        await runtime(nvml, {"prompt": 150.5}).start()
    assert nvml.sets == [] and limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 700.0}


async def test_cpu_devices_are_refused_before_nvml():
    rt = Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, power_caps={"token": 450}))  # NVML never opened
    with pytest.raises(ValueError, match=r"^power caps need NVML GPUs; the devices \(cpu:0, cpu:1\) are CPU workers$"):
        await rt.start()
    assert rt.workers == []


def test_workers_sharing_a_gpu_give_it_the_lowest_cap_of_their_roles():
    nvml = FakeNVML({"GPU-a": board()})
    caps = PowerCaps({"prompt": 600, "token": 450}, {"cuda:0": "GPU-a", "cuda:0/1": "GPU-a"}, nvml=nvml)
    caps.apply({"cuda:0": "prompt", "cuda:0/1": "token"})
    try:
        assert limits_w(nvml) == {"GPU-a": 450.0}
        caps.set_role("cuda:0/1", "mixed")
        assert limits_w(nvml) == {"GPU-a": 600.0} and caps.cap_w("cuda:0/1") == 600.0
        caps.set_role("cuda:0", "mixed")
        assert limits_w(nvml) == {"GPU-a": 700.0} and caps.cap_w("cuda:0") is None
    finally:
        caps.restore()


def test_a_role_change_nvml_refuses_is_a_warning_and_the_worker_serves_on(caplog):
    nvml = FakeNVML({"GPU-fake0": board(), "GPU-fake1": board()})
    caps = PowerCaps({"token": 450}, BOARDS, nvml=nvml)
    caps.apply({"cpu:0": "prompt", "cpu:1": "token"})
    nvml.no_permission = True  # e.g. an administrator locked the limits meanwhile
    caps.set_role("cpu:0", "token")  # on a worker's thread: must not raise
    assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 450.0} and caps.cap_w("cpu:0") is None
    assert "may not set the power limit of cpu:0" in caplog.text
    nvml.no_permission = False
    caps.restore()
    assert limits_w(nvml) == {"GPU-fake0": 700.0, "GPU-fake1": 700.0}


@pytest.mark.parametrize("caps, error", [
    ({"decode": 450}, "RuntimeConfig.power_caps names the role 'decode'; roles are ('prompt', 'token', 'mixed')"),
    ({"token": -5}, "RuntimeConfig.power_caps['token'] must be a number of watts > 0, got -5"),
    ({"token": "450"}, "RuntimeConfig.power_caps['token'] must be a number of watts > 0, got '450'"),
])
def test_config_refuses_unknown_roles_and_bad_watts(caps, error):
    with pytest.raises(ValueError) as e:
        RuntimeConfig(devices="cpu:2", power_caps=caps)
    assert str(e.value) == error


@pytest.mark.parametrize("flag, error", [
    ("token=450", "power caps need NVML GPUs; the devices (cpu:0, cpu:1) are CPU workers"),
    ("decode=450", "RuntimeConfig.power_caps names the role 'decode'; roles are ('prompt', 'token', 'mixed')"),
    ("token", "--power-cap: 'token' is not ROLE=WATTS (e.g. token=450)"),
])
def test_serve_with_a_refused_power_cap_exits_2_with_one_line(flag, error, sock_dir, capsys):
    rc = cli.main(["serve", "--devices", "cpu:2", "--power-cap", flag, "--socket", str(sock_dir / "s.sock")])
    assert rc == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"splitnode serve: error: {error}"


def test_power_cap_flag_reaches_the_config():
    from splitnode.api.commands import parse_power_caps

    assert parse_power_caps("token=450, prompt=600W") == {"token": 450.0, "prompt": 600.0}
    assert parse_power_caps(None) is None
