"""Which device and stream the engine's GPU work runs on, checked on the CPU with recording
doubles of the CUDA API: graph capture (C1), every step of `LLM` (C2), the end of start-up (E1)."""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import torch
from recording_streams import RecordingStreams

from splitnode.engine import engine as engine_module
from splitnode.engine.config import EngineConfig
from splitnode.engine.engine import Engine
from splitnode.engine.model_runner import capture_ladder
from splitnode.engine.sampling import SamplingParams


class RecordingCuda:
    """A recording test double of the part of torch.cuda that graph capture uses. Like torch,
    entering a stream makes its device current, and `graph()` without `stream=` captures on one
    process-wide stream made on the device current at the first capture."""

    def __init__(self):
        self.calls: list[tuple] = []
        self._devices: list[str] = ["cuda:0"]  # a fresh thread's current device
        self._streams: list[object] = [None]
        self._default_capture_stream = None
        self._count = 0

    @property
    def current(self) -> tuple[str, object]:
        return self._devices[-1], self._streams[-1]

    def Stream(self, device):  # noqa: N802 (torch's name)
        self._count += 1
        return SimpleNamespace(device=str(device), name=f"stream#{self._count}")

    @contextlib.contextmanager
    def device(self, device):
        self._devices.append(str(device))
        try:
            yield
        finally:
            self._devices.pop()

    @contextlib.contextmanager
    def stream(self, stream):
        self._devices.append(stream.device)
        self._streams.append(stream)
        try:
            yield
        finally:
            self._streams.pop()
            self._devices.pop()

    def CUDAGraph(self):  # noqa: N802
        return SimpleNamespace(pool=lambda: "pool")

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        if stream is None:
            if self._default_capture_stream is None:
                self._default_capture_stream = self.Stream(self.current[0])
            stream = self._default_capture_stream
        self.calls.append(("capture", stream, capture_error_mode))
        with self.stream(stream):
            yield

    def synchronize(self, device):
        self.calls.append(("synchronize", str(device)))


def test_each_engine_warms_up_and_captures_its_graphs_on_a_stream_of_its_own_device():
    """C1: engines made one after another in one process (cuda:0, then cuda:1) each capture on
    their own device; with torch's default capture stream the second would capture on cuda:0."""
    cuda = RecordingCuda()
    streams = {}
    for dev in ("cuda:0", "cuda:1"):
        runs = []
        graphs, outs, stream = capture_ladder(cuda, torch.device(dev), [1, 2, 4],
                                              lambda bs, runs=runs: runs.append((bs, *cuda.current)) or bs * 10)
        streams[dev] = stream
        assert stream.device == dev
        assert runs == [(bs, dev, stream) for bs in (4, 4, 2, 2, 1, 1)]  # warm-up, then capture, for each size
        assert sorted(graphs) == [1, 2, 4] and outs == {1: 10, 2: 20, 4: 40}
    captures = [c for c in cuda.calls if c[0] == "capture"]
    assert [c[1] for c in captures] == [streams["cuda:0"]] * 3 + [streams["cuda:1"]] * 3
    assert all(mode == "thread_local" for *_, mode in captures)
    # the device is synchronized before (inputs written on the default stream) and after
    assert [c for c in cuda.calls if c[0] == "synchronize"] == [("synchronize", d) for d in ("cuda:0",) * 2 + ("cuda:1",) * 2]


async def test_every_llm_step_runs_on_its_engines_compute_stream_whichever_thread_steps(make_llm):
    """C2: `generate` steps on the calling thread, `stream` on an executor thread whose current
    device is 0; each step enters the engine's own compute stream (and so its device)."""
    llm = make_llm()
    eng, rec = llm.engine, RecordingStreams()
    eng.streams, eng.compute_stream = rec, "cuda:1/compute"
    seen, execute = [], eng.execute

    def recording_execute(batch, layer_hook=None):
        seen.append((rec.current, threading.get_ident()))
        return execute(batch, layer_hook)

    eng.execute = recording_execute
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    out = llm.generate([[5, 6, 7]], greedy)[0]
    num_generate = len(seen)
    events = [ev async for ev in llm.stream([5, 6, 7], greedy)]
    assert events[-1].token_ids == out.token_ids and len(out.token_ids) == 3
    assert len(seen) > num_generate and all(stream == "cuda:1/compute" for stream, _ in seen)
    assert {t for _, t in seen[num_generate:]} != {threading.get_ident()}  # stream() stepped off this thread


def test_an_engine_synchronizes_its_device_once_its_cache_is_zeroed(monkeypatch, make_hf_checkpoint):
    """E1: the cache is zeroed on the loading thread's default stream; the worker's streams are
    non-blocking, so start-up ends by synchronizing the device."""
    rec = RecordingStreams()
    monkeypatch.setattr(engine_module, "STREAMS", rec)
    eng = Engine(EngineConfig(model=str(make_hf_checkpoint()), num_kv_blocks=8, dtype="float32"))
    assert rec.calls[-1] == ("synchronize", "cpu")
    assert eng.compute_stream != eng.transfer_stream and eng.streams is rec
