"""What crosses a thread or a worker boundary, as dataclasses: the shape a worker in another
process would serialize. The loop posts `Add` and `Arrive` into a worker's inbox; a worker reports
`TokenEvent`s, hand-offs (`Arrive` for the destination), `RoleReached` and `WorkerFailed` through
its listener.

A cancel is not a message here: the loop sets `Sequence.cancelled`, which every worker reads at
its next turn wherever the sequence is (queued, running, or with its KV on the way), so no race
with a hand-off can lose it. A remote worker would receive it as a message naming the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitnode.engine.batcher import Role
from splitnode.engine.sequence import Sequence


@dataclass(eq=False)
class Add:
    """A fresh request routed to this worker for its prefill (and its decode, if it keeps it)."""

    seq: Sequence


@dataclass(eq=False)
class Arrive:
    """A sequence handed to this worker with its KV cache already in its blocks here, or on its
    way: `event` (CUDA) fires when the copy is complete; `failed` says the copy could not be
    issued, and the prefill is recomputed here."""

    seq: Sequence
    event: Any = None  # torch.cuda.Event, or None when the copy was synchronous
    failed: bool = False


@dataclass(eq=False)
class Arrival:
    """An `Arrive` taken from the inbox, waiting for its KV (or its timeout) before it joins the
    batches."""

    seq: Sequence
    event: Any
    failed: bool
    since: float  # time.monotonic() when the worker took it

    def copy_done(self) -> bool:
        return self.event is None or self.event.query()


@dataclass(frozen=True)
class TokenEvent:
    """A snapshot of one sequence after a step: how many tokens it has produced, and why it
    ended (None while it goes on). The loop builds the caller's event from it when the caller
    takes it, so a slow consumer costs a queue of these, not a copy of the output per token."""

    seq_id: int
    num_out: int
    finish_reason: str | None
    error: str | None = None  # the sequence failed on its own (finish_reason "abort"): why


@dataclass(frozen=True)
class RoleReached:
    """The worker now has `role`; every change asked up to generation `gen` is done."""

    worker: str
    gen: int
    role: Role


@dataclass(frozen=True)
class WorkerFailed:
    worker: str
    error: BaseException
