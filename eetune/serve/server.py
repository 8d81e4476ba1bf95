"""`eetune serve`: load the model (and a run dir's exits), then serve the app with uvicorn.

`BackgroundServer` runs the same app on a thread, on a free loopback port, for tests and
benchmarks.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from omegaconf import DictConfig
from rich.console import Console

from eetune.errors import EetuneError
from eetune.serve.app import create_app
from eetune.serve.service import ServedModel, check_serve_config


def build_app(cfg: DictConfig) -> FastAPI:
    """The app for a composed config: model loaded, defaults and limits checked."""
    return create_app(ServedModel.from_config(cfg), cfg.serve.queue_size)


def run(cfg: DictConfig, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    s = cfg.serve
    check_serve_config(s)  # before the model loads: a bad config fails at once
    sock = bind_socket(s.host, s.port)  # a taken port fails before the model loads
    try:
        app = build_app(cfg)
    except BaseException:
        sock.close()
        raise
    served: ServedModel = app.state.served
    host, port = sock.getsockname()[:2]
    exits = f"exits at {served.model.exit_layers}" if served.model.exit_layers else "no exits"
    console.print(
        f"serving [bold]{served.name}[/] ({served.num_layers} layers, {exits}; default mode {served.defaults.mode}) "
        f"at http://{host}:{port}/v1 — POST /v1/chat/completions, /v1/completions; GET /v1/models, /health"
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=s.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


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
