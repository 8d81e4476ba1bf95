"""`eetune plan`: its memory and throughput arithmetic against numbers worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.parallel.plan import GIB, make_plan
from eetune.parallel.serve_plan import make_serve_plan, smallest_mesh

REPO = Path(__file__).resolve().parents[2]

# Llama-2-7B: V=32000, D=4096, F=11008, 32 layers, 32 KV heads (kv_dim 4096), untied head.
LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention + MLP + 2 norms = 202_383_360
EXIT_BODY = 3 * 4096 * 11008 + 2 * 4096  # mlp exit: MLP + its norm + output norm = 135_274_496
HEAD = 32000 * 4096  # a copied head = 131_072_000
# Llama-2-70B: D=8192, F=28672, V=32000.
EXIT_BODY_70B = 3 * 8192 * 28672 + 2 * 8192
HEAD_70B = 32000 * 8192


def seven_b_plan():
    # 8 GPUs as pp=2 x dp_shard=2 x tp=2; bf16; 3 mlp exits with own heads, CE on the data only, so
    # layers 1..24 are split 12 + 12 (exit 8 on stage 0, exits 16 and 24 on stage 1).
    return make_plan(compose_config("plan", [
        "recipe=llama2_13b_mlp", "model=llama2_7b", "model.dtype=bfloat16", "exits.layers=[8,16,24]",
        "exits.arch=mlp", "exits.head=copy", "exits.confidence=none", "loss.ce_target=labels", "loss.kd_alpha=0",
        "data.batch_size=4", "data.seq_len=1024", "optim.grad_accum=1", "loss.chunk_size=1024",
        "parallel.pp=2", "parallel.dp_shard=2", "parallel.tp=2", "plan.nodes=1", "plan.gpus_per_node=8",
        "plan.gpu_memory_gb=80", "plan.gpu_tflops=312", "plan.mfu=0.4",
    ]))


def test_memory_of_the_fullest_rank_matches_hand_arithmetic():
    plan = seven_b_plan()
    assert [(s.plan.first, s.plan.last, s.plan.exits) for s in plan.stages] == [(0, 12, (8,)), (12, 24, (16, 24))]
    assert LAYER == 202_383_360 and EXIT_BODY == 135_274_496
    stage = plan.worst
    assert stage.plan.stage == 1
    trainable = 2 * (EXIT_BODY + HEAD)  # exits 16 and 24: 532_692_992
    tokens = (4 // 2) * 1024  # a dp rank's share of one micro-batch: 2 sequences
    expected = {
        # 12 bf16 layers over dp 2 x tp 2, plus two layers gathered over dp (running + prefetched).
        "backbone layers": 12 * LAYER * 2 / 4 + 2 * LAYER * 2 / 2,  # 1_619_066_880
        # No embeddings on stage 1; the untied LM head split over tp, and the final norm.
        "embeddings + LM head": HEAD * 2 / 2 + 4096 * 2,  # 131_080_192
        "exit weights (fp32)": 4 * trainable / 4,
        "exit gradients (fp32)": 4 * trainable / 4,
        "AdamW state (fp32)": 8 * trainable / 4,
        "exit weights + grads, gathered": 2 * 2 * trainable / 2,  # bf16, split over tp only
        "activations": (
            tokens * 2 * (2 * 4096 + (2 * 4096 + 2 * 4096 + 3 * 11008) / 2)  # one no-grad layer: 134_742_016
            + 2 * tokens * 4096 * 2  # the two exits' input states
            + 2 * tokens * 2 * (4 * 4096 + 4 * 11008 / 2)  # two mlp exits' autograd activations
            + 1024 * 32000 / 2 * (4 + 2)  # fused loss: fp32 logits + bf16 matmul output per chunk row
            + 2 * tokens * 4096 * 2  # dloss/dhidden per exit
            + (4 * 2 * HEAD + 2 * HEAD) / 2  # fp32 weight gradient per head + one bf16 scratch
        ),  # 1_270_087_680
    }
    assert stage.memory == pytest.approx(expected, rel=1e-12)
    assert stage.total == pytest.approx(6_216_392_704, rel=1e-12)
    assert plan.usable == 0.9 * 80 * GIB and plan.fits


def test_throughput_is_the_slowest_stage_stretched_by_the_pipeline_bubble():
    plan = seven_b_plan()
    stage0 = 2 * 12 * (LAYER + 1024 * 4096) + 1 * 6 * (EXIT_BODY + HEAD)  # layers + causal attention, 1 exit
    stage1 = 2 * 12 * (LAYER + 1024 * 4096) + 2 * 6 * (EXIT_BODY + HEAD)  # ... 2 exits (heads train: 6/weight)
    assert [s.flops_per_token for s in plan.stages] == [stage0, stage1] == [6_555_942_912, 8_154_021_888]
    tokens = 4 * 1 * 1024
    busy = tokens * stage1 / (2 * 2 * 312e12 * 0.4)  # stage 1's 4 GPUs (dp x tp) at 40% of peak
    assert plan.pipeline_efficiency == pytest.approx(2 / 3)  # 2 micro-batches of 1 row, 2 stages
    assert plan.step_seconds == pytest.approx(busy * 3 / 2, rel=1e-12)
    assert plan.tokens_per_s == pytest.approx(40_814.2, rel=1e-5)


def test_llama2_70b_with_8_mlp_exits_needs_two_nodes():
    """The issue's example: Llama-2-70B, 8 mlp exits (copied heads), FSDP over 1 or 2 nodes of 8 x 80 GB."""
    args = ["recipe=llama2_70b_mlp", "exits.layers=[10,20,30,40,50,60,70,75]", "data.batch_size=16",
            "optim.grad_accum=2", "plan.gpus_per_node=8", "plan.gpu_memory_gb=80"]
    one, two = (make_plan(compose_config("plan", [*args, f"plan.nodes={n}"])) for n in (1, 2))
    assert one.exit_params == 8 * (EXIT_BODY_70B + HEAD_70B)
    assert not one.fits and two.fits
    assert two.worst.total < one.worst.total
    assert two.tokens_per_s == pytest.approx(2 * one.tokens_per_s)  # no pipeline: throughput scales with GPUs



