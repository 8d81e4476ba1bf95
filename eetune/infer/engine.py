"""Early-exit decoding on an EarlyExitModel: `full`, `early_exit` (EE-LLM) and `self_speculative` (LayerSkip).

`Engine` holds the model and its caches, checks requests and dispatches them; the decoding
itself lives by job:

- eetune.infer.policy: when a token leaves at an exit (confidence policies, thresholds) and
  which exit settings are valid;
- eetune.infer.settings: DecodeSettings / DecodeResult;
- eetune.infer.early_exit: `full` (batch 1) and `early_exit`/batches in lock step, with
  EE-LLM's deferred KV fill;
- eetune.infer.speculative: `self_speculative` drafting and verification;
- eetune.infer.picker / caches: a request's token choice and its KV caches.

Everything runs on eetune.infer.generate's layer-by-layer pieces and position-indexed caches.
Every mode picks tokens the same way (`Picker`): logit bias and presence/frequency penalties
over the row's generated tokens, then greedy or sampling; the logprobs it reports are of that
adjusted distribution, before temperature.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from eetune.errors import EetuneError
from eetune.exits.model import EarlyExitModel
from eetune.exits.modules import head_logits, head_rows
from eetune.exits.archs import get_exit_arch
from eetune.infer.caches import DecodeCaches
from eetune.infer.draft_schedule import DraftCosts
from eetune.infer.early_exit import decode_full, decode_lockstep
from eetune.infer.generate import Span, _check_request_length, layer_forward
from eetune.infer.policy import (
    CONFIDENCES, MODES, POLICIES, check_exit_settings, exit_stops, exits_here, frequent_vocab, model_exit_rules,
)
from eetune.infer.sampling import SamplingParams, TokenLogprob
from eetune.infer.settings import EXIT_FIELDS, DecodeResult, DecodeSettings, exit_settings, sampling_params
from eetune.infer.speculative import decode_self_speculative

__all__ = [
    "CONFIDENCES", "EXIT_FIELDS", "MODES", "DecodeCaches", "DecodeResult", "DecodeSettings", "Engine", "exit_settings",
]


class Engine:
    """Decodes with an EarlyExitModel; reuses its caches across requests.

    max_seq_len None sizes caches to each request (growing as needed); an int fixes them.
    `head_calls` counts rows put through a vocabulary head, by layer (num_layers = LM head).
    """

    def __init__(
        self,
        model: EarlyExitModel,
        *,
        max_seq_len: int | None = None,
        max_batch_size: int = 1,
        token_order: Tensor | None = None,
    ) -> None:
        if not isinstance(model, EarlyExitModel):
            raise EetuneError(f"Engine needs an EarlyExitModel, got {type(model).__name__}")
        limit = model.backbone.max_seq_len
        if max_seq_len is not None and not 1 <= max_seq_len <= limit:
            raise EetuneError(f"max_seq_len must be between 1 and the model's max_seq_len {limit}, got {max_seq_len}")
        if max_batch_size < 1:
            raise EetuneError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.num_layers = model.num_layers
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.vocab_size: int = model.backbone.tok_embeddings.num_embeddings
        self.head_calls: Counter[int] = Counter()
        self._caches: dict[int, DecodeCaches] = {}
        self._layer_exits = {layer for layer in model.exit_layers if get_exit_arch(model.exit(layer).spec.arch).block}
        # Token ids, most frequent first (eetune.infer.draft_vocab): what `draft_vocab` keeps.
        self.token_order = None if token_order is None else token_order.to(torch.long).flatten()
        if self.token_order is not None and (
            self.token_order.numel() == 0 or int(self.token_order.min()) < 0
            or int(self.token_order.max()) >= self.vocab_size
        ):
            raise EetuneError(f"token_order must hold token ids in [0, {self.vocab_size})")
        self._draft_heads: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    # -- public API ---------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        settings: DecodeSettings,
        on_token: Callable[[int, int], bool | None] | None = None,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> DecodeResult:
        """Decode one prompt; on_token(token, exit_layer) streams each token as it is chosen.

        on_token returning True ends decoding after that token (stopped_by "callback"): how a
        server stops at a stop string or for a client that went away. With settings.logprobs
        set, on_logprob gets each token's logprob entry just before on_token gets the token.
        """
        params = self._check_settings(settings)
        prompt = self._check_prompt(prompt_ids)
        self._check_length(len(prompt), settings)
        if settings.max_new_tokens == 0:
            return DecodeResult([], [], len(prompt), 0.0, 0.0, 0.0, 0.0,
                                logprobs=None if settings.logprobs is None else [])
        if settings.mode == "self_speculative":
            return decode_self_speculative(self, prompt, settings, params, on_token, on_logprob)
        if not self._exit_stops(settings):
            return decode_full(self, prompt, settings, params, on_token, on_logprob)
        return decode_lockstep(self, [prompt], settings, params, on_token, on_logprob)[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], settings: DecodeSettings) -> list[DecodeResult]:
        """Decode several prompts (ragged lengths) together; `full` and `early_exit` only."""
        params = self._check_settings(settings)
        if settings.mode == "self_speculative":
            raise EetuneError("self_speculative decodes one sequence at a time: call generate() per prompt")
        if not prompts:
            raise EetuneError("generate_batch got no prompts")
        if len(prompts) > self.max_batch_size:
            raise EetuneError(
                f"batch of {len(prompts)} prompts exceeds this engine's max_batch_size {self.max_batch_size}"
            )
        rows = [self._check_prompt(p) for p in prompts]
        self._check_length(max(len(p) for p in rows), settings)
        if settings.max_new_tokens == 0:
            return [DecodeResult([], [], len(p), 0.0, 0.0, 0.0, 0.0) for p in rows]
        return decode_lockstep(self, rows, settings, params, None)

    def caches(self, batch_size: int = 1) -> DecodeCaches:
        """The caches the last request of this batch size used (for inspection and tests)."""
        if batch_size not in self._caches:
            raise EetuneError(f"no request of batch size {batch_size} has run on this engine yet")
        return self._caches[batch_size]

    # -- checks ---------------------------------------------------------------------------

    def _check_settings(self, s: DecodeSettings) -> SamplingParams:
        check_exit_settings(s, **model_exit_rules(self.model), has_token_order=self.token_order is not None)
        return sampling_params(s, self.vocab_size)

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EetuneError("the prompt is empty: give at least one token id")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise EetuneError(f"prompt token ids must be in [0, {self.vocab_size}), the model's vocabulary")
        return prompt

    def _check_length(self, prompt_len: int, s: DecodeSettings) -> None:
        if self.max_seq_len is None:
            _check_request_length(prompt_len, s.max_new_tokens, self.model.backbone.max_seq_len, "the model's")
        else:
            _check_request_length(prompt_len, s.max_new_tokens, self.max_seq_len, "this engine's")


    def _exit_stops(self, s: DecodeSettings) -> list[int]:
        """Exits a token may leave at; none when nothing can exit (threshold 1.0 is the full model;
        an exit whose own threshold is 1.0 is not checked)."""
        return list(exit_stops(s, self.model.exit_layers))

    def _caches_for(self, batch_size: int, needed: int) -> DecodeCaches:
        caches = self._caches.get(batch_size)
        if caches is None or caches.max_seq_len < needed:
            size = self.max_seq_len if self.max_seq_len is not None else needed
            caches = self._caches[batch_size] = DecodeCaches(self.model, batch_size, size)
        return caches

    # -- pieces ---------------------------------------------------------------------------

    def _exit_hidden(self, caches: DecodeCaches, layer: int, group: Tensor, span: Span) -> Tensor:
        """Exit `layer`'s normalised hidden state [b, dim] for the newest position of `group`."""
        exit_module = self.model.exit(layer)
        block = get_exit_arch(exit_module.spec.arch).block
        if block is not None:  # norm(block(h)), the block with its own KV cache
            # Every position in the group owes this block's cache its KV, not just the newest.
            h = layer_forward(exit_module.get_submodule(block), group, span, caches.exit_caches[layer])
            return exit_module.norm(h[:, -1])
        return exit_module(group[:, -1])

    def _exit_logits(self, layer: int, hidden: Tensor) -> Tensor:
        self.head_calls[layer] += hidden.shape[0]
        return head_logits(hidden, self.model.head_weight(layer)).float()

    def _draft_head(self, layer: int, size: int) -> tuple[Tensor, Tensor]:
        """(kept token ids [n], their rows of exit `layer`'s head [n, dim]) for FR-Spec drafting and
        the `frequent` confidence policy."""
        key = (layer, size)
        if key not in self._draft_heads:
            ids = self.token_order[:size]
            self._draft_heads[key] = (ids, head_rows(self.model.head_weight(layer), ids).contiguous())
        return self._draft_heads[key]

    def _draft_costs(self, layer: int, draft_vocab: int | None) -> DraftCosts:
        """Parameters a self-speculative round drafting at exit `layer` streams, by part (the
        adaptive draft schedule's cost model)."""
        backbone = self.model.backbone
        per_layer = [sum(map(_whole_numel, block.parameters())) for block in backbone.layers]
        head = self.vocab_size * backbone.tok_embeddings.embedding_dim
        # The exit's own module; a head of its own is the draft head, counted apart.
        exit_module = self.model.exit(layer)
        own_head = set() if exit_module.head is None else set(map(id, exit_module.head.parameters()))
        exit_params = sum(_whole_numel(p) for p in exit_module.parameters() if id(p) not in own_head)
        kept = self.vocab_size if draft_vocab is None else min(draft_vocab, self.vocab_size)
        return DraftCosts(
            below=sum(per_layer[:layer]),
            exit=exit_params,
            draft_head=head * kept / self.vocab_size,
            above=sum(per_layer[layer:]),
            head=head,
        )

    def _final_logits(self, caches: DecodeCaches, h: Tensor) -> Tensor:
        self.head_calls[self.num_layers] += math.prod(h.shape[:-1])
        return caches.gen.final_logits(h)

    def _decide(self, layer: int, hidden: Tensor, s: DecodeSettings) -> tuple[Tensor, Tensor | None]:
        """Which rows of hidden [r, dim] leave at exit `layer`, and their logits [fired, vocab]."""
        policy = POLICIES[s.confidence]
        estimator = self.model.exit(layer).confidence
        threshold = s.threshold if s.exit_thresholds is None else s.exit_thresholds[self.model.exit_layers.index(layer)]
        if policy.needs_token_order:  # the frequent-token head decides; the whole head runs where it fires
            _, rows = self._draft_head(layer, frequent_vocab(self.vocab_size))
            score = policy.score(torch.nn.functional.linear(hidden, rows).float(), hidden, estimator)
            fire = exits_here(score, threshold)
            return fire, (self._exit_logits(layer, hidden[fire]) if bool(fire.any()) else None)
        if policy.needs_head:
            logits = self._exit_logits(layer, hidden)
            fire = exits_here(policy.score(logits, hidden, estimator), threshold)
            return fire, (logits[fire] if bool(fire.any()) else None)
        fire = exits_here(policy.score(None, hidden, estimator), threshold)
        # The head runs only for tokens that leave here: that is the estimator's point.
        return fire, (self._exit_logits(layer, hidden[fire]) if bool(fire.any()) else None)

    def _prefill(self, caches: DecodeCaches, tokens: Tensor, fill: Sequence[int]) -> Tensor:
        """All layers over tokens [b, n] at positions 0..n-1, plus the `layer` exit blocks in `fill`."""
        span = caches.span(0, tokens.shape[1])
        gen = caches.gen
        h, depth = gen.embed(tokens), 0
        for layer in sorted(fill):
            h = gen.run_layers(h, depth, layer, span)
            depth = layer
            layer_forward(self.model.exit(layer).block, h, span, caches.exit_caches[layer])
        return gen.run_layers(h, depth, self.num_layers, span)


def _whole_numel(param: Tensor) -> int:
    """Elements of a parameter in the whole model: a tensor-parallel slice (eetune.parallel.inference_tp)
    records how many shards it is one of, so every rank costs drafts as one process would."""
    return param.numel() * getattr(param, "tp_shards", 1)
