"""What a new user meets first at the command line (issue 9): a device this machine lacks, a
prompt past --max-model-len, `python -m splitnode`. Each is one line on stderr and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from splitnode import LLM, SamplingParams, cli

# cuda and cuda:0 are devices this machine lacks only where torch sees no GPU
LACKING = ["bogus", "cuda:x", "cuda:99", *([] if torch.cuda.is_available() else ["cuda", "cuda:0"])]


@pytest.mark.parametrize("command", [["generate", "Hi"], ["bench"]])
@pytest.mark.parametrize("device", LACKING)
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(command, device, capsys):
    """Issue: `generate --device cuda` on a torch without CUDA ended in AssertionError's traceback."""
    assert cli.main([*command, "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"splitnode {command[0]}: error: EngineConfig.device "), err
    assert repr(device) in err


@pytest.mark.parametrize("device", LACKING)
def test_llm_on_a_device_this_machine_lacks_is_a_value_error(device):
    with pytest.raises(ValueError, match=r"^EngineConfig\.device (must be cpu, cuda or cuda:N|is .* but)"):
        LLM(device=device)


def test_python_m_splitnode_is_the_command():
    done = subprocess.run([sys.executable, "-m", "splitnode", "generate", "Hi", "--device", "bogus"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (
        2, "splitnode generate: error: EngineConfig.device must be cpu, cuda or cuda:N, got 'bogus'\n")


def test_a_prompt_past_max_model_len_names_the_flag(capsys):
    """Issue: the message called --max-model-len "the model's limit"."""
    assert cli.main(["generate", "x" * 40, "--max-model-len", "32", "--num-kv-blocks", "64"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "splitnode generate: error: prompt (41 tokens) + max_tokens (64) = 105 exceeds the maximum model length 32 "
        "(set by max_model_len, --max-model-len)")


def test_a_prompt_past_the_models_context_says_so():
    llm = LLM(num_kv_blocks=1024)  # 16384 token slots: the demo model's 4096 binds
    with pytest.raises(ValueError, match=r"= 4100 exceeds the maximum model length 4096 \(the model's context length\)$"):
        llm.generate([[1] * 4096], SamplingParams(max_tokens=4))
