"""The soak harness (examples/soak.py) for 30 seconds: a real `splitnode serve` in a subprocess,
clients that cancel, leave, read slowly, drop their connection or vanish, roles moved meanwhile.
The harness exits 1 when a request was lost, a greedy output changed, a block stayed held, a
worker failed or the server's idle RSS grew too much."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "examples" / "soak.py"


def test_thirty_seconds_of_misbehaving_clients_lose_nothing(tmp_path):
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(SOAK), "--duration-s", "30", "--clients", "16", "--devices", "cpu:2",
                           "--role-change-every-s", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["lost"] == 0 and figures["greedy_changed"] == 0
    assert figures["requests"] > 50 and set(figures["by_behaviour"]) == {
        "complete", "cancel", "leave", "slow", "disconnect", "vanish", "pings"}
    assert all(held == [0, 0] for held in figures["kv_blocks_held_at_idle"].values())
