"""Serving on a decoding mesh (tensor and pipeline parallel): rank 0 serves HTTP and leads; the others mirror it.

Every rank holds a part of the model, so every engine call must run on every rank, in the same
order, with the same arguments. Rank 0's decode worker goes through `LeadingScheduler` and
`LeadingEngine`, which broadcast each call (admit a request, step the batch, cancel a row, decode
one request alone) before making it; the other ranks sit in `follow`, making the same calls on
their own scheduler and engine.

What the engine cannot know in advance is where a request stops: rank 0's `on_token` decides from
text (stop strings) and from the client (gone away). So every token's decision is broadcast too:
rank 0 sends what its callback returned, the others' callbacks return what they receive. A
callback that raises on rank 0 still sends "stop" first, and a call that raises (a request the
scheduler refuses) raises alike everywhere: no failing request leaves the ranks out of step.
`stop` (rank 0 shutting down) ends `follow`.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from eetune.infer.scheduler import BatchRequest, BatchScheduler
from eetune.infer.settings import DecodeResult


class Channel:
    """Rank 0's messages to every rank (a broadcast over the world group)."""

    def send(self, message: Any) -> None:
        dist.broadcast_object_list([message], src=0)

    def receive(self) -> Any:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _leading(on_token: Callable[[int, int], bool | None] | None, channel: Channel) -> Callable[[int, int], bool]:
    def on_token_everywhere(token: int, exit_layer: int) -> bool:
        stop = True
        try:
            stop = bool(on_token(token, exit_layer)) if on_token is not None else False
        finally:
            channel.send(stop)
        return stop

    return on_token_everywhere


def _following(channel: Channel) -> Callable[[int, int], bool]:
    return lambda token, exit_layer: channel.receive()


class LeadingScheduler:
    """Rank 0's `BatchScheduler`: each call that decodes is announced to the other ranks first."""

    def __init__(self, scheduler: BatchScheduler, channel: Channel) -> None:
        self.scheduler, self.channel = scheduler, channel
        self.batch = scheduler.batch
        self._ids: dict[BatchRequest, int] = {}
        self._next_id = itertools.count()

    @property
    def group(self) -> Any:
        return self.scheduler.group

    def group_of(self, settings: Any) -> Any:
        return self.scheduler.group_of(settings)

    def batchable(self, settings: Any) -> bool:
        return self.scheduler.batchable(settings)

    def admit(self, request: BatchRequest) -> bool:
        request_id = self._ids[request] = next(self._next_id)
        self.channel.send(("admit", request_id, request.prompt, request.settings))
        request.on_token = _leading(request.on_token, self.channel)
        try:
            finished = self.scheduler.admit(request)
        except BaseException:
            del self._ids[request]
            raise
        if finished:
            del self._ids[request]
        return finished

    def step(self) -> list[BatchRequest]:
        self.channel.send(("step",))
        finished = self.scheduler.step()
        for request in finished:
            self._ids.pop(request, None)
        return finished

    def cancel(self, request: BatchRequest) -> None:
        self.channel.send(("cancel", self._ids.pop(request)))
        self.scheduler.cancel(request)


class LeadingEngine:
    """Rank 0's engine for requests decoded alone: `generate` is announced first; the rest is the engine's."""

    def __init__(self, engine: Any, channel: Channel) -> None:
        self.engine, self.channel = engine, channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, prompt: list[int], settings: Any, on_token=None, on_logprob=None) -> DecodeResult:
        self.channel.send(("alone", prompt, settings))
        return self.engine.generate(prompt, settings, on_token=_leading(on_token, self.channel), on_logprob=on_logprob)

    def stop_followers(self) -> None:
        self.channel.send(("stop",))


def follow(engine: Any, scheduler: BatchScheduler | None, channel: Channel) -> None:
    """The other ranks' loop: make rank 0's decoding calls until it stops.

    An exception is rank 0's too (same state, same call): it has answered its request with it, so
    here it is dropped and the loop goes on. Runs in the main thread (it ignores SIGINT)."""
    requests: dict[int, BatchRequest] = {}  # by rank 0's request id
    ids: dict[int, int] = {}  # id(request) -> rank 0's request id, for the finished ones `step` returns
    # Ctrl-C reaches every rank (torchrun passes it on): rank 0 shuts the server down and says "stop".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        kind, *args = channel.receive()
        if kind == "stop":
            return
        try:
            if kind == "alone":
                prompt, settings = args
                engine.generate(prompt, settings, on_token=_following(channel))
            elif kind == "admit":
                request_id, prompt, settings = args
                request = requests[request_id] = BatchRequest(prompt, settings, on_token=_following(channel))
                ids[id(request)] = request_id
                if scheduler.admit(request):
                    _forget(requests, ids, request_id)
            elif kind == "step":
                for request in scheduler.step():
                    _forget(requests, ids, ids.get(id(request)))
            elif kind == "cancel":
                request = requests[args[0]]
                _forget(requests, ids, args[0])
                scheduler.cancel(request)
        except Exception:  # noqa: BLE001 - rank 0 met the same error and reported it
            if kind == "admit":
                _forget(requests, ids, args[0])


def _forget(requests: dict[int, BatchRequest], ids: dict[int, int], request_id: int | None) -> None:
    request = requests.pop(request_id, None)
    if request is not None:
        ids.pop(id(request), None)
