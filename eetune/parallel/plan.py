"""`eetune plan`'s arithmetic (the stage: eetune.stages.plan): will a tune fit a cluster, and how fast
will it run? No GPU needed.

For a model (its config.json, or the registry's reference config), an exit spec, a mesh and a GPU
size, it estimates the memory of the most loaded rank and the step throughput, counting what
`eetune.parallel` actually allocates:

- frozen backbone: the stage's layers sharded over dp (FSDP2) and tp; two gathered layers (the
  one running and the one prefetched) when dp > 1; embeddings on the first stage; the LM head and
  final norm on stages that hold exits or the final layer (not FSDP-sharded, split over tp);
- exits: fp32 master weights, fp32 gradients and AdamW's two moments, sharded over dp x tp; plus,
  from forward to backward, gathered compute-dtype weights and gradients (FSDP keeps exits
  gathered because the fused loss reads their heads directly; bf16 autocast keeps a copy too);
- activations of one micro-batch (data.batch_size / dp sequences): the no-grad backbone layer's
  temporaries, the kept exit-layer states (and the final state where a loss needs it), each
  exit's autograd activations, the fused loss's [chunk, vocab / tp] buffers and its gradients;
- 10% of the GPU is held back for the CUDA context, NCCL buffers and fragmentation.

Throughput: FLOPs per token (2 per weight in forward; exits 6 per weight, forward and backward;
heads 4, or 6 when they train; causal attention 2 * seq_len * dim per layer, x3 in exits) over
`plan.gpu_tflops` x `plan.mfu` per GPU. Stages run concurrently, so the slowest stage sets the
pace, stretched by the pipeline bubble (m + pp - 1) / m over its m micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from eetune.errors import EetuneError
from eetune.exits import ExitSpec, check_specs, get_exit_arch
from eetune.models import get_model_entry, param_count
from eetune.models import hf_config as hfc
from eetune.parallel.mesh import ParallelDims
from eetune.parallel.pipeline import StagePlan, run_stages
from eetune.train.needs import run_needs

if TYPE_CHECKING:
    from eetune.config.schema import EetuneConfig
    from eetune.models.registry import ModelEntry

GIB = 1024**3
RESERVED = 0.10  # of each GPU's memory, kept free for the CUDA context, NCCL buffers, fragmentation
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_CONFIDENCE_HIDDEN = 64  # ConfidenceEstimator's mlp width


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs to know about the model."""

    vocab: int
    dim: int
    ffn: int
    layers: int
    kv_dim: int  # num_kv_heads * head_dim
    layer_params: int
    tied: bool

    @classmethod
    def from_config(cls, family: Any, config: Mapping[str, Any]) -> Shape:
        one, none = ({**config, "num_hidden_layers": n} for n in (1, 0))
        return cls(
            vocab=int(config["vocab_size"]), dim=int(config["hidden_size"]), ffn=int(config["intermediate_size"]),
            layers=hfc.num_layers(config), kv_dim=hfc.num_kv_heads(config) * hfc.head_dim(config),
            layer_params=param_count(family, one) - param_count(family, none),
            tied=hfc.tie_word_embeddings(config),
        )


def exit_params(spec: ExitSpec, shape: Shape) -> tuple[int, int]:
    """(parameters before the head, head parameters) of one exit."""
    d = shape.dim
    body = get_exit_arch(spec.arch).body_params(shape)
    if spec.confidence == "linear":
        body += d + 1
    elif spec.confidence == "mlp":
        body += d * _CONFIDENCE_HIDDEN + 2 * _CONFIDENCE_HIDDEN + 1
    return body, shape.vocab * d if spec.head == "copy" else 0


@dataclass
class StageCost:
    """One pipeline stage: its ranks' memory (bytes, per rank) and its work (FLOPs per token)."""

    plan: StagePlan
    memory: dict[str, float] = field(default_factory=dict)
    flops_per_token: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.memory.values())


class MeshMemory:
    """What a plan of pipeline stages says about memory: the fullest stage, and whether it fits
    the GPU (`capacity` bytes) less the reserve. Subclasses are dataclasses with `stages` and `capacity`."""

    stages: list
    capacity: float

    @property
    def worst(self):
        return max(self.stages, key=lambda s: s.total)

    @property
    def usable(self) -> float:
        return self.capacity * (1 - RESERVED)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.usable


def head_bytes(plan: StagePlan, shape: Shape, weight_bytes: int, tp: int) -> float:
    """Embeddings (first stage) and the LM head with the final norm (where the final layer or an exit
    needs them; a tied model's head is its embeddings), split over tp."""
    head_needed = bool(plan.exits) or plan.computes_final
    embeddings = plan.is_first or (head_needed and shape.tied)
    untied_head = head_needed and not shape.tied
    return (embeddings + untied_head) * shape.vocab * shape.dim * weight_bytes / tp + head_needed * shape.dim * weight_bytes


@dataclass
class Plan(MeshMemory):
    model: str
    dims: ParallelDims
    gpus: int
    capacity: float  # bytes per GPU
    stages: list[StageCost]
    backbone_params: int
    exit_params: int
    tokens_per_step: int
    step_seconds: float
    pipeline_efficiency: float
    specs: list[ExitSpec] = field(default_factory=list)  # every exit of the run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_seconds


