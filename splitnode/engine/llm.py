"""`LLM`: the single-device engine as a library (vLLM's offline API, plus async streaming)."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections import deque
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from splitnode.engine.config import EngineConfig
from splitnode.engine.engine import Engine, resolve_model_path
from splitnode.engine.outputs import Prompt, RequestOutput, RequestState, new_request
from splitnode.engine.sampling import SamplingParams
from splitnode.engine.sequence import Sequence
from splitnode.model.tokenizer import Tokenizer


def normalize_prompts(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """A string or a list of ids is one prompt; a list of those is many."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    for p in prompts:
        if not (isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p))):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(p).__name__}")
    return prompts


@dataclass(eq=False)
class _Change:
    """A request added, or aborted, by the event loop for the thread that steps the engine."""

    seq: Sequence
    abort: bool = False


class LLM:
    """One model on one device. `LLM()` alone runs the demo model on the CPU."""

    def __init__(self, model: str | None = None, device: str = "cpu", dtype: str = "auto", **kwargs):
        self.config = EngineConfig.from_kwargs(model=model, device=device, dtype=dtype, **kwargs)
        path = resolve_model_path(model)
        self.tokenizer = Tokenizer(path)
        self.engine = Engine(self.config, "mixed", model_path=path)
        self._ids = itertools.count()
        self._seeds = random.Random(self.config.seed)  # seeds of unseeded requests: runs repeat
        self._lock = threading.Lock()  # the engine is stepped by one thread at a time
        self._inbox: deque[_Change] = deque()  # from the event loop, applied between steps in order
        self._queues: dict[int, asyncio.Queue] = {}
        self._stream_states: dict[int, RequestState] = {}
        self._pump: asyncio.Task | None = None

    def _new_request(self, prompt: Prompt, params: SamplingParams) -> RequestState:
        return new_request(next(self._ids), prompt, params, self.tokenizer, self.engine,
                           default_seed=self._seeds.getrandbits(63))

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            while self._inbox:
                change = self._inbox.popleft()
                self.engine.abort(change.seq) if change.abort else self.engine.add(change.seq)
            _, seqs = self.engine.step()
        return seqs

    def _events(self, states: dict[int, RequestState], seqs: list[Sequence]) -> list[RequestOutput]:
        events = []
        for seq in seqs:
            st = states.get(seq.seq_id)
            if st is None:
                continue
            ev = st.update()
            if st.stopped_by_string and not seq.is_finished:
                with self._lock:
                    self.engine.abort(seq)
                seq.finish_reason = "stop"
            events.append(ev)
        return events

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Runs the prompts to completion, batched; outputs in the prompts' order."""
        if self._stream_states:
            raise RuntimeError("LLM.generate() while stream() requests are open on this LLM would take their "
                               "events: use stream() for both, or another LLM")
        prompts = normalize_prompts(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        states = [self._new_request(p, sp) for p, sp in zip(prompts, params)]
        by_id = {st.seq.seq_id: st for st in states}
        final: dict[int, RequestOutput] = {}
        for st in states:
            self._inbox.append(_Change(st.seq))
        while len(final) < len(states):
            for ev in self._events(by_id, self._step()):
                if ev.finished:
                    final[ev.request_id] = ev
        return [final[st.request_id] for st in states]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """One reply to chat messages, rendered with the model's chat template. The template writes
        its own special tokens (BOS), so the text is encoded without adding them again."""
        text = self.tokenizer.apply_chat_template(messages)
        out = self.generate([self.tokenizer.encode(text, add_special_tokens=False)], params)[0]
        out.prompt = text
        return out

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """One event per generated token; the last has `finished=True`. Leaving the loop early
        cancels the request and frees its blocks. A request that fails on its own (its sampling
        raised) raises RuntimeError here instead of its last event."""
        st = self._new_request(prompt, params or SamplingParams())
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[st.request_id] = queue
        self._stream_states[st.request_id] = st
        self._inbox.append(_Change(st.seq))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        finished = False
        try:
            while not finished:
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                finished = ev.finished
                if ev.error is not None:  # this request alone failed; the engine goes on
                    raise RuntimeError(f"request {ev.request_id} failed: {ev.error}")
                yield ev
        finally:
            self._queues.pop(st.request_id, None)
            self._stream_states.pop(st.request_id, None)
            if not finished:
                self._inbox.append(_Change(st.seq, abort=True))

    async def _run_pump(self) -> None:
        try:
            while self._inbox or self.engine.has_work():
                seqs = await asyncio.to_thread(self._step)
                for ev in self._events(self._stream_states, seqs):
                    q = self._queues.get(ev.request_id)
                    if q is not None:
                        q.put_nowait(ev)
        except BaseException as e:  # a failed step reaches every waiting stream
            for q in self._queues.values():
                q.put_nowait(e)
            raise
