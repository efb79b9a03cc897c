"""The `splitnode` program's own launch environment (splitnode/launch.py): engine commands re-execute
once with tcmalloc preloaded where it is installed; nothing else does."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from splitnode.launch import ALLOCATOR, OPT_OUT, preload_env

INSTALLED = ctypes.util.find_library(ALLOCATOR)
needs_tcmalloc = pytest.mark.skipif(INSTALLED is None or not sys.platform.startswith("linux"),
                                    reason="libtcmalloc_minimal is not installed (apt-get install libtcmalloc-minimal4)")


@needs_tcmalloc
@pytest.mark.parametrize("argv", [["generate", "Hi"], ["bench", "serve", "--rate", "2"], ["--model", "m", "serve"], ["up"]])
def test_an_engine_command_gets_tcmalloc_preloaded(argv):
    env = preload_env(argv, {"HOME": "/h"})
    assert env == {"HOME": "/h", "LD_PRELOAD": INSTALLED}
    assert preload_env(argv, {"LD_PRELOAD": "/lib/libfoo.so"})["LD_PRELOAD"] == f"/lib/libfoo.so:{INSTALLED}"


@pytest.mark.parametrize("argv, environ", [
    (["status"], {}),
    (["--socket", "/s.sock", "assign", "cpu:0", "token"], {}),
    (["generate", "Hi"], {OPT_OUT: "1"}),
    (["generate", "Hi"], {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}),
    (["generate", "Hi"], {"LD_PRELOAD": "libjemalloc.so.2"}),
])
def test_no_reexec_for_clients_an_opt_out_or_an_allocator_already_there(argv, environ):
    assert preload_env(argv, environ) is None


def test_no_reexec_where_no_allocator_is_installed():
    assert preload_env(["generate", "Hi"], {}, find=lambda name: None) is None


@needs_tcmalloc
def test_the_preloaded_soname_is_what_the_child_process_maps():
    """The environment preload_env gives really loads tcmalloc into a new process (the linker
    resolves the bare soname from its cache)."""
    env = preload_env(["generate"], dict(os.environ))
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "libtcmalloc_minimal" in maps


@needs_tcmalloc
def test_the_program_reexecutes_itself_once_before_running_an_engine_command(monkeypatch):
    """`splitnode generate ...` (argv from the command line, not a caller's main([...])) replaces
    itself with `python -m splitnode generate ...` under tcmalloc, before any model loads."""
    import splitnode.launch as launch
    from splitnode import cli

    calls = []

    def execve(path, args, env):
        calls.append((path, args, env["LD_PRELOAD"]))
        raise SystemExit(0)  # what the real exec would never return to

    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(OPT_OUT, raising=False)
    monkeypatch.setattr(sys, "argv", ["splitnode", "generate", "--max-tokens", "1", "Hi"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [(sys.executable, [sys.executable, "-m", "splitnode", "generate", "--max-tokens", "1", "Hi"], INSTALLED)]
    calls.clear()
    assert cli.main(["generate", "--device", "cuda:99", "Hi"]) == 2  # a caller's argv: no re-exec
    assert calls == []
