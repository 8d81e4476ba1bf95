"""Several `tune` (and `generate`) runs on one torchrun process group, for tests/parallel/test_parallel.py.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/parallel/mesh_runs.py runs.json

runs.json is a list of {"overrides": [...], "stop_after": step or null, "refused": text or null}.
A run with `refused` must fail with an EetuneError containing that text. A run with `stop_after`
is interrupted on every rank after that many steps (as a killed job would be), so a later run with
resume=true can continue it. A run with "stage": "generate" decodes, and every rank writes what it
decoded to `<out>.rank<R>.json`; with "stage": "eval" every rank writes its report there; "stage":
"augment" writes its run dir (rank 0); "holdings" writes which layers, caches and slices a rank of a
decoding mesh holds; "vocab_split" checks an uneven vocabulary split. One launch for many runs: each
process imports torch once.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.exits import lm_head_weight
from eetune.infer.caches import DecodeCaches
from eetune.parallel.inference_tp import VocabSplit
from eetune.parallel.load import build_inference_model
from eetune.parallel.mesh import mesh_session
from eetune.stages import eval as eval_stage
from eetune.stages import augment, generate, tune
from eetune.train.trainer import Trainer


class Interrupted(Exception):
    pass


def main(path: str) -> None:
    dist.init_process_group("gloo")
    original_step = Trainer.train_step
    try:
        for run in json.loads(open(path).read()):
            if run.get("stage") == "generate":
                decode(run)
                continue
            if run.get("stage") in ("holdings", "vocab_split"):
                found = holdings(run) if run["stage"] == "holdings" else vocab_split()
                Path(f"{run['out']}.rank{dist.get_rank()}.json").write_text(json.dumps(found))
                continue
            if run.get("stage") == "augment":
                augment.run(compose_config("augment", run["overrides"]), console=Console(quiet=True))
                continue
            if run.get("stage") == "eval":
                result = eval_stage.run(compose_config("eval", run["overrides"]), console=Console(quiet=True))
                Path(f"{run['out']}.rank{dist.get_rank()}.json").write_text(json.dumps(result.report, default=str))
                continue
            stop_after = run.get("stop_after")

            def train_step(self, stop_after=stop_after):
                if stop_after is not None and self.step == stop_after:
                    raise Interrupted
                return original_step(self)

            Trainer.train_step = train_step
            try:
                tune.run(compose_config("tune", run["overrides"]))
            except Interrupted:
                pass
            except EetuneError as exc:
                if run.get("refused") is None or run["refused"] not in str(exc):
                    raise
            else:
                if run.get("refused") is not None:
                    raise AssertionError(f"expected a refusal ({run['refused']}): {run['overrides']}")
    finally:
        dist.destroy_process_group()


def decode(run: dict) -> None:
    out = io.StringIO()
    result = generate.run(compose_config("generate", run["overrides"]), out=out, console=Console(quiet=True))
    decoded = {"tokens": result.result.tokens, "exit_layers": result.result.exit_layers,
               "accepted": result.result.accepted_tokens, "text": out.getvalue()}
    Path(f"{run['out']}.rank{dist.get_rank()}.json").write_text(json.dumps(decoded))


def holdings(run: dict) -> dict:
    cfg = compose_config("generate", run["overrides"])
    with mesh_session(cfg.parallel, "cpu") as topology:
        _, model = build_inference_model(cfg.model, cfg.generate.run_dir, topology)
    backbone = model.backbone
    caches = DecodeCaches(model, batch_size=1, max_seq_len=8).gen.caches
    exit_block = model.exit(model.exit_layers[0]).block
    return {
        "layers": [i for i, layer in enumerate(backbone.layers) if not layer.attn.q_proj.weight.is_meta],
        "caches": [i for i, cache in enumerate(caches) if cache is not None],
        "kv_heads": caches[[c is not None for c in caches].index(True)].k.shape[1],
        "head_rows": lm_head_weight(backbone).shape[0],
        "exit_q_rows": exit_block.attn.q_proj.weight.shape[0],
        "vocab": backbone.tok_embeddings.num_embeddings,
    }


def vocab_split() -> dict:
    """7 rows over 2 ranks: 4 + 3, the second padded with a zero row."""
    torch.manual_seed(0)
    whole, hidden, ids = torch.randn(7, 5), torch.randn(3, 5), torch.tensor([6, 0, 3, 4])
    split = VocabSplit(dist.group.WORLD, 7)
    local = torch.cat([whole, torch.zeros(1, 5)])[split.start : split.start + split.rows_per_rank]
    logits = split.gather(torch.nn.functional.linear(hidden, local))
    return {"logits": torch.allclose(logits, hidden @ whole.T, atol=1e-6),
            "rows": torch.equal(split.rows(local, ids), whole[ids])}


if __name__ == "__main__":
    main(sys.argv[1])
