"""`eetune plan plan.workload=serve`'s arithmetic: will a model with its exits decode on a mesh, and on which?

Decoding keeps no optimizer state and no FSDP shards. Its layout (eetune.parallel.load.build_inference_model):
each pipeline stage holds a contiguous run of layers, split over its tp ranks; the embeddings, the
final norm and every exit are on every stage, so every rank computes the same logits and takes the
same exit decisions. Per rank:

- weights: the stage's backbone layers / tp; the embeddings whole; the LM head / tp (split by
  vocabulary; a tied model's head is a view of its embeddings and costs nothing more); every exit's
  body / tp and its copied head / tp; all in `model.dtype`;
- the KV cache: 2 x `plan.batch_size` x `plan.context` x kv_dim / tp values per layer of the
  stage (heads split over tp), plus one more per `layer` exit, whose block keeps its own cache
  (eetune.infer.caches);
- activations: a prefill chunk of `serve.prefill_chunk` tokens through one layer, and one row of
  fp32 logits per sequence over the vocabulary;
- 10% of the GPU held back, as for tuning.

`smallest_mesh` tries every tp that divides the attention and KV heads (within a node) times every
pipeline depth, and returns the plan on the fewest GPUs that fits (at equal GPUs the most tensor
parallel one: pipeline stages at batch 1 wait for each other, tensor-parallel ranks do not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eetune.errors import EetuneError
from eetune.exits import ExitSpec, check_specs, get_exit_arch
from eetune.models import get_model_entry, param_count
from eetune.models import hf_config as hfc
from eetune.parallel.pipeline import StagePlan, plan_stages
from eetune.parallel.plan import _BYTES, GIB, MeshMemory, Shape, exit_params, model_config
from eetune.train.needs import run_needs

if TYPE_CHECKING:
    from eetune.config.schema import EetuneConfig


@dataclass
class ServeStage:
    """One pipeline stage of a serving mesh: memory per rank (bytes) by component."""

    plan: StagePlan
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.memory.values())


@dataclass
class ServePlan(MeshMemory):
    model: str
    tp: int
    pp: int
    capacity: float  # bytes per GPU
    batch_size: int
    context: int
    stages: list[ServeStage]
    backbone_params: int
    exit_params: int
    specs: list[ExitSpec] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        return f"tp={self.tp} x pp={self.pp} ({self.gpus} GPU{'s' if self.gpus > 1 else ''})"


def make_serve_plan(cfg: EetuneConfig, tp: int | None = None, pp: int | None = None) -> ServePlan:
    """The serving plan on `tp` x `pp` ranks (default: parallel.tp and parallel.pp)."""
    entry = get_model_entry(cfg.model.name)
    config = model_config(cfg, entry)
    shape = Shape.from_config(entry.family, config)
    specs = run_needs(cfg).specs
    check_specs(specs, shape.layers)
    tp = int(cfg.parallel.tp) if tp is None else tp
    pp = int(cfg.parallel.pp) if pp is None else pp
    _check_mesh(config, shape, tp, pp)
    batch = int(cfg.plan.batch_size)
    context = int(cfg.plan.context) if cfg.plan.context is not None else int(cfg.model.max_seq_len)
    if batch < 1 or context < 1:
        raise EetuneError(f"plan.batch_size={batch} and plan.context={context} must be >= 1")
    weight_bytes = _BYTES[cfg.model.dtype]
    chunk = int(cfg.serve.prefill_chunk or context)
    stages = [
        _stage_memory(plan, specs, shape, tp, weight_bytes, batch, context, min(chunk, context))
        for plan in plan_stages(pp, shape.layers, [s.layer for s in specs], True)
    ]
    return ServePlan(
        model=entry.name, tp=tp, pp=pp, capacity=float(cfg.plan.gpu_memory_gb) * GIB, batch_size=batch,
        context=context, stages=stages, backbone_params=param_count(entry.family, config),
        exit_params=sum(sum(exit_params(s, shape)) for s in specs), specs=specs,
    )


def smallest_mesh(cfg: EetuneConfig) -> ServePlan | None:
    """The tp x pp plan on the fewest GPUs that fits the cluster (most tp first at a tie), or None."""
    entry = get_model_entry(cfg.model.name)
    config = model_config(cfg, entry)
    heads, kv_heads = int(config["num_attention_heads"]), hfc.num_kv_heads(config)
    layers = Shape.from_config(entry.family, config).layers
    per_node, gpus = int(cfg.plan.gpus_per_node), int(cfg.plan.nodes) * int(cfg.plan.gpus_per_node)
    tps = [tp for tp in range(1, per_node + 1) if heads % tp == 0 and kv_heads % tp == 0]
    meshes = sorted(((tp, pp) for tp in tps for pp in range(1, min(layers, gpus // tp) + 1)),
                    key=lambda mesh: (mesh[0] * mesh[1], mesh[1]))
    for tp, pp in meshes:
        plan = make_serve_plan(cfg, tp, pp)
        if plan.fits:
            return plan
    return None


def _check_mesh(config: dict, shape: Shape, tp: int, pp: int) -> None:
    heads, kv_heads = int(config["num_attention_heads"]), hfc.num_kv_heads(config)
    if tp < 1 or pp < 1:
        raise EetuneError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
    if heads % tp or kv_heads % tp:
        raise EetuneError(f"parallel.tp={tp} must divide the model's {heads} attention and {kv_heads} KV heads")
    if pp > shape.layers:
        raise EetuneError(f"parallel.pp={pp} stages need at least {pp} layers; the model has {shape.layers}")


def _stage_memory(plan: StagePlan, specs: list[ExitSpec], shape: Shape, tp: int, weight_bytes: int, batch: int,
                  context: int, chunk: int) -> ServeStage:
    """One stage's ranks; `specs`: every exit (each stage holds them all)."""
    v, d, f, kv = shape.vocab, shape.dim, shape.ffn, shape.kv_dim
    stage = ServeStage(plan)
    m = stage.memory
    layers = plan.last - plan.first
    m["backbone layers"] = layers * shape.layer_params * weight_bytes / tp
    untied_head = 0 if shape.tied else v * d / tp
    m["embeddings + LM head"] = (v * d + untied_head + d) * weight_bytes
    m["exits"] = sum((body + head) / tp for body, head in (exit_params(spec, shape) for spec in specs)) * weight_bytes
    caches = layers + sum(get_exit_arch(spec.arch).block is not None for spec in specs)
    m["KV cache"] = caches * 2 * batch * context * kv / tp * weight_bytes
    m["activations"] = chunk * weight_bytes * (2 * d + (2 * d + 2 * kv + 3 * f) / tp) + batch * v * 4
    return stage
