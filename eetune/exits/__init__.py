"""Early exits: specs, modules, the EarlyExitModel wrapper and exit checkpoints."""

from eetune.exits.checkpoint import EXITS_FILE, MANIFEST_FILE, build_manifest, load_exits, read_manifest, save_exits
from eetune.exits.model import EarlyExitModel
from eetune.exits.modules import ConfidenceEstimator, EarlyExit, build_exit, lm_head_weight
from eetune.exits.spec import ARCHS, HEADS, INITS, ExitSpec, check_specs, specs_from_config

__all__ = [
    "ARCHS", "ConfidenceEstimator", "EXITS_FILE", "HEADS", "INITS", "MANIFEST_FILE", "EarlyExit", "EarlyExitModel", "ExitSpec",
    "build_exit", "build_manifest", "check_specs", "lm_head_weight", "load_exits", "read_manifest",
    "save_exits", "specs_from_config",
]
