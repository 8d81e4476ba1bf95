"""Ship a tune run's exits inside the package, as `builtin:<name>` wherever a run dir is read.

    .venv/bin/python scripts/ship_exits.py --run-dir RUN --name smollm2_135m \
        --data-parts scripts/corpus/smollm2_chat/part-000.jsonl.gz scripts/corpus/smollm2_chat/part-001.jsonl.gz \
        [--note "what these exits are"]

Writes eetune/builtin/<name>/ (replacing what was there) from the run dir RUN:
- exits.safetensors: the exits in bf16 (they load into a model of any dtype);
- manifest.json: the run's manifest plus `shipped`: the command, the git revision, the sha256 of
  the tuning data (rebuilt from `--data-parts`, gzip parts concatenated in order, which must give
  exactly the file the run read), the run's config and seed, its first logged losses, and the
  held-out cross-entropy and top-1 agreement of the *shipped* (bf16) exits;
- heldout.safetensors: the held-out token windows those were measured on;
- config.yaml, metrics.jsonl, loss_curve.png and draft_vocab.safetensors (FR-Spec token
  frequencies) from the run; calibration.json only if it was made for these very weights.

Fails, writing nothing, if the folder would exceed 20 MB. tests/exits/test_builtin.py checks
what a shipped folder records: its base fingerprint, its held-out agreement (within 0.5 points)
and the run's first losses (re-running the recipe's first step from the recorded seed).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eetune.config.schema import to_typed  # noqa: E402
from eetune.data import heldout_batch  # noqa: E402
from eetune.eval.heldout import heldout_quality  # noqa: E402
from eetune.exits import load_exits  # noqa: E402
from eetune.models import load_base_model  # noqa: E402
from eetune.rundir import BUILTIN_ROOT, atomic_write_json, git_revision  # noqa: E402

MAX_BYTES = 20 * 1024 * 1024
COPIED = ("config.yaml", "metrics.jsonl", "loss_curve.png", "draft_vocab.safetensors")
FIRST_LOSSES = 3


def sha256_of(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_chunks(path: Path):
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def parts_chunks(parts: list[Path]):
    for part in parts:
        with gzip.open(part, "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--data-parts", type=Path, nargs="+", required=True,
                        help="gzip parts (repo paths) whose concatenation is the run's data.path")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    run_dir = args.run_dir
    cfg = to_typed(OmegaConf.load(run_dir / "config.yaml"))
    data_hash = sha256_of(file_chunks(Path(cfg.data.path)))
    if sha256_of(parts_chunks(args.data_parts)) != data_hash:
        raise SystemExit(f"--data-parts do not rebuild {cfg.data.path} byte for byte")

    base = load_base_model(**{**vars(cfg.model), "dtype": "float32"})
    model = load_exits(run_dir, base.model, base.fingerprint, base.checkpoint_dir)
    shipped = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.exits.state_dict().items()}
    model.exits.load_state_dict({name: t.float() for name, t in shipped.items()})  # measure what ships
    heldout = heldout_batch(cfg.data, base.tokenizer, max_seq_len=base.model.max_seq_len)
    quality = heldout_quality(model.eval(), heldout)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [{"step": m["step"], "loss": m["loss"]} for m in metrics if "loss" in m][:FIRST_LOSSES]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["shipped"] = {
        "name": args.name,
        "note": args.note,
        "command": " ".join(["scripts/ship_exits.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_revision": git_revision(),
        "from_run": str(run_dir),
        "dtype": "bfloat16",
        "data": {"path": cfg.data.path, "sha256": data_hash, "rebuild_from": [str(p) for p in args.data_parts]},
        "seed": cfg.seed,
        "tokens_seen": manifest.get("tune", {}).get("tokens_seen"),
        "steps": max((m["step"] for m in metrics if "loss" in m), default=0),
        "first_losses": losses,
        "heldout": {str(layer): {"cross_entropy": q.cross_entropy, "agreement": q.agreement}
                    for layer, q in quality.items()},
        "heldout_tokens": int(heldout.numel()),
    }

    staging = Path(tempfile.mkdtemp(prefix=f".{args.name}-", dir=BUILTIN_ROOT.parent))
    try:
        metadata = {"format": "eetune.exits/1", "base_fingerprint": base.fingerprint}
        save_file(shipped, str(staging / "exits.safetensors"), metadata=metadata)
        save_file({"tokens": heldout.contiguous()}, str(staging / "heldout.safetensors"))
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        atomic_write_json(staging / "manifest.json", manifest)
        size = sum(p.stat().st_size for p in staging.iterdir())
        if size > MAX_BYTES:
            raise SystemExit(f"{size / 2**20:.1f} MB is over the 20 MB a shipped folder may take")
        target = BUILTIN_ROOT / args.name
        BUILTIN_ROOT.mkdir(exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"shipped {run_dir} as builtin:{args.name} ({size / 2**20:.1f} MB): held-out agreement "
          + ", ".join(f"exit {layer} {q.agreement:.1%}" for layer, q in quality.items()))


if __name__ == "__main__":
    main()
