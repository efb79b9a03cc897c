import pytest

from splitnode.runtime import Runtime, RuntimeConfig


@pytest.fixture
async def rt():
    # autoscale off: only the keys under test move roles. 256 blocks of 16 tokens hold the load
    # generator's longest prompt.
    async with Runtime(RuntimeConfig(devices="cpu:3", num_kv_blocks=256, autoscale=False)) as rt:
        yield rt
