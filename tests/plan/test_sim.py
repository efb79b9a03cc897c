"""The simulator against timings worked out by hand, against itself (its per-token shortcut and
the ported batcher give the same runs), and for conservation: every request finishes with all its
tokens, and no device ever holds more KV blocks than it has."""

from __future__ import annotations

import pytest
from conftest import flat_profile

from splitnode.goodput.workloads import RequestSpec, poisson_arrivals, synthetic
from splitnode.plan.sim import Policy, Simulator, alone, simulate

P, D = 0.010, 0.002  # prefill and decode step of the flat profile


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-12)


def test_one_device_alone_is_prefill_then_one_decode_step_per_token():
    prof = flat_profile(P, D)
    specs = [RequestSpec(100, 5), RequestSpec(700, 1), RequestSpec(20, 9)]
    out = simulate([("cpu:0", "mixed", prof)], specs, [0.0, 1.0, 2.0]).results
    for r, s in zip(out, specs):  # arrivals far apart: each runs alone
        assert r.ok and len(r.token_s) == s.output_len
        assert r.ttft == pytest.approx(P)
        assert r.gaps == approx([D] * (s.output_len - 1))
        assert r.e2e == pytest.approx(P + D * (s.output_len - 1))
    assert alone(prof, specs)[(20, 9)].e2e == pytest.approx(P + 8 * D)


def test_a_prompt_arriving_mid_prefill_waits_then_shares_a_mixed_batch():
    """The second prompt waits for the first prefill (FCFS), then runs in one batch with the
    first request's decode; with decodes sharing the step's fixed cost (shared = D) that batch
    takes P. Then both decode together."""
    prof = flat_profile(P, D, mixed_shared_s=D)
    a, b = simulate([("cpu:0", "mixed", prof)], [RequestSpec(100, 3)] * 2, [0.0, 0.001]).results
    assert a.token_s == approx([P, 2 * P, 2 * P + D])
    assert b.token_s == approx([2 * P, 2 * P + D, 2 * P + 2 * D])
    assert b.ttft == pytest.approx(2 * P - 0.001)


def test_the_token_budget_cuts_prompts_into_fcfs_chunks():
    prof = flat_profile(P, D, per_token_s=1e-5, quad_s=1e-7)
    pol = Policy(max_num_batched_tokens=128)
    specs = [RequestSpec(10, 1), RequestSpec(100, 1), RequestSpec(100, 1)]
    busy, one, two = simulate([("cpu:0", "mixed", prof)], specs, [0.0, 0.001, 0.001], pol).results
    first = prof.step_s([(100, 0), (28, 0)], 0, 0)  # both queued behind the first: the second's 28 tokens ride along
    assert one.token_s == approx([busy.ttft + first])
    assert two.token_s == approx([busy.ttft + first + prof.chunk_s(72, 28)])
    long = simulate([("cpu:0", "mixed", prof)], [RequestSpec(300, 1)], [0.0], pol).results[0]
    assert long.ttft == pytest.approx(prof.chunk_s(128, 0) + prof.chunk_s(128, 128) + prof.chunk_s(44, 256))
    assert prof.chunk_s(128, 128) - prof.chunk_s(128, 0) == pytest.approx(2 * 1e-7 * 128 * 128)


@pytest.mark.parametrize("sync", [True, False])
def test_kv_moves_whole_after_short_prompts_and_layer_by_layer_during_long_ones(sync):
    """CPU (sync): the prompt worker's thread copies, so the whole move follows the prefill and
    the layer-wise one lengthens it; GPU: the copies run on the transfer stream."""
    tr = {"fixed_s": 0.003, "s_per_byte": 1e-9, "layer_fixed_s": 0.0005, "sync": sync}
    prof = flat_profile(P, D, transfer=tr)
    block = 16 * 1024
    short, long = simulate([("cpu:0", "prompt", prof), ("cpu:1", "token", prof)],
                           [RequestSpec(100, 3), RequestSpec(600, 3)], [0.0, 1.0], Policy(layerwise_min_tokens=512)).results
    whole = 0.003 + 7 * block * 1e-9  # 100 tokens: 7 blocks in one call
    assert short.token_s == approx([P, P + whole + D, P + whole + 2 * D])
    layers = 4 * 0.0005 + 38 * block * 1e-9  # 600 tokens: 38 blocks, a call per layer
    if sync:
        assert long.token_s == approx([1 + P + layers, 1 + P + layers + D, 1 + P + layers + 2 * D])
    else:
        last = 0.0005 + 38 * block // 4 * 1e-9  # only the last layer's copy is not hidden
        assert long.token_s == approx([1 + P, 1 + P + last + D, 1 + P + last + 2 * D])


def test_devices_stepping_at_once_slow_each_other_by_the_co_run_factor():
    """The factor is the one for the neighbour's kind of step, taken when the step starts."""
    prof = flat_profile(P, D, corun={"prefill": {"prefill": [[1, 2.0]], "decode": [[1, 3.0]]},
                                     "decode": {"prefill": [[1, 1.5]], "decode": [[1, 1.25]]}})
    a, b = simulate([("cpu:0", "mixed", prof), ("cpu:1", "mixed", prof)], [RequestSpec(100, 3)] * 2, [0.0, 0.0]).results
    assert a.token_s == approx([P, P + 1.5 * D, P + 3 * D])  # started alone; both decodes start while b prefills
    assert b.token_s == approx([2 * P, 2 * P + D, 2 * P + 2 * D])  # started while a prefilled; decodes once a is done


