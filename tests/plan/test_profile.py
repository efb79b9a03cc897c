"""Profiles: the cost model between measured points, storage, refusal of another version's
profile, and a real (short) measurement of the demo model on two CPU workers."""

from __future__ import annotations

import json

import pytest
from conftest import flat_profile

from splitnode.cli import main
from splitnode.plan.measure import measure
from splitnode.plan.profile import Profile, ProfileError, interp, monotone, profile_path


def test_the_cost_model_interpolates_between_measured_points_and_extends_the_last_segment():
    assert interp([16, 64], [1.0, 4.0], 40) == pytest.approx(2.5)
    assert interp([16, 64], [1.0, 4.0], 8) == 1.0  # less work still pays the fixed cost
    assert interp([16, 64], [1.0, 4.0], 112) == pytest.approx(7.0)
    assert monotone([3.0, 1.0, 2.0, 5.0]) == pytest.approx([2.0, 2.0, 2.0, 5.0])  # noise never makes more work cheaper
    prof = flat_profile(0.01, 0.002, per_token_s=1e-5, per_seq_s=1e-4, mixed_shared_s=0.001)
    assert prof.prefill_s(1025) == pytest.approx(0.01 + 1e-5 * 1024)
    assert prof.decode_s(129, 129 * 500) == pytest.approx(0.002 + 1e-4 * 128)
    assert prof.step_s([(100, 0)], 8, 800) == pytest.approx(prof.prefill_s(100) + prof.decode_s(8, 800) - 0.001)


def test_a_profile_round_trips_through_its_file(tmp_path):
    prof = flat_profile(0.01, 0.002, per_token_s=1e-5, corun={"decode": {"decode": [[1, 1.7]]}},
                        power_w={"prefill": 600, "decode": 400, "idle": 90})
    path = prof.save(tmp_path / "sub" / "p.json")
    again = Profile.load(path)
    assert again == prof
    assert again.decode_s(7, 70) == prof.decode_s(7, 70) and again.corun_factor(False, 1, 1, 0) == pytest.approx(1.7)
    assert profile_path("demo-v1", "AMD EPYC, 1 core", "auto").name == "demo-v1--AMD_EPYC_1_core--auto.json"


def test_a_profile_from_another_version_is_refused_with_one_line_saying_to_re_profile(tmp_path, capsys):
    path = flat_profile().save(tmp_path / "old.json")
    data = json.loads(path.read_text())
    data["version"] = "0.0.1"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"measured by splitnode 0\.0\.1.*re-profile with `splitnode plan --profile`"):
        Profile.load(path)
    assert main(["plan", "--profile-file", str(path), "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "splitnode plan: error:" in err[0] and "re-profile" in err[0]
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not a readable profile"):
        Profile.load(path)


def test_planning_without_a_profile_says_how_to_measure_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: no profile yet (the demo model is written there)
    assert main(["plan", "--devices", "cpu:2"]) == 2
    err = capsys.readouterr().err
    assert "no profile of demo-v1 on" in err and "1 core (auto)" in err and "splitnode plan --profile --devices cpu:2" in err


def test_measuring_the_demo_model_on_two_cpu_workers(tmp_path):
    """A short budget still gives every part of the model: the ladder, a row per batch size, the
    KV move between the two workers, the co-run slowdown and the runtime's own overhead."""
    seen = []
    prof = measure(["cpu:0", "cpu:1"], {"max_num_batched_tokens": 256, "max_num_seqs": 8, "num_kv_blocks": 256},
                   budget_s=2.0, progress=lambda what, frac: seen.append(frac))
    assert prof.model == "demo-v1" and prof.device.endswith("1 core") and prof.kind == "cpu"
    assert prof.prefill["tokens"][0] == 16 and len(prof.prefill["tokens"]) >= 2 and max(prof.prefill["tokens"]) <= 256
    assert [r["batch"] for r in prof.decode] == [1, 2, 4, 8]
    assert prof.transfer["s_per_byte"] > 0 and prof.transfer["sync"]
    assert set(prof.corun) == {"decode", "prefill"} and prof.corun["decode"]["decode"][0][0] == 1
    assert prof.kv_bytes_per_token == 2 * 4 * 4 * 32 * 4 and prof.num_kv_blocks == 256
    assert prof.overhead["step_s"] >= 0 and prof.overhead["latency_s"] >= 0  # measured through a real runtime
    assert 0 < prof.prefill_s(16) <= prof.prefill_s(256) and prof.decode_s(1, 16) <= prof.decode_s(8, 8 * 2048)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert Profile.load(prof.save(tmp_path / "demo.json")) == prof