def test_plan_command_prints_the_verdict_and_refuses_an_impossible_mesh():
    proc = subprocess.run(
        [sys.executable, "-m", "eetune.cli", "plan", "recipe=llama2_70b_mlp", "exits.layers=[10,20,30,40,50,60,70,75]",
         "plan.nodes=2", "data.batch_size=16", "optim.grad_accum=2"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "llama2_70b with 8 mlp exits on 2 x 8 x 80 GB (pp=1 x dp_replicate=1 x dp_shard=16 x tp=1): fits" in text
    with pytest.raises(EetuneError, match="data.batch_size=4 must be a multiple of the 16 data-parallel ranks"):
        make_plan(compose_config("plan", ["recipe=llama2_70b_mlp", "plan.nodes=2"]))


def test_plan_counts_the_exits_train_init_from_names_as_tune_does(tmp_path):
    """With train.init_from, tune trains the named run's exits (not `exits`): so does the plan, and
    their confidence estimators make the final layer needed."""
    from eetune.exits import ExitSpec
    from eetune.exits.checkpoint import FORMAT

    specs = [ExitSpec(layer=8, arch="norm", confidence="linear"), ExitSpec(layer=20, arch="mlp", head="copy")]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "stage": "tune", "exits": [s.to_dict() for s in specs]}))
    common = ["recipe=llama2_13b_mlp", "model=llama2_7b", "loss.ce_target=labels", "loss.kd_alpha=0",
              "data.batch_size=4", "plan.gpus_per_node=4", "parallel.pp=2", "parallel.dp_shard=2"]
    resumed = make_plan(compose_config("plan", [*common, "exits.layers=[4]", "exits.confidence=none",
                                                f"train.init_from={tmp_path}"]))
    assert resumed.specs == specs
    assert resumed.stages[-1].plan.last == 32  # the final layer is computed: a confidence estimator trains
    written = make_plan(compose_config("plan", [*common, "exits.layers=[8,20]"]))
    assert written.stages[-1].plan.last == 20


# -- plan.workload=serve ---------------------------------------------------------------------------


def serve_cfg(*overrides: str):
    # Llama-2-7B in bf16 with 3 mlp exits sharing the LM head; 4 sequences of 2048 positions.
    return compose_config("plan", [
        "recipe=llama2_13b_mlp", "model=llama2_7b", "model.dtype=bfloat16", "exits.layers=[8,16,24]",
        "exits.arch=mlp", "exits.head=shared", "exits.confidence=none", "plan.workload=serve", "plan.batch_size=4",
        "plan.context=2048", "serve.prefill_chunk=256", "plan.gpu_memory_gb=80", *overrides,
    ])


