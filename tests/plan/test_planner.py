"""Layout enumeration, ranking, the `splitnode plan` command, and --apply against a real server."""

from __future__ import annotations

import math

import pytest
from conftest import flat_profile

from splitnode.api import Server
from splitnode.cli import main
from splitnode.goodput.workloads import RequestSpec, poisson_arrivals, synthetic
from splitnode.plan import command
from splitnode.plan.planner import Layout, Planner, layouts, parse_layout
from splitnode.runtime import Runtime, RuntimeConfig


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_every_count_of_prompt_token_and_mixed_devices_once_and_only_those_that_can_serve(n):
    found = layouts(n)
    # all (p, t, m) with p + t + m = n, less all-prompt and all-token (a phase without devices)
    assert len(found) == math.comb(n + 2, 2) - 2
    assert len({(x.num_prompt, x.num_token, x.num_mixed) for x in found}) == len(found)  # symmetry: each count once
    for x in found:
        assert x.num_devices == n
        assert x.num_prompt + x.num_mixed >= 1 and x.num_token + x.num_mixed >= 1
        assert parse_layout(x.name, n) == x  # the name is one `bench serve --compare` takes
    if n == 2:
        assert {x.name for x in found} == {"1p1t", "1p1m", "1t1m", "2m"}


def test_the_autoscaler_variant_is_added_where_there_are_both_pools():
    names = {x.name for x in layouts(3, autoscale=True)}
    assert {"1p2t+policy", "2p1t+policy", "1p1t1m+policy"} <= names
    assert "3m+policy" not in names and "1t2m+policy" not in names


def test_layout_names_parse_like_the_bench_and_bad_ones_are_refused():
    assert parse_layout("colocated", 3) == Layout(0, 0, 3)
    assert parse_layout("split", 3) == Layout(1, 2, 0)
    assert parse_layout("1p1t+policy", 2) == Layout(1, 1, 0, autoscale=True)
    assert Layout(1, 2, 0).roles() == ["prompt", "token", "token"]
    for bad, n in (("2p", 2), ("1p1t", 3), ("1x1t", 2), ("1p1t+fast", 2)):
        with pytest.raises(ValueError):
            parse_layout(bad, n)


def test_split_wins_where_prefills_would_stall_the_decodes_of_a_colocated_device():
    """Long prefills (60 ms) and a tight absolute TBT limit: mixed devices interleave the
    prefills with decodes and break the limit at low load; a prompt device and a token device
    keep every decode step at 2 ms."""
    prof = flat_profile(0.060, 0.002)
    specs = [RequestSpec(500, 64)] * 120
    planner = Planner(prof, 2, specs, poisson_arrivals(len(specs), 1.0, 0), slo={"tbt": 0.004})
    ranked = planner.evaluate(layouts(2), rate=None, sweep=True)
    by_name = {e.layout.name: e for e in ranked}
    assert ranked[0].layout.name == "1p1t"
    assert by_name["1p1t"].goodput > 2 * by_name["2m"].goodput
    assert by_name["1p1t"].at_rate["met"] and not by_name["2m"].at_rate["met"]  # both seen at the winner's goodput
    assert by_name["1p1t"].at_rate["rate"] == pytest.approx(ranked[0].goodput)
    assert ranked[0].per_device == pytest.approx(ranked[0].goodput / 2)


def test_colocated_wins_where_prefills_are_cheap_and_a_split_leaves_a_device_idle():
    prof = flat_profile(0.002, 0.004, per_seq_s=1e-3)
    specs = synthetic("conversation", 150, 0.05, 1)
    planner = Planner(prof, 2, specs, poisson_arrivals(len(specs), 1.0, 1), slo={"ttft": 0.5, "e2e": 2.0})
    ranked = planner.evaluate(layouts(2), rate=None, sweep=True)
    assert ranked[0].layout.name == "2m"
    assert planner.num_sims > 4


@pytest.fixture
def profile_file(tmp_path):
    path = tmp_path / "h200.json"
    flat_profile(0.008, 0.003, per_token_s=4e-6, per_seq_s=3e-5, device="NVIDIA H200", kind="cuda").save(path)
    return path


def test_plan_ranks_every_layout_of_devices_that_are_not_here(profile_file, capsys):
    rc = main(["plan", "--profile-file", str(profile_file), "--devices", "4", "--workload", "conversation",
               "--scale", "0.05", "--num-requests", "60", "--sweep-runs", "6", "--slo", "ttft=200,tbt=20"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split()[0] for line in out.splitlines()[1:] if line and not line.startswith("recommended")]
    assert sorted(rows) == sorted(x.name for x in layouts(4)) and len(rows) == 13
    assert f"recommended: {rows[0]} " in out


def test_plan_at_one_rate_with_json(profile_file, tmp_path, capsys):
    import json

    out_file = tmp_path / "plan.json"
    rc = main(["plan", "--profile-file", str(profile_file), "--devices", "2", "--scale", "0.05", "--num-requests", "40",
               "--rate", "3", "--layouts", "colocated,1p1t", "--json", str(out_file)])
    assert rc == 0
    assert "at 3.00 req/s" in capsys.readouterr().out
    data = json.loads(out_file.read_text())
    assert [x["layout"] for x in data["layouts"]] and {x["layout"] for x in data["layouts"]} == {"2m", "1p1t"}
    assert all(x["goodput"] is None and x["at_rate"]["num_ok"] == 40 for x in data["layouts"])


def test_help_explains_profile_plan_and_apply_with_an_example_each(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for example in ("splitnode plan --profile --devices cpu:2", "splitnode plan --devices cpu:2 --workload",
                    "--profile-file", "--apply"):
        assert example in text


async def test_apply_moves_a_running_server_to_the_layout_through_mixed(sock_dir):
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)) as rt, \
            Server(rt, sock_dir / "s.sock") as srv:
        assert [d["role"] for d in rt.status()["devices"]] == ["prompt", "token"]
        roles = await command.apply(srv.path, "1t1m")
        assert roles == {"cpu:0": "token", "cpu:1": "mixed"}
        st = rt.status()["devices"]
        assert [(d["role"], d["pinned"]) for d in st] == [("token", True), ("mixed", True)]
        await command.apply(srv.path, "1p1t+policy")
        assert [(d["role"], d["pinned"]) for d in rt.status()["devices"]] == [("prompt", False), ("token", False)]


def test_plan_replays_a_trace_and_simulates_the_autoscaler_variants(profile_file, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [f"{i * 0.2:.1f},{200 + 37 * i % 900},{5 + i % 40}" for i in range(40)]
    trace.write_text("\n".join(rows + ["7.9,oops,3"]) + "\n")
    rc = main(["plan", "--profile-file", str(profile_file), "--devices", "3", "--trace", str(trace), "--scale", "0.5",
               "--autoscale", "--sweep-runs", "4", "--slo", "ttft=300"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "skipped trace.csv line 42" in captured.err  # a bad row is named, not dropped unseen
    names = [line.split()[0] for line in captured.out.splitlines()[1:] if line and not line.startswith("recommended")]
    assert set(names) == {x.name for x in layouts(3, autoscale=True)}
