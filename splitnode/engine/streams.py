"""The CUDA stream and event calls of the engine and the runtime, behind one small object.

Every ordering between streams goes through `Streams`: a step entering its engine's compute
stream, a KV transfer waiting for the compute that wrote the layer, the source waiting for the
pack that read its blocks, a decode waiting for the copy that wrote its sequence, ids made on the
stream that reads them. A CPU engine's streams are None and every call is a no-op (CPU work is
synchronous, in program order), so the CPU path is the same code. Tests give engines labels for
streams and a recording double of this class (tests/recording_streams.py), and check the order of
the calls on a machine without a GPU.
"""

from __future__ import annotations

import contextlib

import torch


class Streams:
    def new(self, device: torch.device):
        """A stream of its own on `device` (None on the CPU)."""
        return torch.cuda.Stream(device) if device.type == "cuda" else None

    def on(self, stream):
        """`stream`'s device current and `stream` current on it, for torch ops and for Triton
        launches (which take both from the thread's current device): nothing on the CPU."""
        if stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(stream.device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack

    def wait_stream(self, waiter, stream) -> None:
        """`waiter`'s later work runs after everything queued on `stream` so far."""
        if waiter is not None and stream is not None:
            waiter.wait_stream(stream)

    def record(self, stream):
        """An event after everything queued on `stream` so far (None on the CPU: done already)."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream, event) -> None:
        """`stream`'s later work runs after `event` (on any device); the host does not wait."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    def ids(self, values: list[int], device: torch.device) -> torch.Tensor:
        """int64 ids on `device`, made on its current stream (enter the reader's stream first).
        From pinned memory: a pageable host-to-device copy syncs the stream before it starts, so
        the host would wait for whatever is queued there."""
        t = torch.tensor(values, dtype=torch.int64)
        if device.type != "cuda":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    def synchronize(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


STREAMS = Streams()
