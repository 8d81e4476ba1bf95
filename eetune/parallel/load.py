"""Build one rank's part of the model: only the tensors its pipeline stage needs are ever kept.

`build_stage_model` is tuning's (a pipeline stage, DTensor-sharded); `build_inference_model` is
decoding's and evaluation's (a pipeline stage's layers, tensor-parallel slices as plain tensors).

The decoder is built on the meta device (no memory). Tensors are read one at a time from the
checkpoint's safetensors files (memory-mapped) and converted to torchtune names with the family's
own converter (the one `FullModelHFCheckpointer` uses), so a rank never holds more than its stage,
and a layer's full weights only while that layer is being sharded (`parallelize_stage`).

Exits are built exactly as in a single process, every exit in order on every rank, so random
initialisation draws the same numbers; a rank then keeps only its stage's exits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel, ExitSpec, check_specs, get_exit_arch
from eetune.exits.checkpoint import load_exits, read_manifest
from eetune.models import BaseModel, fingerprint, get_model_entry
from eetune.models import hf_config as hfc
from eetune.models.checkpoint import find_safetensors, hf_to_tune_state_dict
from eetune.models.load import resolve_checkpoint_dir, load_tokenizer, parse_dtype
from eetune.models.registry import ModelFamily
from eetune.parallel.inference_pp import LayerPipeline
from eetune.parallel.inference_tp import shard_block, shard_exits, shard_heads
from eetune.parallel.mesh import Topology
from eetune.parallel.parallelize import parallelize_stage
from eetune.parallel.pipeline import StagePlan, plan_stages, run_stages
from eetune.train.needs import RunNeeds, build_model

if TYPE_CHECKING:
    from eetune.config.schema import EetuneConfig


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint dir's weights by torchtune name, each read and converted only when asked for."""

    def __init__(self, family: ModelFamily, checkpoint_dir: Path, hf_config: Mapping[str, Any]) -> None:
        self.family, self.hf_config = family, hf_config
        self._handles = {name: safe_open(str(Path(checkpoint_dir) / name), framework="pt")
                         for name in find_safetensors(checkpoint_dir)}
        self._source: dict[str, tuple[str, str]] = {}  # torchtune name -> (file, HF key)
        for file, handle in self._handles.items():
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                # Converting a meta tensor gives the name without reading any data.
                for name in self._convert({key: torch.empty(shape, device="meta")}):
                    self._source[name] = (file, key)
        if hfc.tie_word_embeddings(hf_config):
            self._source.pop("output.weight", None)  # as load_tune_state_dict: HF ignores it too

    def _convert(self, hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return hf_to_tune_state_dict(self.family, hf_tensors, self.hf_config)

    def __getitem__(self, name: str) -> torch.Tensor:
        file, key = self._source[name]
        return self._convert({key: self._handles[file].get_tensor(key)})[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


@dataclass
class StageModel:
    base: BaseModel  # `model` is the meta-built decoder with this stage's parts materialised
    model: EarlyExitModel  # this stage's exits only
    plan: StagePlan
    plans: list[StagePlan]  # every stage's, so any rank can tell where an exit lives
    specs: list[ExitSpec]  # every exit of the run, in layer order


def build_stage_model(cfg: EetuneConfig, topology: Topology, needs: RunNeeds) -> StageModel:
    """This rank's stage of the backbone and exits, loaded, tensor-parallel and FSDP-sharded.

    `needs`: every exit of the run and whether the final layer is computed. The exits are built by
    the single-process builder (`build_model`, which reads `base.model`'s layers).
    """
    specs = needs.specs
    base, loader = _meta_base(cfg.model, topology.device)
    decoder, config = base.model, base.hf_config
    num_layers = len(decoder.layers)

    plans = run_stages(topology.dims.pp, num_layers, needs, cfg.parallel.partial)
    plan = plans[topology.pp_rank]

    # Exits, built from full source weights on every rank (same random draws), then this stage's kept.
    loader.load(_exit_sources(specs, num_layers, _lm_head_name(config)))
    model = build_model(cfg, base)
    for layer in model.exit_layers:
        if layer not in plan.exits:
            del model.exits[str(layer)]
    model.exits.to(topology.device)

    stage_names = _stage_names(plan, config)
    loader.unload(loader.loaded - set(loader.expand(stage_names)))  # exit sources this stage does not run
    loader.load(name for name in stage_names if not name.startswith("layers."))
    # Layers load one at a time, right before they are sharded.
    parallelize_stage(model, plan, topology, bf16=loader.dtype == torch.bfloat16,
                      before_block=lambda index: loader.load([f"layers.{index}."]))
    _init_rope(model, topology.device)
    return StageModel(base=base, model=model, plan=plan, plans=plans, specs=specs)


def _meta_base(model_cfg: Any, device: torch.device) -> tuple[BaseModel, _Materialiser]:
    """The base model `model_cfg` names, built on the meta device (no memory), with its fingerprint
    (streamed on rank 0) and a loader that materialises its tensors by name from the checkpoint."""
    entry = get_model_entry(model_cfg.name)
    path = resolve_checkpoint_dir(entry, model_cfg.checkpoint_dir)
    config = hfc.read_hf_config(path)
    dtype = parse_dtype(model_cfg.dtype)
    seq_len = int(model_cfg.max_seq_len or config.get("max_position_embeddings") or 4096)
    tensors = CheckpointTensors(entry.family, path, config)
    with torch.device("meta"):
        decoder = entry.family.builder(**entry.family.decoder_kwargs(config, seq_len))
    decoder.to(dtype=dtype).eval().requires_grad_(False)
    base = BaseModel(
        name=entry.name, model=decoder, tokenizer=load_tokenizer(path), checkpoint_dir=path, hf_config=config,
        fingerprint=_shared_fingerprint(tensors),
    )
    return base, _Materialiser(decoder, tensors, device, dtype)


@dataclass(frozen=True)
class NewExits:
    """Exits to build as `augment` builds them: `specs`, random ones drawn after seeding with `seed`."""

    specs: list[ExitSpec]
    init_std: float
    seed: int


def build_inference_model(
    model_cfg: Any, run_dir: str | None, topology: Topology, *, new_exits: NewExits | None = None,
    split_exits: bool = True,
) -> tuple[BaseModel, EarlyExitModel]:
    """The base model `model_cfg` names with the exits of `run_dir` (or `new_exits`; none without
    either), for decoding and evaluation: what `load_model` gives a single process, holding this
    rank's part only. Layers are split into `parallel.pp` pipeline stages (eetune.parallel.inference_pp)
    and each stage's blocks and the vocabulary heads over its `parallel.tp` ranks
    (eetune.parallel.inference_tp). Exits are on every stage, split over tp; `split_exits=False` keeps
    them whole (`augment` saves them).

    Each block is read whole, one at a time, and sliced at once, so a rank never holds more than
    its slices plus one block (and the layers copy-initialised exits are built from).
    """
    if topology.dims.dp > 1:
        raise EetuneError(
            f"decoding and evaluating on a mesh split the model by tensor and pipeline parallel only: got "
            f"{topology.dims.describe()}; set parallel.dp_shard=1 and parallel.dp_replicate=1"
        )
    base, loader = _meta_base(model_cfg, topology.device)
    if base.tokenizer is None:
        raise EetuneError(f"{base.checkpoint_dir} has no tokenizer: decoding text needs one (tokenizer.json)")
    decoder, lm_head = base.model, _lm_head_name(base.hf_config)
    num_layers = len(decoder.layers)
    loader.load(["tok_embeddings.weight", "norm.scale", lm_head])
    if run_dir:
        specs = [ExitSpec(**spec) for spec in read_manifest(run_dir)["exits"]]
        # Exits are rebuilt from the layers they copy, then their own weights are loaded over them.
        loader.load(_exit_sources(specs, num_layers, lm_head))
        model = load_exits(run_dir, decoder, base.fingerprint, base.checkpoint_dir)
    elif new_exits is not None:
        check_specs(new_exits.specs, num_layers)
        loader.load(_exit_sources(new_exits.specs, num_layers, lm_head))
        torch.manual_seed(new_exits.seed)  # the same draws as in one process
        model = EarlyExitModel(decoder, new_exits.specs, init_std=new_exits.init_std)
    else:
        model = EarlyExitModel(decoder, [])
    tp_mesh = topology.tp_mesh
    if tp_mesh is not None and split_exits:
        shard_exits(model, tp_mesh)
    model.exits.to(topology.device)

    pipeline = None
    if topology.dims.pp > 1:
        plans = plan_stages(topology.dims.pp, num_layers, [], needs_final=True)
        pipeline = LayerPipeline(plans, topology.pp_rank, topology.pp_group)
        # Layers other stages run were read only to build exits from.
        loader.unload(f"layers.{index}." for index in range(num_layers) if not pipeline.owns(index))
    for index in range(num_layers):
        if pipeline is None or pipeline.owns(index):
            loader.load([f"layers.{index}."])
            if tp_mesh is not None:
                shard_block(decoder.layers[index], tp_mesh)
    if tp_mesh is not None:  # after the exits copied the LM head
        shard_heads(model, tp_mesh, exits=split_exits)
    decoder.layer_pipeline = pipeline  # read by eetune.infer.generate and EarlyExitModel.run_layers
    _init_rope(model, topology.device)
    return base, model


def _shared_fingerprint(tensors: CheckpointTensors) -> str:
    """The single-process fingerprint of the base weights, computed on rank 0 and shared.

    Rank 0 streams every tensor once (one in memory at a time); other ranks load meanwhile.
    """
    value = [fingerprint(tensors) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def _lm_head_name(config: Mapping[str, Any]) -> str:
    return "tok_embeddings.weight" if hfc.tie_word_embeddings(config) else "output.weight"


def _exit_sources(specs: list[ExitSpec], num_layers: int, lm_head: str) -> set[str]:
    """What `build_exit` copies from: the final norm, the LM head, the layers each arch copies."""
    names = {lm_head, "norm.scale"}
    for spec in specs:
        names.update(f"layers.{index}." for index in get_exit_arch(spec.arch).copies_from(spec, num_layers))
    return names


def _stage_names(plan: StagePlan, config: Mapping[str, Any]) -> list[str]:
    names = [f"layers.{index}." for index in plan.layer_indices]
    if plan.is_first:
        names.append("tok_embeddings.weight")
    if plan.exits or plan.computes_final:
        # Exits and the teacher read the final norm and the LM head.
        names += ["norm.scale", _lm_head_name(config)]
    return names


class _Materialiser:
    """Replaces the meta decoder's tensors with real ones (by name or `layers.N.` prefix) and back."""

    def __init__(self, decoder: TransformerDecoder, tensors: CheckpointTensors, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.decoder, self.tensors, self.device, self.dtype = decoder, tensors, device, dtype
        self.loaded: set[str] = set()

    def expand(self, names) -> list[str]:
        """Tensor names given exactly or by a prefix ending in "."."""
        names = list(names)
        return [name for name in self.tensors
                if any(name == n or (n.endswith(".") and name.startswith(n)) for n in names)]

    def load(self, names) -> None:
        wanted = [name for name in self.expand(names) if name not in self.loaded]
        if wanted:
            # assign=True adopts the tensors; parameters keep the module's requires_grad=False.
            state = {name: self.tensors[name].to(device=self.device, dtype=self.dtype) for name in wanted}
            self.decoder.load_state_dict(state, strict=False, assign=True)
            self.loaded |= set(wanted)

    def unload(self, names) -> None:
        for name in self.expand(names):
            module_name, _, param = name.rpartition(".")
            module = self.decoder.get_submodule(module_name)
            tensor = getattr(module, param)
            setattr(module, param, torch.nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False))
            self.loaded.discard(name)


def _init_rope(model: EarlyExitModel, device: torch.device) -> None:
    """RoPE tables are buffers outside any state dict: build them for real on the device."""
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()


def check_loaded(stage: StageModel) -> None:
    """No tensor a stage runs may still be on the meta device (an internal error if one is)."""
    used: list[torch.nn.Module] = list(stage.model.exits.values())
    backbone = stage.model.backbone
    used += [backbone.layers[i] for i in stage.plan.layer_indices]
    if stage.plan.is_first:
        used.append(backbone.tok_embeddings)
    for module in used:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                raise EetuneError(f"internal error: stage {stage.plan.stage} kept {name} on the meta device")
