"""HTTP errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

A bad request never takes the server down: validation errors become 400, unknown routes 404,
a full queue 503, and anything unexpected 500, all with the same JSON body and the
connection kept alive.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eetune.errors import EetuneError

logger = logging.getLogger("uvicorn.error")

class APIError(Exception):
    """A request the server refuses, with what OpenAI's clients expect to read about it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first thing pydantic (or FastAPI's JSON parsing) found wrong with a request body."""
    error = exc.errors()[0]
    kind = error.get("type", "")
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    param = _param_name(loc)
    if param is None:
        message = "the request body must be a JSON object (Content-Type: application/json)"
        return APIError(400, message, code="invalid_json")
    if kind == "missing":
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown parameter '{param}'", param=param, code="unknown_parameter")
    if kind == "unsupported":  # protocol.unsupported: an OpenAI parameter this server does not implement
        return APIError(400, error.get("msg", f"'{param}' is not supported"), param=param,
                        code="unsupported_parameter")
    message = error.get("msg", "invalid value")
    # Messages of our own validators come as "Value error, <message>".
    message = message.removeprefix("Value error, ")
    return APIError(400, f"invalid {param}: {message}", param=param, code="invalid_value")


def _param_name(loc: list[Any]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"unknown route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)

    @app.exception_handler(EetuneError)
    async def _user_error(request: Request, exc: EetuneError) -> JSONResponse:
        # Checks deeper down (the engine's own) that the request checks did not anticipate.
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    # Not an `Exception` handler: Starlette runs those in its outermost middleware and re-raises
    # after answering, so uvicorn drops the keep-alive connection the client will reuse.
    app.add_middleware(_InternalErrors)


class _InternalErrors:
    """Answers an exception no handler took with a JSON 500 and keeps the connection usable.

    Sits inside Starlette's ServerErrorMiddleware, so the exception stops here: it is logged
    with its traceback, uvicorn sees a complete response. An exception after the response
    began (a stream) cannot be answered; it goes on up as before.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            logger.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
            await JSONResponse(body, status_code=500)(scope, receive, send)
