"""How the `Trainer` is spread over processes: one plain process here, a device mesh in `eetune.parallel`.

The Trainer runs one loop; wherever processes would differ it asks its strategy: which rows of a
global micro-batch are this process's, the frozen backbone's states, the sum of per-process metric
sums, gradient clipping over every shard, held-out scoring, the resumable state and the tuned
exits on disk, and whether this process is the one that logs and writes.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional, Protocol

import torch

from eetune.eval.heldout import ExitQuality, heldout_quality
from eetune.exits import EarlyExitModel, build_manifest, save_exits
from eetune.models import BaseModel, base_info
from eetune.train.losses import VocabShard
from eetune.train.state import TrainerState, load_state, refuse_mesh_state, save_state


class Strategy(Protocol):
    device: torch.device
    is_main: bool  # logs, prints and writes the run dir's shared files
    vocab_shard: Optional[VocabShard]  # where this process's rows of vocabulary-parallel heads start

    def describe(self) -> str:
        """Where the run happens, for messages ("" for one process)."""

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's rows of a global micro-batch, on its device."""

    def backbone_states(self, model: EarlyExitModel, tokens: torch.Tensor, layers: list[int], final: bool,
                        heldout: bool = False) -> dict[str, torch.Tensor]:
        """The frozen backbone's outputs at this process's `layers` (keys "8", ...) and "final"."""

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-process metric sums summed over every process holding other rows or exits (in place)."""

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip to a global gradient norm of `max_norm`; the norm before clipping."""

    def heldout_quality(self, model: EarlyExitModel, sequences: torch.Tensor,
                        autocast: Callable[[], ContextManager]) -> dict[int, ExitQuality]:
        """Held-out CE (and agreement with the final layer) of every exit of the run."""

    def save_state(self, run_dir, model: EarlyExitModel, optimizer, payload: dict[str, Any]) -> None:
        """Write the resumable state: exits, optimizer, and `payload` (step, scheduler, data, rng, extra)."""

    def load_state(self, run_dir, model: EarlyExitModel, optimizer) -> dict[str, Any]:
        """Restore exits and optimizer from the resumable state; the saved `payload`."""

    def run_summary(self) -> dict[str, Any]:
        """What the manifest's `tune` entry records about where the run happened ({} for one process)."""

    def write_exits(self, run_dir, model: EarlyExitModel, base: BaseModel, summary: dict[str, Any]) -> None:
        """Write the tuned exits and manifest (its `tune` entry: `summary`) as a single process does."""

    def barrier(self) -> None:
        """Wait for every process."""


def backbone_states(model: EarlyExitModel, tokens: torch.Tensor, layers: list[int], final: bool) -> dict[str, torch.Tensor]:
    """One no-grad pass of the whole backbone: outputs at `layers` and, with `final`, the final normed state."""
    depths = layers + ([model.num_layers] if final else [])
    with torch.no_grad():
        hidden = model.hidden_states(tokens, depths)
        states = {str(layer): hidden[layer] for layer in layers}
        if final:
            states["final"] = model.backbone.norm(hidden[model.num_layers])
    return states


class SingleProcess:
    """The whole run in this process, on `device`."""

    is_main = True
    vocab_shard = None

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def describe(self) -> str:
        return ""

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) if key != "indices" else value for key, value in batch.items()}

    def backbone_states(self, model: EarlyExitModel, tokens: torch.Tensor, layers: list[int], final: bool,
                        heldout: bool = False) -> dict[str, torch.Tensor]:
        return backbone_states(model, tokens, layers, final)

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def heldout_quality(self, model: EarlyExitModel, sequences: torch.Tensor,
                        autocast: Callable[[], ContextManager]) -> dict[int, ExitQuality]:
        with autocast():
            return heldout_quality(model, sequences)

    def save_state(self, run_dir, model: EarlyExitModel, optimizer, payload: dict[str, Any]) -> None:
        save_state(run_dir, TrainerState(exits=model.exits.state_dict(), optimizer=optimizer.state_dict(), **payload))

    def load_state(self, run_dir, model: EarlyExitModel, optimizer) -> dict[str, Any]:
        refuse_mesh_state(run_dir)
        state = load_state(run_dir)
        model.exits.load_state_dict(state.exits)
        optimizer.load_state_dict(state.optimizer)
        return {"step": state.step, "scheduler": state.scheduler, "data": state.data, "rng": state.rng,
                "extra": state.extra}

    def run_summary(self) -> dict[str, Any]:
        return {}

    def write_exits(self, run_dir, model: EarlyExitModel, base: BaseModel, summary: dict[str, Any]) -> None:
        save_exits(run_dir, model, build_manifest(model, base_info(base), stage="tune", extra={"tune": summary}))

    def barrier(self) -> None:
        pass

