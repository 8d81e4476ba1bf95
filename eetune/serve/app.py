"""The FastAPI app: OpenAI-compatible routes over one ServedModel and its decode worker.

POST /v1/completions, POST /v1/chat/completions (with `stream: true`: server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health.

A request is checked and planned on the event loop, then waits for the single decode worker.
A client that goes away (mid-stream, or while its whole or streamed response is still queued)
cancels its job: dropped if still queued, stopped at the next token if decoding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from eetune.errors import EetuneError
from eetune.infer.sampling import TokenLogprob
from eetune.serve.errors import APIError, error_body, install_error_handlers
from eetune.serve.protocol import (
    ChatCompletionRequest,
    ChatFormat,
    CompletionFormat,
    CompletionRequest,
    ResponseFormat,
    sse,
)
from eetune.serve.service import Completion, DecodePlan, ServedModel
from eetune.infer.scheduler import BatchScheduler
from eetune.serve.mirror import Channel, LeadingEngine, LeadingScheduler
from eetune.serve.worker import DecodeWorker, QueueFull, Ticket

_DONE = "data: [DONE]\n\n"
# Status for a client that left before its answer (nginx's convention; nobody reads it).
_CLIENT_CLOSED = 499


def create_app(
    served: ServedModel, queue_size: int, max_batch_size: int = 1, prefill_chunk: int | None = None,
    channel: Channel | None = None,
) -> FastAPI:
    """The app over `served`; up to `max_batch_size` requests of one decoding group decode together (1: one at a time).

    With `channel` (rank 0 of a decoding mesh) every decoding call is announced to the other
    ranks first (eetune.serve.mirror); `stop_followers` ends theirs once the app has shut down."""
    scheduler = make_scheduler(served, max_batch_size, prefill_chunk)
    if channel is not None:
        served.engine = LeadingEngine(served.engine, channel)
        scheduler = LeadingScheduler(scheduler, channel) if scheduler is not None else None
    worker = DecodeWorker(queue_size, scheduler)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="eetune", summary="OpenAI-compatible early-exit LLM server", lifespan=lifespan)
    app.state.served = served
    app.state.worker = worker
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, **worker.status(), "tokens_generated": served.tokens_generated}

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": started, "owned_by": "eetune", **served.describe()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        served.check_model_name(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        served.check_model_name(body.model)
        plan = served.plan(served.completion_prompt(body.prompt), body, prompt_param="prompt")
        fmt = CompletionFormat(served.name, served.speller)
        return await _respond(request, worker, served, plan, fmt, body.stream, body.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        served.check_model_name(body.model)
        plan = served.plan(served.chat_prompt(body.turns()), body, prompt_param="messages")
        fmt = ChatFormat(served.name, served.speller)
        return await _respond(request, worker, served, plan, fmt, body.stream, body.include_usage)

    return app


def stop_followers(app: FastAPI) -> None:
    """Rank 0 of a mesh, after the server has stopped: end the worker, then the other ranks' loops."""
    worker: DecodeWorker = app.state.worker
    worker.close()
    worker.join()  # no decoding call may be under way while the others are told to stop
    app.state.served.engine.stop_followers()


def make_scheduler(served: ServedModel, max_batch_size: int, prefill_chunk: int | None) -> BatchScheduler | None:
    """The continuous batch over the served engine; None (one request at a time) at max_batch_size 1."""
    return BatchScheduler(served.engine, max_batch_size, prefill_chunk=prefill_chunk) if max_batch_size > 1 else None


def _submit(worker: DecodeWorker, job: Any) -> Ticket:
    try:
        return worker.submit(job)
    except QueueFull as exc:
        raise APIError(
            503,
            f"the server is busy: {exc} (serve.queue_size); retry shortly",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None


async def _respond(
    request: Request,
    worker: DecodeWorker,
    served: ServedModel,
    plan: DecodePlan,
    fmt: ResponseFormat,
    stream: bool,
    include_usage: bool,
) -> Response:
    if not stream:
        ticket = _submit(worker, served.job(plan))
        completion = await _unless_client_leaves(request, ticket)
        if completion is None:
            return Response(status_code=_CLIENT_CLOSED)
        return JSONResponse(fmt.response(completion))

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[_Piece | None] = asyncio.Queue()

    def post(piece: _Piece | None) -> None:
        """From the worker thread: hand a piece of text (None: the end) to the event loop."""
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    job = served.job(plan, on_text=lambda text, logprobs: post((text, logprobs)))
    ticket = _submit(worker, job)
    # The stream ends when the job does, however it ends (finished, failed, dropped from the queue).
    ticket.future.add_done_callback(lambda _: post(None))  # a full queue is still a plain 503, before any event is sent
    return _EventStream(_events(ticket, pieces, fmt, include_usage), ticket)


# A piece of streamed text and the logprobs of the tokens that completed it (None: not asked for).
_Piece = tuple[str, list[TokenLogprob] | None]


class _EventStream(StreamingResponse):
    """A server-sent event stream that cancels its job however the response ends.

    Starlette cancels the event generator when the client disconnects, but a generator that
    never started (the client left before the first event was asked for) runs no `finally`:
    its job would stay queued, then decode for nobody.
    """

    def __init__(self, events: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.cancel()


async def _events(
    ticket: Ticket, pieces: asyncio.Queue[_Piece | None], fmt: ResponseFormat, include_usage: bool
) -> AsyncIterator[str]:
    """The stream: opening chunk, one chunk per piece of text, the closing chunk, [DONE].

    When the client disconnects, Starlette cancels this generator: `finally` cancels the job.
    """
    try:
        if (opening := fmt.opening_chunk()) is not None:
            yield sse(opening)
        while (piece := await pieces.get()) is not None:
            yield sse(fmt.chunk(*piece))
        try:
            completion = await ticket.result()
        except APIError as exc:
            yield sse(exc.body())
        except EetuneError as exc:
            yield sse(error_body(str(exc), "invalid_request_error"))
        except Exception as exc:  # the stream has begun: report in-band, as OpenAI does
            yield sse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))
        else:
            yield sse(fmt.closing_chunk(completion))
            if include_usage:
                yield sse(fmt.usage_chunk(completion))
        yield _DONE
    finally:
        ticket.cancel()


async def _unless_client_leaves(request: Request, ticket: Ticket) -> Completion | None:
    """The job's result, or None (and the job cancelled) if the client disconnects first."""
    result = asyncio.ensure_future(ticket.result())
    left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((result, left), return_when=asyncio.FIRST_COMPLETED)
        return result.result() if result.done() else None
    finally:
        left.cancel()
        if not result.done():  # the client left, or this handler was cancelled (shutdown)
            ticket.cancel()
            result.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the request body has been read by now)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
