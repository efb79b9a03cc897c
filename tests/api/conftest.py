import pytest

from splitnode.runtime import Runtime, RuntimeConfig


@pytest.fixture
async def rt():
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)) as rt:
        yield rt
