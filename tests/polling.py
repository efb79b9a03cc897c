"""Bounded polling for conditions reached on other threads (the runtime frees blocks on its
workers, with no event a test could await): never a bare sleep as synchronisation."""

import asyncio


async def until(condition, timeout: float = 10.0, step: float = 0.01) -> None:
    for _ in range(int(timeout / step)):
        if condition():
            return
        await asyncio.sleep(step)
    raise AssertionError("condition not reached in time")


async def wait_for(pilot, check, timeout_s: float = 20.0, step_s: float = 0.05) -> None:
    """Polls `check()` between Textual pilot pauses until it is true; fails after `timeout_s`."""
    for _ in range(int(timeout_s / step_s)):
        if check():
            return
        await pilot.pause(step_s)
    assert check(), f"not true after {timeout_s}s"