def test_the_event_loop_costs_a_worker_core_only_when_workers_take_every_core():
    prof = flat_profile(P, D, overhead={"step_s": 0.0005, "latency_s": 0.001, "loop_s_per_token": 0.0003, "cores": 2},
                        measured={"cpu_threads": 1})
    spec = [RequestSpec(100, 3)]
    alone_run = simulate([("cpu:0", "mixed", prof)], spec, [0.0]).results[0]  # one worker, a core to spare
    assert alone_run.token_s == approx([P + 0.0005 + 0.001, P + D + 0.001 + 0.001, P + 2 * D + 0.0015 + 0.001])
    split = simulate([("cpu:0", "prompt", prof), ("cpu:1", "token", prof)], spec, [0.0]).results[0]
    step = 0.0005 + 0.0003  # every step hands one token to the loop, which runs on a worker's core
    assert split.token_s == approx([P + step + 0.001, P + D + 2 * step + 0.001, P + 2 * D + 3 * step + 0.001])


def _pressure_runs(fast: bool):
    """Small KV pools, a short budget and Poisson bursts: preemption, stuck hand-offs, chunking."""
    prof = flat_profile(0.004, 0.003, per_token_s=3e-5, per_seq_s=1e-4, num_kv_blocks=40,
                        transfer={"fixed_s": 0.001, "s_per_byte": 1e-9, "layer_fixed_s": 0.0002, "sync": True},
                        corun={"decode": {"decode": [[1, 1.5], [64, 1.2]]}, "prefill": {"decode": [[16, 1.3]]}})
    runs = []
    for seed, roles in ((1, ("prompt", "token", "mixed")), (3, ("mixed", "mixed")), (5, ("prompt", "prompt", "token")),
                        (1, ("prompt", "mixed"))):
        specs = synthetic("conversation", 300, 0.1, seed)
        sim = Simulator([(f"cpu:{i}", r, prof) for i, r in enumerate(roles)],
                        Policy(layerwise_min_tokens=50, max_num_batched_tokens=128))
        sim.fast_path = fast
        runs.append((specs, sim.run(specs, poisson_arrivals(len(specs), 60.0, seed))))
    return runs


def test_the_per_token_shortcut_gives_the_runs_of_the_ported_batcher():
    fast, slow = _pressure_runs(True), _pressure_runs(False)
    for (_, a), (_, b) in zip(fast, slow):
        assert [r.token_s for r in a.results] == [r.token_s for r in b.results]
        assert a.devices == b.devices
        assert a.num_events == b.num_events


def test_every_request_finishes_and_kv_never_exceeds_capacity():
    runs = _pressure_runs(True)
    for specs, res in runs:
        too_long = [s for s in specs if s.prompt_len + s.output_len > 40 * 16]
        assert sum(r.error is not None for r in res.results) == len(too_long)  # refused, as check_length does
        for r, s in zip(res.results, specs):
            if r.error is None:
                assert len(r.token_s) == s.output_len and r.token_s == sorted(r.token_s)
        for d in res.devices:
            assert 0 < d["kv_peak_blocks"] <= d["kv_blocks"]
            assert d["kv_free_at_end"] == d["kv_blocks"]  # every block and reservation given back
    assert sum(d["preemptions"] for _, res in runs for d in res.devices) > 50  # the pressure was real


def test_the_autoscaler_borrows_a_token_device_when_prompts_queue():
    prof = flat_profile(0.02, 0.002, per_token_s=1e-4)
    specs = [RequestSpec(400, 8)] * 200
    sim = Simulator([("cpu:0", "prompt", prof), ("cpu:1", "token", prof), ("cpu:2", "token", prof)],
                    Policy(autoscale=True, borrow_prompt_tokens=2000, repurpose_after_s=1e9))
    res = sim.run(specs, [i * 0.01 for i in range(200)])
    assert sim.num_borrows >= 1
    assert all(r.ok for r in res.results)
    assert res.devices[0]["steps"] and res.devices[2]["prefill_busy_s"] > 0  # the borrowed one prefilled


def test_a_ten_minute_trace_on_eight_devices_finishes():
    """20 requests/s for ten minutes, conversation-shaped at a quarter scale: the simulation does
    every step of every device (work done is asserted, not time)."""
    specs = synthetic("conversation", 12_000, 0.25, 7)
    arrivals = poisson_arrivals(len(specs), 20.0, 7)
    prof = flat_profile(0.004, 0.004, per_token_s=2e-5, per_seq_s=5e-5)
    res = simulate([(f"cuda:{i}", "prompt" if i < 3 else "token", prof) for i in range(8)], specs, arrivals)
    assert all(r.ok for r in res.results)
    assert sum(len(r.token_s) for r in res.results) == sum(s.output_len for s in specs)
    assert res.end_s > 590
    assert sum(d["steps"] for d in res.devices) > 50_000
