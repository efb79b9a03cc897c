"""`cpu:N` workers are N devices with cores of their own: each worker thread is bound to its share
of the cores this process may use, and a layout that must share cores says so."""

from __future__ import annotations

import os

import pytest

from splitnode import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig
from splitnode.runtime.config import cpu_core_sets


def test_cores_are_shared_out_evenly_and_overlap_is_reported():
    sets, warning = cpu_core_sets(["cpu:0", "cpu:1"], None, cores=[0, 1, 2, 3])
    assert sets == {"cpu:0": {0, 1}, "cpu:1": {2, 3}} and warning is None
    sets, warning = cpu_core_sets(["cpu:0", "cpu:1", "cpu:2"], None, cores=[4, 5])
    assert sets == {} and "3 CPU workers on 2 cores" in warning and "none is bound" in warning
    sets, warning = cpu_core_sets(["cpu:0", "cpu:1", "cpu:2"], 1, cores=[4, 5])  # asked for: bound, overlapping
    assert sets == {"cpu:0": {4}, "cpu:1": {5}, "cpu:2": {4}}
    assert "3 CPU workers x 1 threads on 2 cores" in warning
    sets, warning = cpu_core_sets(["cpu:0", "cuda:0"], 1, cores=[0, 1, 2])
    assert sets == {"cpu:0": {0}} and warning is None  # a GPU worker gets no cores
    assert cpu_core_sets(["cuda:0", "cuda:1"], None) == ({}, None)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
async def test_each_cpu_worker_thread_runs_on_its_own_cores():
    cores = sorted(os.sched_getaffinity(0))
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=32, autoscale=False, cpu_threads=1)) as rt:
        st = rt.status()
        bound = [os.sched_getaffinity(w._thread.native_id) for w in rt.workers]
        assert [d["cpu_cores"] for d in st["devices"]] == [[cores[0]], [cores[1]]]
        assert st["runtime"]["warnings"] == []
    assert bound == [{cores[0]}, {cores[1]}]


async def test_more_cpu_workers_than_cores_still_serve_and_say_so():
    n = len(os.sched_getaffinity(0)) + 1
    async with Runtime(RuntimeConfig(devices=f"cpu:{n}", num_kv_blocks=32, autoscale=False)) as rt:
        (warning,) = rt.status()["runtime"]["warnings"]
        assert f"{n} CPU workers" in warning and "share cores" in warning
        events = [ev async for ev in rt.generate("hello", SamplingParams(max_tokens=3, temperature=0.0))]
        assert events[-1].finished
