"""/metrics against a real Runtime (the demo model on two CPU workers), parsed back with
prometheus_client's own parser: the numbers are the requests' and the runtime's. cpu:1's GPU numbers
come from the real sampler reading `FakeNVML` (tests/fake_nvml.py), as the telemetry tests do; cpu:0
has none, and must export none."""

from __future__ import annotations

import httpx
import openai
import pytest
import pytest_asyncio
from fake_nvml import GIB, FakeNVML, board
from prometheus_client.parser import text_string_to_metric_families

from splitnode.api.http import HTTPServer, serve_http
from splitnode.engine.sampling import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig
from splitnode.telemetry import GPUSampler

pytestmark = pytest.mark.asyncio(loop_scope="module")
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rt():
    sampler = GPUSampler({"cpu:0": None, "cpu:1": "GPU-fake1"}, interval_s=0.05,
                         nvml=FakeNVML({"GPU-fake1": board(power_mw=120_000, temp=44)}))
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False), telemetry=sampler) as rt:
        yield rt


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(rt):
    srv = await serve_http(rt, "127.0.0.1", 0)
    yield srv
    await srv.close()


async def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    async with httpx.AsyncClient() as c:
        r = await c.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset({"model_name": "demo", **labels}.items()))]


async def test_metrics_count_the_requests_of_every_client(rt, server):
    async with openai.AsyncOpenAI(base_url=server.urls[0] + "/v1", api_key="-", max_retries=0) as c:
        text = await c.completions.create(model="demo", prompt="Hello", max_tokens=5, **GREEDY)
        chunks = [x async for x in await c.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True}, **GREEDY)]
    async for ev in rt.generate("Hey", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)):
        pass  # not through HTTP: counted all the same
    m = await scrape(server.urls[0])
    st = rt.status()

    assert value(m, "splitnode:generation_tokens_total") == 5 + 4 + 3 == st["requests"]["num_generated_tokens"]
    prompt_tokens = text.usage.prompt_tokens + chunks[-1].usage.prompt_tokens + len(ev.prompt_token_ids)
    assert value(m, "splitnode:prompt_tokens_total") == prompt_tokens
    assert value(m, "splitnode:request_success_total", finished_reason="length") == 3
    assert value(m, "splitnode:time_to_first_token_seconds_count") == 3
    assert value(m, "splitnode:e2e_request_latency_seconds_count") == 3
    assert value(m, "splitnode:inter_token_latency_seconds_count") == 4 + 3 + 2  # one per gap between tokens
    ttft = value(m, "splitnode:time_to_first_token_seconds_sum")
    assert 0 < ttft < value(m, "splitnode:e2e_request_latency_seconds_sum")
    assert value(m, "splitnode:time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert value(m, "splitnode:num_requests_running") == value(m, "splitnode:num_requests_waiting") == 0

    for device, role in (("cpu:0", "prompt"), ("cpu:1", "token")):
        assert value(m, "splitnode:kv_blocks_total", device=device, role=role) == 64
        assert value(m, "splitnode:kv_blocks_used", device=device, role=role) == 0
        assert value(m, "splitnode:device_role", device=device, role=role) == 1
        assert sum(value(m, "splitnode:device_role", device=device, role=r) for r in ("prompt", "token", "mixed")) == 1
        assert value(m, "splitnode:device_busy_seconds_total", device=device) > 0
        assert 0 <= value(m, "splitnode:device_busy_fraction", device=device, role=role) <= 1
    t = st["transfers"]
    assert value(m, "splitnode:kv_transfer_bytes_total") == t["bytes_moved"] > 0
    assert value(m, "splitnode:kv_transfer_sequences_total") == t["num_sequences"] == 3  # prompt -> token worker
    assert value(m, "splitnode:kv_transfers_failed_total") == value(m, "splitnode:kv_transfers_in_flight") == 0

    gpu = {name: v for (name, labels), v in m.items() if name.startswith("splitnode:gpu_")}
    assert value(m, "splitnode:gpu_power_watts", device="cpu:1", role="token") == 120.0
    assert value(m, "splitnode:gpu_temperature_celsius", device="cpu:1", role="token") == 44
    assert value(m, "splitnode:gpu_memory_total_bytes", device="cpu:1", role="token") == 80 * GIB
    assert value(m, "splitnode:gpu_sm_clock_hertz", device="cpu:1", role="token") == 1980e6
    assert value(m, "splitnode:gpu_energy_joules_total", device="cpu:1") >= 5000.0
    assert not [k for k in m if k[0].startswith("splitnode:gpu_") and ("device", "cpu:0") in k[1]]  # never made up
    assert len(gpu) >= 7


async def test_role_changes_move_the_role_gauge_and_count(rt, server):
    await rt.assign("cpu:1", "mixed")
    try:
        m = await scrape(server.urls[0])
        assert value(m, "splitnode:device_role", device="cpu:1", role="mixed") == 1
        assert value(m, "splitnode:device_role", device="cpu:1", role="token") == 0
        assert value(m, "splitnode:kv_blocks_total", device="cpu:1", role="mixed") == 64
        assert value(m, "splitnode:device_role_changes_total", device="cpu:1") == 1
        assert value(m, "splitnode:device_role_changes_total", device="cpu:0") == 0
    finally:
        await rt.assign("cpu:1", "token")
        rt.release("cpu:1")
    assert value(await scrape(server.urls[0]), "splitnode:device_role_changes_total", device="cpu:1") == 2


async def test_the_metrics_port_serves_metrics_alone(rt, server):
    srv = HTTPServer([("127.0.0.1", 0)], metrics_only=True)
    await srv.start(rt, server.metrics)  # one set of metrics for both, as `serve --http --metrics-port` has
    try:
        async for _ in rt.generate("Hey", SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
            pass
        full, alone = await scrape(server.urls[0]), await scrape(srv.urls[0])
        for name in ("splitnode:generation_tokens_total", "splitnode:prompt_tokens_total",
                     "splitnode:time_to_first_token_seconds_count"):
            assert value(alone, name) == value(full, name) > 0
        async with httpx.AsyncClient(base_url=srv.urls[0]) as c:
            assert (await c.get("/v1/models")).status_code == 404
            assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 404
            assert (await c.get("/health")).status_code == 200
    finally:
        await srv.close()
