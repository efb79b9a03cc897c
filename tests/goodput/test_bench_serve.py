"""`splitnode bench serve` end to end on the demo model: in this process and against a server's
socket, each layout really set, every request served to its length, figures written."""

import json

import pytest

from splitnode import cli
from splitnode.api import serve
from splitnode.goodput import command
from splitnode.goodput import workloads as W
from splitnode.runtime import Runtime, RuntimeConfig

SMALL = ["--workload", "conversation", "--scale", "0.02", "--num-requests", "6", "--warmup", "1"]


def test_in_process_compare_sets_each_layout_and_serves_every_request(tmp_path, capsys):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    rc = cli.main(["bench", "serve", "--devices", "cpu:2", *SMALL, "--rate", "20", "--compare", "colocated,1p1t",
                   "--num-kv-blocks", "256", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "colocated" in table and "1p1t" in table and "vs colocated" in table
    report = json.loads(out.read_text())
    specs = W.synthetic("conversation", 6, 0.02, 0)
    runs = {r["layout"]: r for r in report["runs"]}
    assert runs["colocated"]["roles"] == {"cpu:0": "mixed", "cpu:1": "mixed"}
    assert runs["1p1t"]["roles"] == {"cpu:0": "prompt", "cpu:1": "token"}
    for r in runs.values():
        assert r["rate"] == 20 and r["num_ok"] == 6 and r["num_failed"] == 0
        assert r["num_output_tokens"] == sum(s.output_len for s in specs)
        assert set(r["slowdown"]["percentiles"]) == {"ttft", "tbt", "e2e"}
        assert r["energy"] == dict.fromkeys(set(r["roles"].values()) | {"all"}, "n/a")  # a CPU has no meter
    assert runs["colocated"]["transfers"]["num_sequences"] == 0
    # a one-token request is done at its prefill: only the others move to the token device
    moved = sum(s.output_len > 1 for s in specs)
    assert moved >= 2 and runs["1p1t"]["transfers"]["num_sequences"] == moved
    assert runs["1p1t"]["transfers"]["bytes_moved"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


async def test_against_a_server_socket_in_a_closed_loop(sock_dir, tmp_path):
    out = tmp_path / "sock.json"
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=128, autoscale=False)) as rt:
        srv = await serve(rt, sock_dir / "s.sock")
        try:
            args = cli.build_parser().parse_args(["bench", "serve", "--socket", str(srv.path), *SMALL,
                                                  "--concurrency", "3", "--compare", "split,colocated",
                                                  "--json", str(out)])
            command.check_args(args)
            assert await command._main(args, {}) == 0
            # the last layout stays, pinned, as a person's assign would leave it
            assert [(d["role"], d["pinned"]) for d in rt.status()["devices"]] == [("mixed", True)] * 2
        finally:
            await srv.close()
    report = json.loads(out.read_text())
    assert [r["layout"] for r in report["runs"]] == ["split", "colocated"]
    assert all(r["num_ok"] == 6 and r["rate"] is None for r in report["runs"])
    assert report["meta"]["target"].startswith("server at")


@pytest.mark.parametrize("argv,message", [
    (["--rate", "fast"], "--rate: 'fast' is not one or more rates"),
    (["--rate", "2", "--concurrency", "2"], "exclude each other"),
    (["--devices", "cpu:2", "--compare", "1p2t"], "layout '1p2t' names 3 devices; there are 2"),
    (["--slo", "ttft=soon"], "--slo: 'ttft=soon' is not KEY=MILLISECONDS"),
    (["--workload", "conversation", "--trace", "/nonexistent.csv"], "nonexistent.csv"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitnode bench: error:") and message in err[-1]
