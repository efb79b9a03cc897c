"""Rates from the counters in successive `status()` samples (KV bytes moved, tokens generated,
busy seconds), each over the last couple of seconds so a single slow poll does not make it jump."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class Rates:
    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, dict]] = deque()

    def add(self, t: float, status: dict) -> None:
        self._samples.append((t, status))
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate(self, get: Callable[[dict], float | None]) -> float | None:
        """d get(status) / dt between the oldest and newest sample; None until two samples exist
        or when `get` has no value in either."""
        if len(self._samples) < 2:
            return None
        (t0, old), (t1, new) = self._samples[0], self._samples[-1]
        a, b = get(old), get(new)
        if a is None or b is None or t1 <= t0 or b < a:  # a counter went down: a restarted server
            return None
        return (b - a) / (t1 - t0)

    def device_rate(self, name: str, get: Callable[[dict], float | None]) -> float | None:
        def pick(status: dict) -> float | None:
            dev = next((d for d in status["devices"] if d["name"] == name), None)
            return None if dev is None else get(dev)

        return self.rate(pick)
