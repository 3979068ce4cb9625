"""The batch worker: one thread per served model that decodes every request it holds in one batch.

Continuous batching over a KV cache (docs/ARCHITECTURE.md, "Serving"): a request is one or more
rows (``Job``); the worker takes waiting rows into its batch whenever it has free slots (when the
batch is empty it waits up to ``max_wait_ms`` for more to arrive), prefills them together (left
padded, each row routed or forced on its own prompt), joins their KV cache and routing to the
batch's, and then runs one decode step for every row per iteration. A row leaves the batch as soon
as it is finished (end of sequence, a stop string, ``max_tokens``, the context) or cancelled (its
client went away), and its slot is free for the next waiting row at the next iteration.

Each row's events, in order: ``Routed(routing)`` after the prefill, ``Text(delta)`` as text becomes
final, and ``Done(reason, tokens)`` or ``Failed(message)``. They go to ``Job.on_event``: from the
worker's thread, or, for a job with a ``loop`` (a server's asyncio loop), in that loop's thread,
all the events of one iteration handed over in one call (one wake-up of the loop per step, not per
token and row).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from atmoe.errors import AtmoeError
from atmoe.serve import kv
from atmoe.serve.sampling import RowSampler, next_tokens
from atmoe.serve.text import TextStream

log = logging.getLogger("atmoe.serve")


class QueueFull(AtmoeError):
    """The model's queue of waiting rows is at its bound (``--max-queue``)."""


class WorkerClosed(AtmoeError):
    """The model's worker no longer takes rows (the server is stopping or the model was unloaded)."""


@dataclass(frozen=True)
class Routed:
    routing: list[dict] | None  # per block {"groups": {...}, "experts": {...}}; None: no routing (a plain model)


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    reason: str  # "stop" | "length"
    tokens: int  # completion tokens


@dataclass(frozen=True)
class Failed:
    message: str


Event = Routed | Text | Done | Failed


@dataclass
class Job:
    """One row to generate: a prompt's ids and how to continue it."""

    prompt: list[int]
    max_tokens: int
    sampler: RowSampler
    on_event: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    force: Mapping[str, float] | None = None
    loop: asyncio.AbstractEventLoop | None = None  # deliver the events in this loop's thread
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks: equal work)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class RowState(Protocol):
    """Whatever a backend keeps per row across decode steps (the routing of each row)."""

    def select(self, rows: Tensor) -> RowState: ...


class Backend(Protocol):
    """A model the worker can batch: a prefill of new rows, and decode steps of the batch."""

    tokenizer: Any
    context_length: int
    eos_token_ids: frozenset[int]
    device: torch.device

    def prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, jobs: Sequence[Job]) -> tuple[Tensor, Any, Any]:
        """ids, mask, positions [b, T] (left padded) -> (next-token logits [b, V], KV cache, row state)."""
        ...

    def decode(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, state: Any) -> tuple[Tensor, Any]:
        """ids [B, 1], mask [B, L+1], positions [B, 1] -> (next-token logits [B, V], KV cache)."""
        ...

    def join_states(self, states: Sequence[Any]) -> Any: ...

    def routing_of(self, state: Any, row: int) -> list[dict] | None: ...


@dataclass
class _Row:
    job: Job
    stream: TextStream
    position: int  # position id of the token to feed next
    token: int = -1  # the token to feed next
    generated: int = 0
    done: bool = False


