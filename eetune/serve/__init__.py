"""`eetune serve`: an OpenAI-compatible HTTP server decoding with early exits (FastAPI + uvicorn)."""

from eetune.serve.app import create_app
from eetune.serve.server import BackgroundServer, build_app, run
from eetune.serve.service import ServedModel, default_options

__all__ = ["BackgroundServer", "ServedModel", "build_app", "create_app", "default_options", "run"]
