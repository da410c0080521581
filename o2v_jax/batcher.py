"""Dynamic batching: concurrent small requests answered with one model call.

The server's handler threads each hold one decoded :class:`~o2v_jax.wire.Request`;
:class:`Batcher` merges the ones that wait at the same time into one call of an answer
function (``request -> values``, e.g. :func:`o2v_jax.app.compute` bound to a predictor)
and hands each request its own rows. :func:`merge` and :func:`split` are the two steps,
shared with batch transform, which answers the lines of a mini-batch the same way.

API::

    Answer = Callable[[Request], np.ndarray]   values (N, K) for a request of N records
    Batcher(answer, max_records=256): .answer(request) -> values, thread-safe
    kind(request) -> (mode, encoder)           requests of one kind can be merged
    merge(requests) -> Request                 one request holding all their sequences
    split(values, requests) -> [values, ...]   each request's rows of the merged answer
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from o2v_jax.ragged import Ragged
from o2v_jax.wire import KEYS, Request

Answer = Callable[[Request], np.ndarray]


def kind(request: Request) -> tuple[str, str | None]:
    """What a request asks for: ("scores", None), ("embeddings", "in0") or ("embeddings", "in1")."""
    return request.mode, request.encoder


def merge(requests: Sequence[Request]) -> Request:
    """One request with the sequences of ``requests`` (all of one :func:`kind`), in order."""
    first = requests[0]
    if len(requests) == 1:
        return first
    return dataclasses.replace(first, **{
        side: Ragged.concat([getattr(r, side) for r in requests])
        for side in KEYS if getattr(first, side) is not None})


def split(values: np.ndarray, requests: Sequence[Request]) -> list[np.ndarray]:
    """The rows of ``values`` (the answer to ``merge(requests)``) that belong to each request."""
    stops = np.cumsum([len(r) for r in requests]).tolist()
    return [values[stop - len(r):stop] for r, stop in zip(requests, stops)]


@dataclasses.dataclass(eq=False)
class _Job:
    request: Request
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    values: Any = None  # float32 (N, K): this request's rows, once answered
    error: BaseException | None = None
    lead: bool = False  # woken to run the next batch rather than with an answer


class Batcher:
    """Answers concurrent small requests with one call of ``answer`` (dynamic batching).

    Opportunistic, and without a thread of its own: a request that finds the model
    idle runs at once on its own thread (no hand-off, no added latency). Requests that
    arrive meanwhile queue up; when a call ends, the oldest waiting request's thread
    runs the next call for every queued request (up to ``max_records`` records),
    grouped by :func:`kind`. So under load one call serves many requests, amortising
    the fixed cost of a model call (benchmarks/RESULTS.md measures it). Requests of
    ``max_records`` or more run on their own, concurrently.
    """

    def __init__(self, answer: Answer, max_records: int = 256):
        self._answer = answer
        self._max_records = max_records
        self._lock = threading.Lock()
        self._queue: list[_Job] = []  # waiting requests, oldest first
        self._busy = False  # a thread is running a batch (or has been woken to)

    def answer(self, request: Request) -> np.ndarray:
        """float32 (N, K) for one decoded request, computed together with its neighbours."""
        if len(request) >= self._max_records:
            return self._answer(request)
        job = _Job(request)
        with self._lock:
            self._queue.append(job)
            job.lead, self._busy = not self._busy, True
        if not job.lead:
            job.done.wait()  # answered by another thread's call, or woken to lead
        if job.lead:
            self._run_batch()  # answers this job and whatever queued before it
        if job.error is not None:
            raise RuntimeError("the batched predictor call failed") from job.error
        return job.values

    def _run_batch(self) -> None:
        with self._lock:
            take, records = 0, 0
            while take < len(self._queue) and records < self._max_records:
                records += len(self._queue[take].request)
                take += 1
            jobs, self._queue = self._queue[:take], self._queue[take:]
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(kind(job.request), []).append(job)
        try:
            for group in groups.values():
                self._answer_group(group)
        finally:
            with self._lock:
                if self._queue:  # hand the next batch to a waiting thread; ours has its answer
                    self._queue[0].lead = True
                    self._queue[0].done.set()
                else:
                    self._busy = False
            for job in jobs:
                job.done.set()

    def _answer_group(self, jobs: list[_Job]) -> None:
        requests = [job.request for job in jobs]
        try:
            values = self._answer(merge(requests))
        except Exception as e:  # every request of the group raises it (the App answers 500)
            for job in jobs:
                job.error = e
            return
        for job, rows in zip(jobs, split(values, requests)):
            job.values = rows
