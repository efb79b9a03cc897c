"""The README's Python snippets and the example scripts it points to run as they are (issue 9: the
Library and Client snippets used top-level `await` and failed as scripts; gpu_check_model.py
crashed without a GPU)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitnode.api import serve
from splitnode.runtime import Runtime, RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]
# The snippets run, each found by a line of its own; the Client and raw msgpack ones talk to the
# default socket ($XDG_RUNTIME_DIR/splitnode/splitnode.sock). The Runtime one is left out: it runs
# three CPU workers with a GiB of KV cache each, half a minute on a loaded two-core host.
SNIPPETS = {"library": "from splitnode import LLM, SamplingParams", "client": "from splitnode.api import Client",
            "raw msgpack": "import msgpack, os, socket"}
# Each snippet compiled as a module (so top-level `await` is the SyntaxError it is in a script)
# and run as __main__, one after the other in one interpreter: one start-up of torch, not three.
RUNNER = """
import sys
for path in sys.argv[1:]:
    print(f"=== {path}", flush=True)
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), {"__name__": "__main__"})
"""


def readme_snippets() -> dict[str, str]:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    found = {name: [b for b in blocks if marker in b] for name, marker in SNIPPETS.items()}
    assert all(len(b) == 1 for b in found.values()), {name: len(b) for name, b in found.items()}
    return {name: b[0] for name, b in found.items()}


async def test_readme_snippets_run_as_scripts(sock_dir, tmp_path):
    files = {}
    for name, code in readme_snippets().items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.py"
        files[name].write_text(code)
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)) as rt:
        srv = await serve(rt, sock_dir / "splitnode" / "splitnode.sock")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RUNNER, *map(str, files.values()), cwd=tmp_path,
                env={**os.environ, "XDG_RUNTIME_DIR": str(sock_dir)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 300)
        finally:
            await srv.close()
        assert proc.returncode == 0, err.decode()[-4000:]
        assert [d["role"] for d in rt.status()["devices"]] == ["mixed", "token"]  # the Client snippet's assign
    shown = dict(zip(files, out.decode().split("=== ")[1:]))
    assert "'role': 'mixed'" in shown["client"]
    raw = shown["raw msgpack"].splitlines()[1:]
    assert [line[:15] for line in raw] == ["[2, 'token', [1"] * 3 + ["[1, 1, None, {'"]
    assert "'finished': True" in raw[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the script does without a GPU")
def test_gpu_check_model_without_a_gpu_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "gpu_check_model.py")], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "no CUDA: examples/gpu_check_model.py needs a GPU; nothing to check\n", "")
