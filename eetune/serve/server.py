"""Serving the app: the app for a composed config, a listening socket, uvicorn on a thread.

`eetune serve` (eetune.stages.serve) runs `build_app(cfg)` with uvicorn on `bind_socket`'s
socket; `BackgroundServer` runs the same app on a thread, on a free loopback port, for tests
and benchmarks.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from eetune.config.schema import EetuneConfig
from eetune.errors import EetuneError
from eetune.serve.app import create_app
from eetune.serve.service import ServedModel


def build_app(cfg: EetuneConfig) -> FastAPI:
    """The app for a composed config: model loaded, defaults and limits checked."""
    serve = cfg.serve
    return create_app(ServedModel.from_config(cfg), serve.queue_size, serve.max_batch_size, serve.prefill_chunk)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: any free one); a clear error if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EetuneError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another serve.port or serve.host"
        ) from None
    return sock


class BackgroundServer:
    """uvicorn serving `app` on a daemon thread: `with BackgroundServer(app) as server: server.url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=30)