def test_serving_memory_per_rank_matches_hand_arithmetic():
    plan = make_serve_plan(serve_cfg("parallel.tp=2", "parallel.pp=2"))
    assert [(s.plan.first, s.plan.last) for s in plan.stages] == [(0, 16), (16, 32)]
    for stage in plan.stages:  # bf16 = 2 bytes; every stage holds the embeddings whole and every exit
        m = stage.memory
        assert m["backbone layers"] == 16 * LAYER * 2 / 2  # 16 blocks split over tp=2
        assert m["embeddings + LM head"] == HEAD * 2 + HEAD * 2 / 2 + 4096 * 2  # the untied head by vocabulary
        assert m["exits"] == 3 * EXIT_BODY * 2 / 2  # three mlp exits over tp; their head is the LM head
        assert m["KV cache"] == 16 * 2 * 4 * 2048 * (4096 / 2) * 2 == GIB  # 16 layers x K,V x rows x positions
        assert m["activations"] == 256 * 2 * (2 * 4096 + (2 * 4096 + 2 * 4096 + 3 * 11008) / 2) + 4 * 32000 * 4
    copied = make_serve_plan(serve_cfg("parallel.tp=2", "parallel.pp=2", "exits.head=copy")).stages[1].memory
    assert copied["exits"] == 3 * (EXIT_BODY + HEAD) * 2 / 2  # copied heads split by vocabulary too
    attention = make_serve_plan(serve_cfg("parallel.tp=2", "exits.arch=layer")).stages[0].memory
    assert attention["KV cache"] == (32 + 3) * 2 * 4 * 2048 * (4096 / 2) * 2  # a layer exit's block has a cache
    assert plan.usable == 0.9 * 80 * GIB and plan.fits


def test_the_smallest_serving_mesh_is_the_fewest_gpus_that_fit():
    cfg = compose_config("plan", ["recipe=llama2_70b_mlp", "plan.workload=serve", "plan.batch_size=8",
                                  "plan.context=4096"])
    best = smallest_mesh(cfg)
    assert best is not None and best.fits
    for tp in (1, 2, 4, 8):
        for pp in range(1, 9):
            if tp * pp < best.gpus:
                assert not make_serve_plan(cfg, tp, pp).fits, (tp, pp)
    assert best.describe() == "tp=1 x pp=3 (3 GPUs)"  # pipeline stages split the memory no tp of 3 can
    # At equal GPUs the most tensor-parallel mesh: pipeline stages wait for each other, tp ranks do not.
    busy = compose_config("plan", ["recipe=llama2_70b_mlp", "plan.workload=serve", "plan.batch_size=64",
                                   "plan.context=4096"])
    assert make_serve_plan(busy, 2, 2).fits and make_serve_plan(busy, 1, 4).fits
    assert smallest_mesh(busy).describe() == "tp=4 x pp=1 (4 GPUs)"
    # A bigger KV cache needs more GPUs; none is enough once one stage's share cannot fit.
    bigger = smallest_mesh(compose_config("plan", ["recipe=llama2_70b_mlp", "plan.workload=serve",
                                                   "plan.batch_size=128", "plan.context=4096"]))
    assert bigger is not None and bigger.gpus > best.gpus
    assert smallest_mesh(compose_config("plan", ["recipe=llama2_70b_mlp", "plan.workload=serve",
                                                 "plan.gpus_per_node=1", "plan.nodes=1",
                                                 "plan.gpu_memory_gb=24"])) is None


def test_plan_serve_command_prints_the_smallest_mesh_and_refuses_a_bad_tp():
    args = [sys.executable, "-m", "eetune.cli", "plan", "recipe=llama2_70b_mlp", "plan.workload=serve"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "on tp=1 x pp=1 (1 GPU) of 80 GB: does not fit" in text
    assert "the smallest mesh that serves it: tp=" in text and "KV cache" in text
    bad = subprocess.run([*args, "parallel.tp=3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "parallel.tp=3 must divide the model's 64 attention and 8 KV heads" in bad.stderr
    assert "Traceback" not in bad.stderr
