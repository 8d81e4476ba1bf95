"""An OpenAI-compatible HTTP server decoding with early exits (FastAPI + uvicorn).

The library behind `eetune serve`; the command itself is eetune.stages.serve.
"""

from eetune.serve.app import create_app
from eetune.serve.server import BackgroundServer, bind_socket, build_app
from eetune.serve.service import ServedModel, default_options

__all__ = ["BackgroundServer", "ServedModel", "bind_socket", "build_app", "create_app", "default_options"]
