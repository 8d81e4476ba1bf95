"""Loading a frozen base model: torchtune decoder + tokenizer + identity, from a local HF dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.models import hf_config as hfc
from eetune.models.cache import default_smollm2_dir
from eetune.models.checkpoint import find_safetensors, load_tune_state_dict
from eetune.models.fingerprint import fingerprint
from eetune.models.registry import DEFAULT_MODEL, ModelEntry, ModelFamily, get_model_entry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class BaseModel:
    """A frozen pretrained decoder with everything later stages need to know about it."""

    name: str  # registry name
    model: TransformerDecoder  # eval mode, no parameter requires grad
    tokenizer: PreTrainedTokenizerBase | None  # None only for synthetic test models
    checkpoint_dir: Path
    hf_config: dict[str, Any]
    fingerprint: str  # eetune.models.fingerprint.fingerprint of model.state_dict()

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def entry(self) -> ModelEntry:
        return get_model_entry(self.name)

    @property
    def family(self) -> ModelFamily:
        return self.entry.family

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype


def native_dtype(device: str) -> str:
    """What `model.dtype=auto` means on `device`: bfloat16 where it computes bf16 natively (CUDA
    GPUs with bf16, CPUs with AVX-512 BF16 or AMX), else float32. On AVX2-only CPUs torch's bf16
    matmuls cost grows with every row and rounds enough to change greedy replies."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    try:
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return "float32"


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise EetuneError(f"unsupported model dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_checkpoint_dir(entry: ModelEntry, checkpoint_dir: str | Path | None) -> Path:
    if checkpoint_dir is None:
        if entry.name != DEFAULT_MODEL:
            raise EetuneError(
                f"model.checkpoint_dir is required for {entry.name} (a local Hugging Face checkpoint "
                f"dir, e.g. a download of {entry.hf_repo}); only {DEFAULT_MODEL} is bundled"
            )
        return default_smollm2_dir()
    path = Path(checkpoint_dir).expanduser()
    if not path.is_dir():
        raise EetuneError(
            f"model.checkpoint_dir {path} is not a directory; point it at a local Hugging Face "
            "checkpoint dir (config.json + *.safetensors)"
        )
    return path


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def materialise(
    family: ModelFamily,
    hf_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    max_seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> TransformerDecoder:
    """Build the decoder on the meta device and adopt ``state_dict``'s tensors.

    No randomly initialised copy of the weights is ever allocated: what 13B+ models need.
    """
    kwargs = family.decoder_kwargs(hf_config, max_seq_len)
    with torch.device("meta"):
        model = family.builder(**kwargs)
    tensors = {name: t.to(device=device, dtype=dtype) for name, t in state_dict.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise EetuneError(
            f"the checkpoint's weights do not fit its config.json as a {family.name} model: "
            f"{_one_line(str(exc))}"
        ) from exc
    # RoPE tables are buffers outside the state dict: build them for real now.
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise EetuneError(f"internal error: the {family.name} model kept meta tensors after loading")
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(checkpoint_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a missing tokenizer
        raise EetuneError(
            f"no usable tokenizer in {checkpoint_dir} ({_one_line(str(exc), 200)}); copy tokenizer.json "
            "and tokenizer_config.json from the original model into it"
        ) from exc


def load_base_model(
    name: str,
    *,
    checkpoint_dir: str | Path | None = None,
    dtype: str = "float32",
    max_seq_len: int | None = None,
    device: str = "cpu",
) -> BaseModel:
    """Load registered model ``name`` from a local HF checkpoint dir, frozen, in ``dtype``.

    ``checkpoint_dir=None`` uses the bundled SmolLM2 (``smollm2_135m`` only). The architecture
    comes from the dir's config.json, so any size of the named model's family loads.
    ``max_seq_len=None`` uses the checkpoint's ``max_position_embeddings``. The keywords are a
    ``model:`` config section's fields, so ``load_base_model(**vars(cfg.model))`` loads what it names.
    """
    entry = get_model_entry(name)
    torch_dtype = parse_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise EetuneError(f"invalid device {device!r}; use e.g. 'cpu' or 'cuda:0'") from exc
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EetuneError(f"device {device!r} requested but CUDA is not available here; use device=cpu")
    path = resolve_checkpoint_dir(entry, checkpoint_dir)
    config = hfc.read_hf_config(path)
    seq_len = int(max_seq_len or config.get("max_position_embeddings") or 4096)
    try:
        # Cheap checks first: a wrong config or a missing tokenizer fails before reading weights.
        entry.family.decoder_kwargs(config, seq_len)
        find_safetensors(path)
        tokenizer = load_tokenizer(path)
        state_dict = load_tune_state_dict(entry.family, path, config)
        model = materialise(entry.family, config, state_dict, seq_len, torch_dtype, torch_device)
    except EetuneError as exc:
        raise EetuneError(f"cannot load {path} as {entry.name}: {exc}") from exc
    del state_dict
    return BaseModel(
        name=entry.name,
        model=model,
        tokenizer=tokenizer,
        checkpoint_dir=path,
        hf_config=config,
        fingerprint=fingerprint(model.state_dict()),
    )


def base_info(base: BaseModel) -> dict[str, Any]:
    """How a manifest names the base model."""
    return {
        "name": base.name,
        "fingerprint": base.fingerprint,
        "num_layers": base.num_layers,
        "checkpoint_dir": str(base.checkpoint_dir),
    }
