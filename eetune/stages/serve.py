"""`eetune serve`: load the model (and a run dir's exits), then serve the app with uvicorn."""

from __future__ import annotations

import uvicorn
from rich.console import Console

from eetune.serve.server import bind_socket, build_app
from eetune.config import EetuneConfig
from eetune.serve.service import ServedModel
from eetune.rundir import resolve_run_dir


def run(cfg: EetuneConfig, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    s = cfg.serve
    s.run_dir = resolve_run_dir(s.run_dir)
    s.validate_run()  # before the model loads: a bad config fails at once
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
