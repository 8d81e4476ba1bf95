"""Early exits: specs, modules, the EarlyExitModel wrapper and exit checkpoints."""

from eetune.exits.checkpoint import EXITS_FILE, MANIFEST_FILE, build_manifest, load_exits, read_manifest, save_exits
from eetune.exits.model import EarlyExitModel
from eetune.exits.archs import ExitArch, build_exit, exit_arch_names, get_exit_arch, register_exit_arch
from eetune.exits.modules import ConfidenceEstimator, EarlyExit, head_logits, head_rows, lm_head_weight
from eetune.exits.spec import ARCHS, HEADS, INITS, ExitSpec, check_specs, exit_specs

__all__ = [
    "ARCHS", "ConfidenceEstimator", "EXITS_FILE", "HEADS", "INITS", "MANIFEST_FILE", "EarlyExit", "EarlyExitModel", "ExitArch",
    "ExitSpec", "build_exit", "build_manifest", "check_specs", "exit_arch_names", "exit_specs", "get_exit_arch",
    "head_logits", "head_rows", "lm_head_weight", "load_exits", "read_manifest", "register_exit_arch", "save_exits",
]
