"""EarlyExitModel: a frozen torchtune decoder plus trainable exits after chosen layers.

Layer numbering is 1-based and means "the output of layer L", as in the paper. torchtune's
`output_hidden_states=[i]` records the *input* of layer i; we never use it, so the
off-by-one lives nowhere: `run_layers(h, 0, L)` returns exactly the output of layer L.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torchtune.modules import TransformerDecoder

from eetune.exits.archs import build_exit
from eetune.exits.modules import EarlyExit, head_logits, lm_head_weight
from eetune.exits.spec import ExitSpec


class EarlyExitModel(nn.Module):
    """Backbone (frozen, run without autograd) + `exits[str(layer)]` (trainable)."""

    def __init__(self, backbone: TransformerDecoder, specs: Sequence[ExitSpec], init_std: float = 0.02) -> None:
        super().__init__()
        self.backbone = backbone
        backbone.requires_grad_(False)
        self.exits = nn.ModuleDict(
            {str(spec.layer): build_exit(spec, backbone, init_std) for spec in sorted(specs, key=lambda s: s.layer)}
        )

    @property
    def num_layers(self) -> int:
        return len(self.backbone.layers)

    @property
    def exit_layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.exits)

    @property
    def specs(self) -> list[ExitSpec]:
        return [self.exit(layer).spec for layer in self.exit_layers]

    def exit(self, layer: int) -> EarlyExit:
        return self.exits[str(layer)]

    # --- backbone pieces ---------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.tok_embeddings(tokens)

    def run_layers(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Apply backbone layers start+1..end (1-based): turns layer `start`'s output into layer `end`'s."""
        # A pipeline stage (eetune.parallel.inference_pp) runs its own layers and hands over the rest.
        pipeline = getattr(self.backbone, "layer_pipeline", None)
        with torch.no_grad():
            for index in range(start, end):
                if pipeline is None or pipeline.owns(index):
                    h = self.backbone.layers[index](h, mask=mask, input_pos=input_pos)
                if pipeline is not None:
                    h = pipeline.pass_on(h, index, end)
        return h

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own output from the last layer's output: final norm + LM head."""
        with torch.no_grad():
            return self.backbone.output(self.backbone.norm(h)).float()

    # --- exits ---------------------------------------------------------------------------

    def head_weight(self, layer: int) -> torch.Tensor:
        """The [vocab, dim] head weight exit `layer` uses (its own, or the frozen LM head)."""
        head = self.exit(layer).head
        return head.weight if head is not None else lm_head_weight(self.backbone)

    def exit_hidden(
        self,
        layer: int,
        h: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Exit `layer`'s normalised hidden state from the output of backbone layer `layer`."""
        return self.exit(layer)(h, mask=mask, input_pos=input_pos)

    def exit_logits(
        self,
        layer: int,
        h: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        hidden = self.exit_hidden(layer, h, mask=mask, input_pos=input_pos)
        return head_logits(hidden, self.head_weight(layer)).float()

    # --- whole passes --------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,
        layers: Iterable[int],
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> dict[int, torch.Tensor]:
        """Outputs of the given backbone layers (1-based), computing nothing past the deepest."""
        wanted = sorted(set(layers))
        states: dict[int, torch.Tensor] = {}
        h = self.embed(tokens)
        done = 0
        for layer in wanted:
            h = self.run_layers(h, done, layer, mask=mask, input_pos=input_pos)
            states[layer] = h
            done = layer
        return states

    def forward(
        self,
        tokens: torch.Tensor,
        exits: Optional[Iterable[int]] = None,
        *,
        include_final: bool = False,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> dict[int, torch.Tensor]:
        """Logits of the requested exits (default: all), keyed by layer.

        With `include_final`, the model's own logits are added under key `num_layers`;
        otherwise no layer deeper than the deepest requested exit runs.
        """
        wanted = self.exit_layers if exits is None else sorted(set(exits))
        unknown = [layer for layer in wanted if str(layer) not in self.exits]
        if unknown:
            raise KeyError(f"no exit at layer(s) {unknown}; exits are at {self.exit_layers}")
        depths = wanted + ([self.num_layers] if include_final else [])
        states = self.hidden_states(tokens, depths, mask=mask, input_pos=input_pos)
        logits = {
            layer: self.exit_logits(layer, states[layer], mask=mask, input_pos=input_pos) for layer in wanted
        }
        if include_final:
            logits[self.num_layers] = self.final_logits(states[self.num_layers])
        return logits

    def exit_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.exits.parameters() if p.requires_grad]
