"""`eetune serve`: load the model (and a run dir's exits), then serve the app with uvicorn.

With `parallel.tp` > 1 every rank loads its tensor-parallel slices; rank 0 serves and the others
decode along with it (eetune.serve.mirror).
"""

from __future__ import annotations

import uvicorn
from rich.console import Console

from eetune.config import EetuneConfig
from eetune.errors import EetuneError
from eetune.rundir import resolve_run_dir
from eetune.serve.app import create_app, make_scheduler, stop_followers
from eetune.serve.mirror import Channel, follow
from eetune.serve.server import bind_socket, build_app
from eetune.serve.service import ServedModel


def run(cfg: EetuneConfig, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    s = cfg.serve
    s.run_dir = resolve_run_dir(s.run_dir)
    s.validate_run()  # before the model loads: a bad config fails at once
    from eetune.parallel import on_inference_mesh

    if on_inference_mesh(cfg):
        return _serve_on_mesh(cfg, console)
    sock = bind_socket(s.host, s.port)  # a taken port fails before the model loads
    try:
        app = build_app(cfg)
    except BaseException:
        sock.close()
        raise
    _serve(app, sock, cfg, console)


def _serve_on_mesh(cfg: EetuneConfig, console: Console) -> None:
    """Every rank loads its slices; rank 0 serves HTTP and leads, the others follow (eetune.serve.mirror)."""
    from eetune.parallel.launch import stage_ranks
    from eetune.parallel.mesh import under_launcher
    from eetune.parallel.load import build_inference_model

    s = cfg.serve
    if not under_launcher():
        bind_socket(s.host, s.port).close()  # a taken port fails before any process starts
    with stage_ranks(cfg, console) as topology:
        if topology is None:
            return
        served = ServedModel.from_config(cfg, loaded=build_inference_model(cfg.model, s.run_dir, topology))
        channel = Channel()
        if not topology.is_main:
            follow(served.engine, make_scheduler(served, s.max_batch_size, s.prefill_chunk), channel)
            return
        try:
            sock = bind_socket(s.host, s.port)
        except EetuneError:
            channel.send(("stop",))
            raise
        app = create_app(served, s.queue_size, s.max_batch_size, s.prefill_chunk, channel=channel)
        console.print(f"mesh {topology.dims.describe()} on {topology.dims.world_size} processes ({topology.device.type})")
        try:
            _serve(app, sock, cfg, console)
        finally:  # however uvicorn ended (a second Ctrl-C skips the app's shutdown)
            stop_followers(app)


def _serve(app, sock, cfg: EetuneConfig, console: Console) -> None:
    s = cfg.serve
    served: ServedModel = app.state.served
    host, port = sock.getsockname()[:2]
    exits = f"exits at {served.model.exit_layers}" if served.model.exit_layers else "no exits"
    console.print(
        f"serving [bold]{served.name}[/] ({served.num_layers} layers, {exits}; default mode {served.defaults.mode}) "
        f"at http://{host}:{port}/v1 — POST /v1/chat/completions, /v1/completions; GET /v1/models, /health"
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=s.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
