"""One decoding thread for the whole server: jobs run one at a time, in arrival order.

The engine is neither thread-safe nor able to share the CPU usefully between requests, so
requests queue for a single worker thread, and the event loop stays free to accept, validate,
stream and answer /health meanwhile. Admission is bounded (`capacity` jobs queued or
running); beyond it `submit` raises `QueueFull`. Every job gets a cancel flag: set before the
job starts, the job never runs; set while it runs, the job sees it (the engine's on_token
callback checks it) and stops at the next token. A slot is free again as soon as its job
has finished or was dropped from the queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """All slots are taken."""


@dataclass(eq=False)  # identity: tickets live in a set
class Ticket(Generic[T]):
    """A submitted job: await its result, or cancel it."""

    future: Future[T]
    cancelled: threading.Event

    def cancel(self) -> None:
        """Drop the job if it is still queued, else make it stop at its next token; harmless once done."""
        self.cancelled.set()
        self.future.cancel()

    async def result(self) -> T:
        return await asyncio.wrap_future(self.future)


class DecodeWorker:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eetune-decode")
        self._lock = threading.Lock()
        self._live: set[Ticket] = set()
        self._admitted = 0
        self._running = 0
        self.completed = 0  # jobs that ended with nobody having cancelled them
        self.cancelled = 0  # jobs cancelled (their client left) while queued or running

    def submit(self, job: Callable[[threading.Event], T]) -> Ticket[T]:
        """Queue `job(cancelled)`; raises QueueFull when `capacity` jobs are queued or running."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise QueueFull(f"{self.capacity} requests are already queued or decoding")
            self._admitted += 1
        cancelled = threading.Event()
        ticket = Ticket(self._executor.submit(self._run, job, cancelled), cancelled)
        with self._lock:
            self._live.add(ticket)
        ticket.future.add_done_callback(lambda _: self._release(ticket))
        return ticket

    def status(self) -> dict[str, int]:
        with self._lock:
            admitted, running = self._admitted, self._running
        return {"decoding": running, "waiting": admitted - running, "queue_size": self.capacity,
                "completed": self.completed, "cancelled": self.cancelled}

    def close(self) -> None:
        """Stop the running job at its next token and drop the queued ones."""
        with self._lock:
            live = list(self._live)
        for ticket in live:
            ticket.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Callable[[threading.Event], T], cancelled: threading.Event) -> T:
        with self._lock:
            if cancelled.is_set():
                self.cancelled += 1
                raise CancelledError("cancelled while queued")
            self._running += 1
        try:
            return job(cancelled)
        finally:
            with self._lock:
                self._running -= 1
                if cancelled.is_set():
                    self.cancelled += 1
                else:
                    self.completed += 1

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.future.cancelled():  # dropped from the queue before it ran
                self.cancelled += 1
            self._admitted -= 1
            self._live.discard(ticket)