def make_plan(cfg: EetuneConfig) -> Plan:
    entry = get_model_entry(cfg.model.name)
    config = model_config(cfg, entry)
    shape = Shape.from_config(entry.family, config)
    needs = run_needs(cfg)  # as tune: the exits of `train.init_from` when it names a run
    specs, needs_final = needs.specs, needs.needs_final
    check_specs(specs, shape.layers)
    gpus = int(cfg.plan.nodes) * int(cfg.plan.gpus_per_node)
    if gpus < 1 or cfg.plan.gpu_memory_gb <= 0 or cfg.plan.gpu_tflops <= 0 or not 0 < cfg.plan.mfu <= 1:
        raise EetuneError("plan.nodes, plan.gpus_per_node, plan.gpu_memory_gb and plan.gpu_tflops must be > 0, "
                          "plan.mfu in (0, 1]")
    dims = ParallelDims.from_config(cfg.parallel, gpus)
    dims.check_batch_size(int(cfg.data.batch_size))
    plans = run_stages(dims.pp, shape.layers, needs, cfg.parallel.partial)

    weight_bytes = _BYTES[cfg.model.dtype]
    rows = int(cfg.data.batch_size) // dims.dp
    seq = int(cfg.data.seq_len)
    stages = [
        _stage_cost(plan, [s for s in specs if s.layer in plan.exits], shape, dims, weight_bytes, rows, seq,
                    int(cfg.loss.chunk_size), needs_final)
        for plan in plans
    ]
    tokens = int(cfg.data.batch_size) * int(cfg.optim.grad_accum) * seq
    flops_per_gpu = float(cfg.plan.gpu_tflops) * 1e12 * float(cfg.plan.mfu)
    slowest = max(tokens * stage.flops_per_token / (dims.dp * dims.tp * flops_per_gpu) for stage in stages)
    microbatches = max(rows // int(cfg.parallel.pp_microbatch_size), 1)
    efficiency = microbatches / (microbatches + dims.pp - 1)
    return Plan(
        model=entry.name, dims=dims, gpus=gpus, capacity=float(cfg.plan.gpu_memory_gb) * GIB, stages=stages,
        backbone_params=param_count(entry.family, config), exit_params=sum(sum(exit_params(s, shape)) for s in specs),
        tokens_per_step=tokens, step_seconds=slowest / efficiency, pipeline_efficiency=efficiency, specs=specs,
    )


def model_config(cfg: EetuneConfig, entry: ModelEntry) -> Mapping[str, Any]:
    """The checkpoint's own config.json when model.checkpoint_dir has one, else the registry's."""
    if cfg.model.checkpoint_dir:
        from pathlib import Path

        if (Path(cfg.model.checkpoint_dir) / hfc.CONFIG_FILE).is_file():
            return hfc.read_hf_config(Path(cfg.model.checkpoint_dir))
    return entry.reference_config


def _stage_cost(plan: StagePlan, specs: list[ExitSpec], shape: Shape, dims: ParallelDims, weight_bytes: int,
                rows: int, seq: int, chunk_size: int, needs_final: bool) -> StageCost:
    v, d, f, kv = shape.vocab, shape.dim, shape.ffn, shape.kv_dim
    dp, tp = dims.dp, dims.tp
    compute_bytes = weight_bytes  # exits compute in the model dtype (bf16 autocast / FSDP param_dtype)
    tokens = rows * seq
    cost = StageCost(plan)
    m = cost.memory

    # Frozen backbone.
    layers = plan.last - plan.first
    m["backbone layers"] = layers * shape.layer_params * weight_bytes / (dp * tp)
    if dp > 1 and layers:
        m["backbone layers"] += min(layers, 2) * shape.layer_params * weight_bytes / tp  # gathered
    m["embeddings + LM head"] = head_bytes(plan, shape, weight_bytes, tp)

    # Exits: fp32 masters, fp32 gradients, AdamW moments (sharded); gathered compute copies.
    sizes = [exit_params(spec, shape) for spec in specs]
    trainable = sum(body + head for body, head in sizes)
    m["exit weights (fp32)"] = 4 * trainable / (dp * tp)
    m["exit gradients (fp32)"] = 4 * trainable / (dp * tp)
    m["AdamW state (fp32)"] = 8 * trainable / (dp * tp)
    if dp > 1 or compute_bytes != 4:
        m["exit weights + grads, gathered"] = 2 * compute_bytes * trainable / tp

    # Activations of one micro-batch on this stage's ranks.
    layer_temporaries = tokens * compute_bytes * (2 * d + (2 * d + 2 * kv + 3 * f) / tp)
    kept = (len(specs) + needs_final) * tokens * d * compute_bytes
    exit_activations = sum(tokens * compute_bytes * _exit_activation_width(spec, shape, tp) for spec in specs)
    chunk = min(chunk_size, tokens)
    loss_buffers = 0.0
    if specs:
        per_row = 4 + (compute_bytes if compute_bytes != 4 else 0) + (8 if needs_final else 0)
        loss_buffers = chunk * v / tp * per_row + len(specs) * tokens * d * compute_bytes
        # Weight gradients of trainable heads: an fp32 buffer each, one compute-dtype scratch.
        loss_buffers += (4 * sum(head for _, head in sizes) + compute_bytes * max(head for _, head in sizes)) / tp
    m["activations"] = layer_temporaries * (layers > 0) + kept + exit_activations + loss_buffers

    # Work per token of the global batch, on this stage.
    flops = 2 * layers * (shape.layer_params + seq * d)
    for spec, (body, head) in zip(specs, sizes):
        attention = 3 * 2 * seq * d if get_exit_arch(spec.arch).block is not None else 0
        flops += 6 * body + attention + (6 if head else 4) * v * d
    if specs and needs_final:
        flops += 2 * v * d  # the teacher's logits, once per stage
    cost.flops_per_token = flops
    return cost


def _exit_activation_width(spec: ExitSpec, shape: Shape, tp: int) -> float:
    """Values per token an exit keeps for backward (norm inputs, projections, residuals)."""
    return get_exit_arch(spec.arch).activation_width(shape, tp)
