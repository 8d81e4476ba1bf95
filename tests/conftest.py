"""Session-wide model fixtures shared by the whole suite."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eetune.models import BaseModel, default_smollm2_dir, get_model_entry, load_base_model
from eetune.models.tiny import write_tiny_checkpoint

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (and in their subprocesses)
    # keeps OpenMP from oversubscribing the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2 as an HF dir, imported once into the persistent cache.

    Uses ``$EETUNE_HOME`` when set, else ``~/.cache/eetune``: later sessions reuse the import.
    """
    return default_smollm2_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> BaseModel:
    """The real SmolLM2-135M-Instruct, float32, loaded once per session. Do not mutate it."""
    return load_base_model("smollm2_135m", checkpoint_dir=smollm2_dir, dtype="float32")


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    """A tiny random SmolLM2-shaped model loaded through the real path (registry name smollm2_135m).

    4 layers, dim 64, 4 heads, 2 kv heads, tied embeddings, vocab 256, max_seq_len 2048, with a
    real byte-level ChatML tokenizer (bos=1 ``<|im_start|>``, eos=2 ``<|im_end|>``). Do not mutate it.
    """
    checkpoint_dir = write_tiny_checkpoint(
        get_model_entry("smollm2_135m"),
        tmp_path_factory.mktemp("tiny_base_model") / "checkpoint",
        seed=0,
        num_hidden_layers=4,
        rope_theta=100_000.0,
        rope_scaling=None,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    return load_base_model("smollm2_135m", checkpoint_dir=checkpoint_dir, dtype="float32")


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Runs `eetune *args` in-process and returns (exit code, stdout, stderr)."""
    from eetune.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["eetune", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def one_thread_for_tiny_models(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models are all per-op overhead: a second OpenMP thread only adds barrier waits,
    which stall for long stretches when the machine's two cores are shared. SmolLM2 tests keep both."""
    if "smollm2" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def read_wandb_records():
    """Reads the records of an offline W&B run's .wandb file (tune's and eval's logging tests)."""
    return _wandb_records


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log: 7-byte header, 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a record header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):  # first / middle fragment
            pending += chunk
    return records
