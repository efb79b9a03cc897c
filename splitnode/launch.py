"""The process environment CPU inference wants, set up by the `splitnode` program itself.

glibc's malloc hands large freed blocks back to the OS and takes them again as fresh pages: a
prefill's temporaries (tens of MB a layer) cost hundreds of thousands of page faults a run, and
the same run varies by seconds. tcmalloc keeps them. An allocator can only be chosen before the
process starts (LD_PRELOAD), so the commands that run an engine re-execute themselves once with
tcmalloc preloaded, where it is installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)
and not preloaded already. SPLITNODE_NO_PRELOAD=1 opts out. Measured in BENCHMARKS.md ("CPU
engine: profile and vLLM comparison"). Threads are placed elsewhere: each CPU worker binds its own
thread to its cores (runtime/worker.py).
"""

from __future__ import annotations

import ctypes.util
import os
import sys

OPT_OUT = "SPLITNODE_NO_PRELOAD"
ENGINE_COMMANDS = frozenset({"generate", "serve", "up", "bench", "plan"})
CLIENT_COMMANDS = frozenset({"status", "assign", "release", "dash"})  # talk to a server: nothing to gain
ALLOCATOR = "tcmalloc_minimal"  # without the heap profiler of full tcmalloc, which splitnode does not use


def preload_env(argv: list[str], environ: dict[str, str], find=ctypes.util.find_library) -> dict[str, str] | None:
    """The environment to re-execute `splitnode argv` in, or None to run as is: not an engine
    command, opted out, not Linux, an allocator preloaded already, or none installed."""
    command = next((a for a in argv if a in ENGINE_COMMANDS | CLIENT_COMMANDS), None)
    preload = environ.get("LD_PRELOAD", "")
    if (command not in ENGINE_COMMANDS or environ.get(OPT_OUT, "") not in ("", "0") or not sys.platform.startswith("linux")
            or any(lib in preload for lib in ("tcmalloc", "jemalloc", "mimalloc"))):
        return None
    lib = find(ALLOCATOR)  # a soname from the linker's cache, which LD_PRELOAD resolves as the linker does
    if lib is None:
        return None
    return {**environ, "LD_PRELOAD": f"{preload}:{lib}" if preload else lib}


def reexec_with_allocator(argv: list[str]) -> None:
    """Replaces this process with `python -m splitnode argv` under preload_env's environment; returns
    only when there is nothing to do. The child sees the allocator in LD_PRELOAD, so it never
    re-executes again."""
    env = preload_env(argv, dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "splitnode", *argv], env)
