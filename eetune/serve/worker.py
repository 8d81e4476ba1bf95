"""The decoding thread: requests share one running batch (continuous batching) or run alone.

The engine is not thread-safe, so all decoding happens on one worker thread, and the event loop
stays free to accept, validate, stream and answer /health meanwhile. With a `BatchScheduler`,
requests of every mode join the running batch at the next step boundary and leave it
when they end (vLLM's iteration-level scheduling): concurrent users share each step's weight
stream. A batch holds one decoding group (the full model; early exit with one confidence policy
and threshold; self-speculative with one drafting setting); a request of another group waits, in
arrival order, until the running batch has drained. Jobs the scheduler does not take (any job,
without a scheduler) run alone, in arrival order, once the batch has drained.

Admission is bounded (`capacity` jobs queued or running); beyond it `submit` raises `QueueFull`.
Every job has a cancel flag: set before the job starts, it never runs; set while it runs, the
job sees it at its next token (the engine's on_token callback checks it) and its row is freed.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from eetune.infer.scheduler import BatchRequest, BatchScheduler
from eetune.infer.settings import DecodeResult

T = TypeVar("T")


class QueueFull(Exception):
    """All slots are taken."""


class BatchableJob(Protocol[T]):
    """A decode the worker may put in the running batch: its request, and what to make of its result."""

    cancelled: threading.Event
    request: BatchRequest

    def finish(self, result: DecodeResult) -> T: ...

    def run_alone(self) -> T: ...


@dataclass(eq=False)  # identity: tickets live in a set
class Ticket(Generic[T]):
    """A submitted job: await its result, or cancel it."""

    future: Future[T]
    cancelled: threading.Event
    job: Any = field(repr=False, default=None)

    def cancel(self) -> None:
        """Drop the job if it is still queued, else make it stop at its next token; harmless once done."""
        self.cancelled.set()
        self.future.cancel()

    async def result(self) -> T:
        return await asyncio.wrap_future(self.future)


class DecodeWorker:
    def __init__(self, capacity: int, scheduler: BatchScheduler | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.scheduler = scheduler
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._rows: dict[BatchRequest, Ticket] = {}  # requests in the running batch
        self._admitted = 0  # queued + running
        self._running = 0
        self._closed = False
        self.completed = 0  # jobs that ended with nobody having cancelled them
        self.cancelled = 0  # jobs cancelled (their client left) while queued or running
        self.peak_batch = 0  # the most requests that decoded together
        self._thread = threading.Thread(target=self._loop, name="eetune-decode", daemon=True)
        self._thread.start()

    def submit(self, job: BatchableJob[T] | Callable[[threading.Event], T]) -> Ticket[T]:
        """Queue a job: a BatchableJob, or a callable `job(cancelled)` that runs alone.
        Raises QueueFull when `capacity` jobs are queued or running."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._admitted >= self.capacity:
                raise QueueFull(f"{self.capacity} requests are already queued or decoding")
            self._admitted += 1
            ticket = Ticket(Future(), getattr(job, "cancelled", None) or threading.Event(), job)
            self._queue.append(ticket)
            self._cond.notify()
        # A job cancelled while still queued frees its slot at once.
        ticket.future.add_done_callback(lambda future: self._dropped(ticket) if future.cancelled() else None)
        return ticket

    def _dropped(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._admitted -= 1
                self.cancelled += 1

    def status(self) -> dict[str, int]:
        with self._cond:
            admitted, running = self._admitted, self._running
        return {"decoding": running, "waiting": admitted - running, "queue_size": self.capacity,
                "max_batch_size": self.scheduler.batch.capacity if self.scheduler else 1,
                "completed": self.completed, "cancelled": self.cancelled}

    def close(self) -> None:
        """Stop the running jobs at their next token and drop the queued ones."""
        with self._cond:
            self._closed = True
            tickets = list(self._queue) + list(self._rows.values())
            self._cond.notify()
        for ticket in tickets:
            ticket.cancel()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to end (after `close`)."""
        self._thread.join(timeout)

    # -- the worker thread ----------------------------------------------------------------------

    def _batchable(self, ticket: Ticket) -> bool:
        job = ticket.job
        return (self.scheduler is not None and hasattr(job, "request")
                and self.scheduler.batchable(job.request.settings))

    def _next(self) -> tuple[list[Ticket], Ticket | None]:
        """Under the lock: (tickets to admit into the batch, a ticket to run alone)."""
        while not self._closed and not self._queue and not self._rows:
            self._cond.wait()
        admit: list[Ticket] = []
        room = self.scheduler.batch.capacity - len(self._rows) if self.scheduler else 0
        # The batch's group: a request of another group waits (with those behind it) until it drains.
        group = self.scheduler.group if self._rows else None
        while self._queue and len(admit) < room and self._batchable(self._queue[0]):
            joining = self.scheduler.group_of(self._queue[0].job.request.settings)
            if group is not None and joining != group:
                break
            group = joining
            admit.append(self._queue.popleft())
        alone = None
        if not admit and not self._rows and self._queue:
            alone = self._queue.popleft()
        return admit, alone

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed and not self._queue and not self._rows:
                    return
                admit, alone = self._next()
            for ticket in admit:
                if self._start(ticket):
                    self._admit(ticket)
            if alone is not None:
                if self._start(alone):
                    self._run_alone(alone)
            elif self._rows:
                self._step()

    def _start(self, ticket: Ticket) -> bool:
        """Mark a dequeued job running; False (and its slot freed) if it was cancelled while queued."""
        if ticket.cancelled.is_set() or not ticket.future.set_running_or_notify_cancel():
            self._end(ticket, cancelled=True, running=False)
            return False
        with self._cond:
            self._running += 1
        return True

    def _run_alone(self, ticket: Ticket) -> None:
        job = ticket.job
        try:
            result = job.run_alone() if hasattr(job, "run_alone") else job(ticket.cancelled)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            self._resolve(ticket, exception=exc)
        else:
            self._resolve(ticket, result)

    def _admit(self, ticket: Ticket) -> None:
        request = ticket.job.request
        try:
            finished = self.scheduler.admit(request)
        except BaseException as exc:  # noqa: BLE001 - a bad request harms only itself
            ticket.future.set_exception(exc)
            self._end(ticket, cancelled=False)
            return
        self._rows[request] = ticket
        self.peak_batch = max(self.peak_batch, len(self._rows))
        if finished:
            self._complete(request)

    def _step(self) -> None:
        for request, ticket in list(self._rows.items()):
            if ticket.cancelled.is_set():  # the client left: free the row now
                self.scheduler.cancel(request)
                self._complete(request)
        if not self._rows:
            return
        try:
            finished = self.scheduler.step()
        except BaseException as exc:  # noqa: BLE001 - the batch cannot go on: fail its requests
            for request in list(self._rows):
                self.scheduler.cancel(request)
                ticket = self._rows.pop(request)
                ticket.future.set_exception(exc)
                self._end(ticket, cancelled=False)
            return
        for request in finished:
            self._complete(request)

    def _complete(self, request: BatchRequest) -> None:
        ticket = self._rows.pop(request)
        try:
            result = ticket.job.finish(request.result)
        except BaseException as exc:  # noqa: BLE001
            self._resolve(ticket, exception=exc)
        else:
            self._resolve(ticket, result)

    def _resolve(self, ticket: Ticket, result: Any = None, exception: BaseException | None = None) -> None:
        """Hand the result over and free the slot. Whether the job was cancelled is read first: once
        the result is out, a finished stream cancels its ticket (harmlessly) as it closes."""
        cancelled = ticket.cancelled.is_set()
        if exception is not None:
            ticket.future.set_exception(exception)
        else:
            ticket.future.set_result(result)
        self._end(ticket, cancelled=cancelled)

    def _end(self, ticket: Ticket, cancelled: bool, running: bool = True) -> None:
        with self._cond:
            if running:
                self._running -= 1
            self._admitted -= 1
            if cancelled:
                self.cancelled += 1
            else:
                self.completed += 1


__all__ = ["BatchableJob", "DecodeWorker", "QueueFull", "Ticket"]
