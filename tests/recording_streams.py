"""RecordingStreams: a recording test double of `splitnode.engine.streams.Streams`.

Streams are labels (strings such as "P.transfer"), events are `FakeEvent`s, and every call is
appended to `calls` with the stream current on the calling thread at that moment, so a test
checks on the CPU which stream each wait, record and id tensor was on, in order. A None stream
behaves as on the CPU (no-op), so engines on the CPU still run their real data path.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from splitnode.engine.streams import Streams


class FakeEvent:
    """Stands in for a torch.cuda.Event recorded on `stream`; fired unless told otherwise."""

    def __init__(self, stream: str, fired: bool = True):
        self.stream = stream
        self.fired = fired

    def query(self) -> bool:
        return self.fired

    def __repr__(self) -> str:
        return f"FakeEvent({self.stream!r}, fired={self.fired})"


class RecordingStreams(Streams):
    def __init__(self):
        self.calls: list[tuple] = []
        self._local = threading.local()
        self._count = 0

    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @property
    def current(self) -> str | None:
        """The stream current on the calling thread (None: the device's default, as in torch)."""
        stack = self._stack()
        return stack[-1] if stack else None

    def new(self, device: torch.device) -> str:
        self._count += 1
        return f"{device}#{self._count}"

    @contextlib.contextmanager
    def on(self, stream):
        if stream is None:
            yield
            return
        self.calls.append(("on", stream))
        self._stack().append(stream)
        try:
            yield
        finally:
            self._stack().pop()

    def wait_stream(self, waiter, stream) -> None:
        if waiter is not None and stream is not None:
            self.calls.append(("wait_stream", waiter, stream))

    def record(self, stream):
        if stream is None:
            return None
        event = FakeEvent(stream)
        self.calls.append(("record", stream, event))
        return event

    def wait_event(self, stream, event) -> None:
        if stream is not None and event is not None:
            self.calls.append(("wait_event", stream, event))

    def ids(self, values: list[int], device: torch.device) -> torch.Tensor:
        self.calls.append(("ids", self.current, list(values)))
        return torch.tensor(values, dtype=torch.int64)

    def synchronize(self, device: torch.device) -> None:
        self.calls.append(("synchronize", str(device)))

    def of(self, kind: str) -> list[tuple]:
        """The calls of one kind ("ids", "wait_event", ...), in order."""
        return [c for c in self.calls if c[0] == kind]
