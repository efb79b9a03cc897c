"""The runtime's predicted goodput (`status()["prediction"]`): the profile `splitnode plan` would
read, the lengths of the runtime's own finished requests, the planner's own goodput search, in a
helper process that computes one prediction at a time."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from polling import until

from splitnode.engine.sampling import SamplingParams
from splitnode.goodput.workloads import RequestSpec, poisson_arrivals
from splitnode.plan import command
from splitnode.plan.planner import Layout, Planner, layouts
from splitnode.plan.predict import Predictor, current_layout
from splitnode.plan.profile import device_name, model_key, profile_path
from splitnode.plan.sim import Policy
from splitnode.runtime import Runtime, RuntimeConfig

DEVICES = "cpu:2"
BLOCKS = 64
# prompt and output lengths of finished requests, varied so that several layouts differ
LENGTHS = [(40 + 37 * i % 300, 4 + 7 * i % 40) for i in range(200)]


def device(name: str, role: str, **extra) -> dict:
    """What Predictor.status reads of a `status()["devices"]` entry."""
    return {"name": name, "role": role, "target_role": None, "pinned": False, "borrowed_from": None, "error": None,
            "kv_blocks_total": BLOCKS, **extra}


SPLIT = [device("cpu:0", "prompt"), device("cpu:1", "token")]
POLICY = {"autoscale": False}


def cached_profile(make_profile, **fields):
    """A hand-made profile (tests/plan/conftest.py) where `splitnode plan --profile --devices cpu:2`
    stores the real one."""
    config = RuntimeConfig(devices=DEVICES)
    threads = command._threads(config.devices, {})
    prof = make_profile(0.010, 0.003, per_token_s=2e-5, per_seq_s=1e-4, model=model_key(None), dtype="auto",
                        device=device_name("cpu:0", threads), **fields)
    return prof, prof.save(profile_path(prof.model, prof.device, "auto"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where profile_path looks (no model is loaded here)
    return tmp_path


@pytest.fixture
def predictor():
    p = Predictor(RuntimeConfig(devices=DEVICES, num_kv_blocks=BLOCKS, autoscale=False))
    yield p
    p.close()


def planner_goodput(prof, lengths, layout: Layout) -> tuple[float, dict[str, float]]:
    """What the planner says directly: `splitnode plan`'s defaults (Poisson arrivals seeded 0,
    Splitwise's slowdown SLOs for 90%) with the runtime's knobs and KV pool."""
    specs = [RequestSpec(p, o) for p, o in lengths]
    policy = Policy.from_config(RuntimeConfig(devices=DEVICES, num_kv_blocks=BLOCKS), autoscale=False)
    planner = Planner(prof, 2, specs, poisson_arrivals(len(specs), 1.0, 0), policy)
    start = planner.sweep_start()
    every = {lay.name: planner.goodput(lay, start)[0] for lay in layouts(2)}
    return every[layout.name], every


def test_before_20_requests_it_waits_for_them_and_invents_no_workload(cache_dir, predictor):
    for p, o in LENGTHS[:19]:
        predictor.observe(p, o)
    predictor.observe(5, 0)  # a request cut off before its first token says nothing of output lengths
    pred = predictor.status(SPLIT, POLICY)
    assert pred == {"available": False, "reason": "waiting for 20 finished requests, 19 so far", "computing": False,
                    "current_layout": "1p1t"}
    assert predictor.num_started == 0 and predictor.helper_pid is None


def test_without_a_profile_it_says_how_to_measure_one(cache_dir, predictor):
    threads = command._threads(["cpu:0", "cpu:1"], {})
    for p, o in LENGTHS[:20]:
        predictor.observe(p, o)
    pred = predictor.status(SPLIT, POLICY)
    assert not pred["available"] and not pred["computing"]
    assert pred["reason"].startswith(f"no profile of {model_key(None)} on {device_name('cpu:0', threads)} (auto) in {cache_dir}")
    assert "measure it with `splitnode plan --profile --devices cpu:2`" in pred["reason"]
    assert predictor.num_started == 0 and predictor.helper_pid is None  # nothing to simulate: no helper


def test_a_profile_of_another_version_is_refused_with_the_reason(cache_dir, predictor, make_profile):
    _, path = cached_profile(make_profile)
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": "0.0.1"}))
    for p, o in LENGTHS[:20]:
        predictor.observe(p, o)
    pred = predictor.status(SPLIT, POLICY)
    assert not pred["available"] and "measured by splitnode 0.0.1" in pred["reason"]
    assert "re-profile" in pred["reason"]


async def test_prediction_is_the_planners_goodput_computed_once_at_a_time(cache_dir, predictor, make_profile):
    prof, path = cached_profile(make_profile)
    for p, o in LENGTHS[:20]:
        predictor.observe(p, o)
    first = predictor.status(SPLIT, POLICY)
    assert first["computing"] and not first["available"]
    assert first["reason"] == "computing the first prediction, for 1p1t on 20 finished requests"
    assert predictor.num_started == 1

    # While the helper is held mid-job, neither a new layout nor more traffic starts another job.
    os.kill(predictor.helper_pid, signal.SIGSTOP)
    try:
        for p, o in LENGTHS[20:80]:
            predictor.observe(p, o)
        moved = [device("cpu:0", "mixed"), device("cpu:1", "token")]
        held = predictor.status(moved, POLICY)
        assert held["computing"] and held["current_layout"] == "1t1m" and predictor.num_started == 1
    finally:
        os.kill(predictor.helper_pid, signal.SIGCONT)

    await until(lambda: not predictor.status(moved, POLICY)["computing"] or predictor.num_started == 2, timeout=120)
    # the first job's answer landed (for the old layout); the new layout sent the next job
    assert predictor.num_started == 2
    await until(lambda: not predictor.status(moved, POLICY)["computing"], timeout=120)
    pred = predictor.status(moved, POLICY)
    assert pred["available"], pred
    expected, every = await asyncio.to_thread(planner_goodput, prof, LENGTHS[:80], Layout(0, 1, 1))  # asyncio.run inside
    assert pred["layout"] == pred["current_layout"] == "1t1m" and pred["num_requests"] == 80
    assert pred["goodput"] == pytest.approx(expected, rel=1e-9)
    assert pred["layouts"] == pytest.approx(every, rel=1e-9)
    assert pred["best_goodput"] == pytest.approx(max(every.values()), rel=1e-9)
    assert every[pred["best_layout"]] == pytest.approx(pred["best_goodput"], rel=1e-9)
    assert pred["profile"] == str(path) and pred["age_s"] >= 0 and pred["compute_s"] > 0
    assert predictor.num_started == 2  # nothing changed since: nothing more is computed

    pid = predictor.helper_pid
    predictor.close()
    assert predictor.helper_pid is None
    with pytest.raises(ProcessLookupError):  # reaped, not left behind
        os.kill(pid, 0)


async def test_a_helper_that_dies_is_a_reason_and_the_next_job_starts_another(cache_dir, predictor, make_profile):
    cached_profile(make_profile)
    for p, o in LENGTHS[:20]:
        predictor.observe(p, o)
    assert predictor.status(SPLIT, POLICY)["computing"]
    dead = predictor.helper_pid
    os.kill(dead, signal.SIGKILL)
    await until(lambda: not predictor.status(SPLIT, POLICY)["computing"], timeout=30)
    pred = predictor.status(SPLIT, POLICY)
    assert not pred["available"] and pred["reason"].startswith("the prediction helper exited (code -9)")
    assert predictor.helper_pid is None and predictor.num_started == 1  # the same layout and traffic: not retried
    moved = [device("cpu:0", "mixed"), device("cpu:1", "token")]
    assert predictor.status(moved, POLICY)["computing"] and predictor.num_started == 2
    assert predictor.helper_pid not in (None, dead)


def test_the_layout_counts_moves_borrows_and_the_autoscaler_where_it_can_act():
    assert current_layout(SPLIT, autoscale=True).name == "1p1t+policy"
    moving = [device("cpu:0", "prompt"), device("cpu:1", "token", target_role="mixed")]
    assert current_layout(moving, autoscale=False).name == "1p1m"
    borrowed = [device("cpu:0", "prompt"), device("cpu:1", "mixed", borrowed_from="token")]
    assert current_layout(borrowed, autoscale=True).name == "1p1t+policy"
    pinned = [device("cpu:0", "prompt", pinned=True), device("cpu:1", "token", pinned=True)]
    assert current_layout(pinned, autoscale=True).name == "1p1t"  # nothing the autoscaler may move
    failed = [*SPLIT, device("cpu:2", "token", error="boom")]
    assert current_layout(failed, autoscale=False).name == "1p1t"
    assert current_layout([device("cpu:0", "mixed"), device("cpu:1", "mixed")], autoscale=True).name == "2m"


async def test_status_carries_the_prediction_for_the_runtimes_own_traffic(tmp_path, make_profile):
    path = tmp_path / "profile.json"
    threads = command._threads(["cpu:0", "cpu:1"], {})
    make_profile(0.010, 0.003, model=model_key(None), dtype="auto", device=device_name("cpu:0", threads)).save(path)
    config = RuntimeConfig(devices=DEVICES, num_kv_blocks=BLOCKS, autoscale=False)
    async with Runtime(config, predictor=Predictor(config, profile_file=path)) as rt:
        assert rt.status()["prediction"]["reason"] == "waiting for 20 finished requests, 0 so far"

        async def one(i: int) -> None:
            async for _ in rt.generate(f"request {i} " * (1 + i % 5), SamplingParams(max_tokens=3 + i % 4)):
                pass

        for i in range(0, 24, 8):
            await asyncio.gather(*(one(j) for j in range(i, i + 8)))
        await until(lambda: rt.status()["prediction"].get("available"), timeout=120)
        pred = rt.status()["prediction"]
        assert pred["layout"] == pred["current_layout"] == "1p1t" and pred["num_requests"] == 24
        assert pred["profile"] == str(path) and pred["goodput"] > 0
        assert set(pred["layouts"]) == {lay.name for lay in layouts(2)}
        helper = rt.predictor.helper_pid
    assert rt.predictor.helper_pid is None  # stopped with the runtime
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)
