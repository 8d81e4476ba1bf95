"""Model families, the bundled default model, GGUF import and frozen base-model loading."""

from eetune.models.cache import default_smollm2_dir, eetune_home
from eetune.models.checkpoint import save_hf_checkpoint
from eetune.models.fingerprint import fingerprint
from eetune.models.gguf_import import import_gguf
from eetune.models.hf_config import num_layers, read_hf_config
from eetune.models.load import BaseModel, base_info, load_base_model, native_dtype
from eetune.models.registry import (
    DEFAULT_MODEL,
    ModelEntry,
    ModelFamily,
    build_decoder,
    get_family,
    get_model_entry,
    list_families,
    list_models,
    param_count,
)

__all__ = [
    "DEFAULT_MODEL",
    "BaseModel",
    "ModelEntry",
    "ModelFamily",
    "build_decoder",
    "default_smollm2_dir",
    "eetune_home",
    "fingerprint",
    "get_family",
    "get_model_entry",
    "import_gguf",
    "list_families",
    "list_models",
    "base_info",
    "load_base_model",
    "native_dtype",
    "num_layers",
    "param_count",
    "read_hf_config",
    "save_hf_checkpoint",
]