class Worker:
    """The batching thread of one backend. ``submit`` rows; ``close`` drains and stops."""

    def __init__(
        self, backend: Backend, *, max_batch: int, max_wait_ms: float, max_queue: int, name: str = "model"
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.name = name
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._outbox: list[tuple[Job, Event]] = []  # this iteration's events, delivered at its end
        self._cache: Any = None
        self._mask: Tensor | None = None
        self._state: Any = None
        self._paused = False
        self.steps = 0  # decode iterations run (for tests and benchmarks)
        self.largest_batch = 0
        self.cancelled = 0  # rows dropped because their client went away
        self._thread = threading.Thread(target=self._run, name=f"atmoe-serve-{name}", daemon=True)
        self._thread.start()

    # -- the server's side --------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (one request's rows, all or none); ``QueueFull`` / ``WorkerClosed`` otherwise."""
        with self._condition:
            if self._closed:
                raise WorkerClosed(f"{self.name} is not taking requests (the server is stopping or it was unloaded)")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"{self.name} has {len(self._waiting)} rows waiting (at most {self.max_queue}): retry later"
                )
            self._waiting.extend(jobs)
            self._condition.notify()

    @property
    def load(self) -> int:
        """Rows waiting or in the batch."""
        with self._condition:
            return len(self._waiting) + len(self._rows)

    def pause(self) -> None:
        """Take no waiting rows into the batch until ``resume`` (the rows in the batch go on)."""
        with self._condition:
            self._paused = True

    def resume(self) -> None:
        with self._condition:
            self._paused = False
            self._condition.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no more rows; the rows already taken or waiting are finished, then the thread ends."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                jobs = self._take()
                if jobs is None:
                    return
                try:
                    if jobs:
                        self._admit(jobs)
                    if self._rows:
                        self._step()
                except Exception as error:  # noqa: BLE001 - the server keeps serving; these rows fail
                    log.exception("%s: batch failed", self.name)
                    self._fail_all(jobs or [], f"generation failed: {type(error).__name__}: {error}")
                self._deliver()

    def _emit(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _deliver(self) -> None:
        """Hand this iteration's events over: one call per event loop, direct calls otherwise."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in outbox:
            if job.loop is None:
                _call(job, event)
            else:
                by_loop.setdefault(job.loop, []).append((job, event))
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_call_all, events)
            except RuntimeError:  # the loop is closed (the server stopped): nobody is listening
                pass

    def _take(self) -> list[Job] | None:
        """The waiting rows to admit now (at most the free slots); None once closed and drained."""
        with self._condition:
            if self._paused and self._rows:
                return []
            if not self._rows:
                while (not self._waiting or self._paused) and not self._closed:
                    self._condition.wait()
                if not self._waiting:
                    return None  # closed, nothing left
                deadline = time.monotonic() + self.max_wait
                while len(self._waiting) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._condition.wait(left)
            free = self.max_batch - len(self._rows)
            taken: list[Job] = []
            while self._waiting and len(taken) < free:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.cancelled += 1
                else:
                    taken.append(job)
            return taken

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` as one left-padded batch and join them to the running batch."""
        backend = self.backend
        width = max(len(job.prompt) for job in jobs)
        pad = _pad_id(backend.tokenizer)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for index, job in enumerate(jobs):
            ids[index, width - len(job.prompt) :] = torch.tensor(job.prompt, dtype=torch.long)
            mask[index, width - len(job.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [b, T]
        device = backend.device
        logits, cache, state = backend.prefill(ids.to(device), mask.to(device), positions.to(device), jobs)
        kv.check_cache(cache)
        rows = [_Row(job, TextStream(backend.tokenizer, job.stop), position=len(job.prompt)) for job in jobs]
        for index, row in enumerate(rows):
            self._emit(row.job, Routed(backend.routing_of(state, index)))
        mask = mask.to(device)
        if self._rows:
            assert self._mask is not None
            self._cache, self._mask = kv.join(self._cache, self._mask, cache, mask)
            self._state = backend.join_states([self._state, state])
            self._rows.extend(rows)
        else:
            self._cache, self._mask, self._state, self._rows = cache, mask, state, rows
        self.largest_batch = max(self.largest_batch, len(self._rows))
        tokens = next_tokens(logits, [row.job.sampler for row in rows])
        for row, token in zip(rows, tokens.tolist()):
            self._accept(row, token)
        self._drop_finished()

    def _step(self) -> None:
        """One decode step of every row in the batch."""
        backend = self.backend
        device = backend.device
        assert self._mask is not None
        ids = torch.tensor([[row.token] for row in self._rows], dtype=torch.long, device=device)  # [B, 1]
        positions = torch.tensor([[row.position] for row in self._rows], dtype=torch.long, device=device)  # [B, 1]
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], 1)  # [B, L+1]
        logits, self._cache = backend.decode(ids, mask, positions, self._cache, self._state)
        self._mask = mask
        self.steps += 1
        tokens = next_tokens(logits, [row.job.sampler for row in self._rows])
        for row, token in zip(self._rows, tokens.tolist()):
            row.position += 1
            self._accept(row, token)
        self._drop_finished()

    def _accept(self, row: _Row, token: int) -> None:
        """Row ``row`` produced ``token``: send its text, and finish it if it is done."""
        job = row.job
        if job.cancelled.is_set():
            return  # dropped with the finished rows
        row.generated += 1
        if token in self.backend.eos_token_ids and not job.ignore_eos:
            self._finish(row, "stop")
            return
        delta = row.stream.push(token)
        if delta:
            self._emit(job, Text(delta))
        if row.stream.stopped:
            self._finish(row, "stop")
        elif row.generated >= job.max_tokens or row.position + 1 >= self.backend.context_length:
            self._finish(row, "length")
        else:
            row.token = token

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.stream.finish()
        if rest:
            self._emit(row.job, Text(rest))
        self._emit(row.job, Done(reason, row.generated))
        row.done = True

    def _drop_finished(self) -> None:
        for row in self._rows:
            if not row.done and row.job.cancelled.is_set():
                row.done = True
                self.cancelled += 1
        keep = [index for index, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._state = [], None, None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._cache = kv.select_rows(self._cache, index)
        self._cache, self._mask = kv.trim(self._cache, self._mask.index_select(0, index))
        self._state = self._state.select(index)
        self._rows = [self._rows[i] for i in keep]

    def _fail_all(self, admitting: list[Job], message: str) -> None:
        failed = {id(row.job): row.job for row in self._rows if not row.done}
        in_batch = {id(row.job) for row in self._rows}
        failed.update({id(job): job for job in admitting if id(job) not in in_batch})
        for job in failed.values():
            self._emit(job, Failed(message))
        self._rows, self._cache, self._mask, self._state = [], None, None, None


def _call(job: Job, event: Event) -> None:
    try:
        job.on_event(event)
    except Exception:  # noqa: BLE001 - one listener's failure must not stop the others' events
        log.exception("an event handler failed")


def _call_all(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        _call(job, event)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
