"""Early-exit decoding on an EarlyExitModel: `full`, `early_exit` (EE-LLM) and `self_speculative` (LayerSkip).

Everything runs on eetune.infer.generate's layer-by-layer pieces and position-indexed caches:

- full: the existing `Generator.generate` (batch 1) or the lock-step loop below with no exits.
- early_exit: a token leaves at the first exit whose confidence reaches the threshold. The
  deeper layers still owe its KV entries; as in EE-LLM they are computed exactly, later: the
  token's hidden state at its exit is kept (`_Pending`) and joins the next token's forward
  at that depth, so the deeper layers run once over [pending positions..., new position].
  Pending positions are always the newest ones and older ones are never shallower, so every
  such forward covers a contiguous span of positions and an ordinary causal mask serves.
  A `layer` exit's block has its own cache and runs over every position that reaches it.
- self_speculative: draft k tokens with layers 1..L and the exit at L (writing the same
  layers-1..L cache the full model uses), then one verify forward: the last draft through
  layers 1..L and all k + 1 positions from their layer-L states through layers L+1..N.
  Rejected positions are forgotten by rewinding the position counter (nothing is copied).

Batches (`generate_batch`) are left-padded; rows decode in lock step and a step goes as deep
as its least confident row needs, so every row's tokens equal its own `generate`.

Every mode picks tokens the same way (`_Picker`): logit bias and presence/frequency penalties
over the row's generated tokens, then greedy or sampling; the logprobs it reports are of that
adjusted distribution, before temperature.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eetune.errors import EetuneError
from eetune.exits.model import EarlyExitModel
from eetune.exits.modules import LayerExit
from eetune.infer.generate import Generator, Span, _check_request_length, layer_forward
from eetune.infer.kv_cache import LayerKVCache
from eetune.infer.sampling import (
    SamplingParams,
    TokenLogprob,
    adjust,
    bias_vector,
    make_rng,
    probabilities,
    sample,
    token_logprobs,
)
from eetune.infer.speculative import accept_greedy, accept_sampled

MODES = ("full", "early_exit", "self_speculative")
CONFIDENCES = ("max_prob", "learned")
# Left padding: any valid id; padded positions are masked out of every real query.
_PAD_ID = 0


@dataclass
class DecodeSettings:
    mode: str = "full"  # full | early_exit | self_speculative
    threshold: float = 1.0  # early_exit: exit at the first exit with confidence >= threshold; 1.0 == full
    # max_prob: max softmax prob of the exit head | learned: sigmoid of the exit's estimator (head only where it fires)
    confidence: str = "max_prob"
    draft_exit: int | None = None  # self_speculative: exit layer used for drafting (default: the deepest exit)
    draft_len: int = 4  # self_speculative: tokens drafted per verify forward (k)
    # self_speculative: draft over only the N most frequent tokens (FR-Spec): the draft head
    # streams N rows instead of the whole vocabulary; verification with the full head keeps the
    # output exact. None drafts over the whole vocabulary. Needs the engine's `token_order`.
    draft_vocab: int | None = None
    # self_speculative: stop a draft early where the drafting exit's learned estimator puts its
    # agreement with the full model below this (adaptive draft length). None: always draft_len.
    draft_confidence: float | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    # Subtracted from the logits of tokens already generated (x 1 / x their count), and a
    # bias added per token id; applied before temperature in every mode, greedy included.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    # Report each token's log-probability and the `logprobs` most likely ones (None: none).
    logprobs: int | None = None


# The fields of DecodeSettings that say how to use the exits; the generate and serve configs,
# serve's per-request options and eval's sweep settings name them the same.
EXIT_FIELDS = ("mode", "threshold", "confidence", "draft_exit", "draft_len", "draft_vocab", "draft_confidence")


def exit_settings(source: Any, **rest: Any) -> DecodeSettings:
    """DecodeSettings with the EXIT_FIELDS `source` has (a config section, request options, ...)
    and everything else from `rest`, which also wins over `source`."""
    fields = {name: getattr(source, name) for name in EXIT_FIELDS if hasattr(source, name)}
    return DecodeSettings(**{**fields, **rest})


@dataclass
class DecodeResult:
    """One finished request. `tokens` are the new tokens only, a final stop token included.

    exit_layers[i] is the layer token i left at: num_layers for the full model; in
    self_speculative, L for an accepted draft token and num_layers for the verifier's own.
    mean_layers counts backbone layer calls per generated token (a call over several
    positions counts once: decoding streams each layer's weights once per call).
    """

    tokens: list[int]
    exit_layers: list[int]
    prompt_len: int
    prefill_s: float  # prompt forward + first token: time to first token
    decode_s: float  # every later token
    tokens_per_s: float  # decode only: (len(tokens) - 1) / decode_s
    mean_layers: float
    draft_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float | None = None
    stopped_by: str = "length"  # eos | length | callback (on_token returned True)
    # One per token when settings.logprobs is set: from the distribution the token was
    # chosen from (its exit's head; the full model's for self_speculative), after logit bias
    # and penalties, before temperature.
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class _Pending:
    """The newest positions whose hidden states stopped at `depth` (an exit layer): [b, n, dim]."""

    depth: int
    hidden: Tensor


class _Picker:
    """One request's token choice, row by row: sampling params, RNG, logit bias, the tokens each
    row generated so far (for penalties) and the log-probabilities of the chosen tokens.

    `choose` picks for some rows and stages their logprobs; `record` makes a row's pick part
    of its history. The early-exit confidence decision never sees these adjustments.
    """

    def __init__(
        self,
        s: DecodeSettings,
        params: SamplingParams,
        rows: int,
        vocab: int,
        device: torch.device,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> None:
        self.params = params
        self.on_logprob = on_logprob  # told of each recorded entry (batch 1 streaming)
        self.rng = None if params.greedy else make_rng(s.seed, device)
        self.bias = bias_vector(params, vocab, device)
        self.counts = torch.zeros(rows, vocab, device=device) if params.penalised else None
        self.top = s.logprobs
        self.logprobs: list[list[TokenLogprob]] | None = None if s.logprobs is None else [[] for _ in range(rows)]
        self._staged: dict[int, TokenLogprob] = {}

    def adjust(self, logits: Tensor, counts: Tensor | None, ids: Tensor | None = None) -> Tensor:
        """Bias and penalties on logits [n, vocab] (or over the token ids `ids` only) given counts [n, vocab]."""
        bias = self.bias
        if ids is not None:
            bias = None if bias is None else bias[ids]
            counts = None if counts is None else counts[:, ids]
        return adjust(logits, self.params, bias, counts)

    def choose(self, logits: Tensor, rows: Tensor) -> Tensor:
        """Tokens [len(rows)] for rows `rows` from their logits [len(rows), vocab]."""
        logits = self.adjust(logits, None if self.counts is None else self.counts[rows])
        tokens = sample(logits, self.params, self.rng)
        if self.top is not None:
            for row, entry in zip(rows.tolist(), token_logprobs(logits, tokens, self.top)):
                self._staged[row] = entry
        return tokens

    def record(self, row: int, token: int, logprob: TokenLogprob | None = None) -> TokenLogprob | None:
        """Token `token` is row `row`'s next; returns its logprob entry (the staged one unless given)."""
        if self.counts is not None:
            self.counts[row, token] += 1
        if self.logprobs is None:
            return None
        entry = logprob if logprob is not None else self._staged.pop(row)
        self.logprobs[row].append(entry)
        if self.on_logprob is not None:
            self.on_logprob(entry)
        return entry

    def history(self, row: int, drafts: Tensor) -> Tensor | None:
        """Counts [k + 1, vocab] at the positions of drafts [k] and the one after: position j
        has also generated drafts[:j]. None without penalties."""
        if self.counts is None:
            return None
        k, vocab = drafts.shape[0], self.counts.shape[1]
        seen = torch.zeros(k + 1, vocab, device=self.counts.device)
        if k:
            seen[1:] = torch.nn.functional.one_hot(drafts, vocab).float().cumsum(0)
        return self.counts[row] + seen


class DecodeCaches:
    """KV caches for one batch size: the backbone's (inside `gen`) and each `layer` exit's own."""

    def __init__(self, model: EarlyExitModel, batch_size: int, max_seq_len: int) -> None:
        self.gen = Generator(model.backbone, max_seq_len=max_seq_len, batch_size=batch_size)
        weight = model.backbone.tok_embeddings.weight
        self.exit_caches: dict[int, LayerKVCache] = {}
        for layer in model.exit_layers:
            exit_module = model.exit(layer)
            if isinstance(exit_module, LayerExit):
                attn = exit_module.block.attn
                self.exit_caches[layer] = LayerKVCache(
                    batch_size, attn.num_kv_heads, max_seq_len, attn.head_dim, dtype=weight.dtype, device=weight.device
                )
        self._positions = torch.arange(max_seq_len, device=weight.device)
        self.key_ok: Tensor | None = None  # [b, max_seq_len], False at left padding; None: no padding

    @property
    def max_seq_len(self) -> int:
        return self.gen.max_seq_len

    @property
    def batch_size(self) -> int:
        return self.gen.batch_size

    def set_padding(self, pads: Sequence[int]) -> None:
        if not any(pads):
            self.key_ok = None
            return
        pad = torch.tensor(list(pads), device=self._positions.device)
        self.key_ok = self._positions[None, :] >= pad[:, None]

    def span(self, start: int, length: int) -> Span:
        span = self.gen.span(start, length)
        if self.key_ok is None:
            return span
        end = start + length
        keys = self._positions[:end]
        query = span.input_pos[:, None]
        allowed = (keys <= query) & self.key_ok[:, None, None, :end]  # [b, 1, length, end]
        # A padded query keeps its own key: a row with nothing to attend to would be NaN and
        # poison the deeper layers' values (0 * NaN) even where it is masked out.
        allowed |= keys == query
        return Span(start, length, span.input_pos, allowed)


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
        self._layer_exits = {layer for layer in model.exit_layers if isinstance(model.exit(layer), LayerExit)}
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
            return self._self_speculative(prompt, settings, params, on_token, on_logprob)
        if not self._exit_stops(settings):
            return self._full(prompt, settings, params, on_token, on_logprob)
        return self._lockstep([prompt], settings, params, on_token, on_logprob)[0]

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
        return self._lockstep(rows, settings, params, None)

    def caches(self, batch_size: int = 1) -> DecodeCaches:
        """The caches the last request of this batch size used (for inspection and tests)."""
        if batch_size not in self._caches:
            raise EetuneError(f"no request of batch size {batch_size} has run on this engine yet")
        return self._caches[batch_size]

    # -- checks ---------------------------------------------------------------------------

    def _check_settings(self, s: DecodeSettings) -> SamplingParams:
        model = self.model
        if s.mode not in MODES:
            raise EetuneError(f"unknown decoding mode {s.mode!r}: choose one of {', '.join(MODES)}")
        if not (isinstance(s.threshold, (int, float)) and 0.0 < s.threshold <= 1.0):
            raise EetuneError(f"threshold must be in (0, 1] (1.0 = never exit early), got {s.threshold}")
        if s.confidence not in CONFIDENCES:
            raise EetuneError(f"unknown confidence {s.confidence!r}: choose one of {', '.join(CONFIDENCES)}")
        if s.draft_len < 1:
            raise EetuneError(f"draft_len must be >= 1, got {s.draft_len}")
        if s.draft_vocab is not None:
            if self.token_order is None:
                raise EetuneError(
                    "draft_vocab needs token frequencies: this engine was built without a token_order "
                    "(tune writes one to the run dir as draft_vocab.safetensors)"
                )
            if s.draft_vocab < 1:
                raise EetuneError(f"draft_vocab must be >= 1 token, got {s.draft_vocab}")
        if s.draft_confidence is not None:
            if not 0.0 < s.draft_confidence <= 1.0:
                raise EetuneError(f"draft_confidence must be in (0, 1], got {s.draft_confidence}")
            layer = s.draft_exit if s.draft_exit is not None else (model.exit_layers or [None])[-1]
            if layer in model.exit_layers and model.exit(layer).confidence is None:
                raise EetuneError(
                    f"draft_confidence needs a learned confidence estimator on the drafting exit {layer} "
                    "(tune with exits.confidence=linear|mlp)"
                )
        if s.draft_exit is not None and s.draft_exit not in model.exit_layers:
            raise EetuneError(
                f"draft_exit {s.draft_exit} is not an exit of this model; exits are at {model.exit_layers}"
            )
        if s.mode != "full" and not model.exit_layers:
            raise EetuneError(f"mode {s.mode!r} needs a model with exits; this one has none")
        if s.mode == "early_exit" and s.confidence == "learned":
            missing = [layer for layer in model.exit_layers if model.exit(layer).confidence is None]
            if missing:
                raise EetuneError(
                    f"confidence 'learned' needs a confidence estimator on every exit; exit(s) {missing} have none "
                    "(tune exits with exits.confidence=linear|mlp, or use confidence 'max_prob')"
                )
        if s.logprobs is not None and s.logprobs < 0:
            raise EetuneError(f"logprobs must be >= 0 (top tokens per position) or unset, got {s.logprobs}")
        bias = tuple(sorted((int(token), float(value)) for token, value in (s.logit_bias or {}).items()))
        if bias and not all(0 <= token < self.vocab_size for token, _ in bias):
            raise EetuneError(f"logit_bias token ids must be in [0, {self.vocab_size}), the model's vocabulary")
        return SamplingParams(s.temperature, s.top_k, s.top_p, s.presence_penalty, s.frequency_penalty, bias)

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
        """Exits a token may leave at; none when nothing can exit (threshold 1.0 is the full model)."""
        if s.mode != "early_exit" or s.threshold >= 1.0:
            return []
        return self.model.exit_layers

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
        if isinstance(exit_module, LayerExit):
            # Every position in the group owes this block's cache its KV, not just the newest.
            h = layer_forward(exit_module.block, group, span, caches.exit_caches[layer])
            return exit_module.norm(h[:, -1])
        return exit_module(group[:, -1])

    def _exit_logits(self, layer: int, hidden: Tensor) -> Tensor:
        self.head_calls[layer] += hidden.shape[0]
        return torch.nn.functional.linear(hidden, self.model.head_weight(layer)).float()

    def _doubts(self, layer: int, hidden: Tensor, threshold: float) -> bool:
        """Whether exit `layer`'s learned estimator puts its agreement below `threshold`."""
        return float(torch.sigmoid(self.model.exit(layer).confidence(hidden).float())) < threshold

    def _draft_head(self, layer: int, size: int) -> tuple[Tensor, Tensor]:
        """(kept token ids [n], their rows of exit `layer`'s head [n, dim]) for FR-Spec drafting."""
        key = (layer, size)
        if key not in self._draft_heads:
            ids = self.token_order[:size]
            self._draft_heads[key] = (ids, self.model.head_weight(layer)[ids].contiguous())
        return self._draft_heads[key]

    def _final_logits(self, caches: DecodeCaches, h: Tensor) -> Tensor:
        self.head_calls[self.num_layers] += math.prod(h.shape[:-1])
        return caches.gen.final_logits(h)

    def _decide(self, layer: int, hidden: Tensor, s: DecodeSettings) -> tuple[Tensor, Tensor | None]:
        """Which rows of hidden [r, dim] are confident at exit `layer`, and their logits [fired, vocab]."""
        if s.confidence == "learned":
            estimator = self.model.exit(layer).confidence
            fire = torch.sigmoid(estimator(hidden).float()) >= s.threshold
            # The head runs only for tokens that leave here: that is the estimator's point.
            return fire, (self._exit_logits(layer, hidden[fire]) if bool(fire.any()) else None)
        logits = self._exit_logits(layer, hidden)
        max_prob = (logits.amax(-1) - logits.logsumexp(-1)).exp()
        fire = max_prob >= s.threshold
        return fire, (logits[fire] if bool(fire.any()) else None)

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

    # -- full, batch 1 ----------------------------------------------------------------------

    def _full(
        self,
        prompt: list[int],
        s: DecodeSettings,
        params: SamplingParams,
        on_token: Callable[[int, int], bool | None] | None,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> DecodeResult:
        n = self.num_layers
        gen = self._caches_for(1, len(prompt) + s.max_new_tokens).gen
        picker = _Picker(s, params, 1, self.vocab_size, gen.device, on_logprob)
        row = torch.zeros(1, dtype=torch.long, device=gen.device)
        stop_ids = frozenset(s.stop_ids)
        out: list[int] = []
        stopped_by = "length"
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = gen.prefill(prompt)
            t1 = 0.0
            while True:
                token = int(picker.choose(logits, row)[0])
                picker.record(0, token)
                out.append(token)
                if len(out) == 1:
                    t1 = time.perf_counter()
                halted = on_token is not None and bool(on_token(token, n))
                if token in stop_ids or halted or len(out) == s.max_new_tokens:
                    stopped_by = "eos" if token in stop_ids else "callback" if halted else "length"
                    break
                logits = gen.decode_step(token)
            t2 = time.perf_counter()
        self.head_calls[n] += len(out)
        decode_s = t2 - t1
        rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
        return DecodeResult(
            out, [n] * len(out), len(prompt), t1 - t0, decode_s, rate, float(n), stopped_by=stopped_by,
            logprobs=None if picker.logprobs is None else picker.logprobs[0],
        )

    # -- early exit (and full for batches), lock step -----------------------------------------

    def _early_exit_step(
        self,
        caches: DecodeCaches,
        token: Tensor,
        pos: int,
        pending: list[_Pending],
        open_rows: Tensor,
        stops: list[int],
        s: DecodeSettings,
        picker: _Picker,
    ) -> tuple[Tensor, Tensor]:
        """Feed token [b, 1] at `pos`; returns next tokens [b] and the layer each left at [b].

        Goes as deep as the least confident open row needs, carrying pending positions along
        from their depth; rows not open (finished) are not decided and echo `token`.
        """
        gen, n_layers = caches.gen, self.num_layers
        next_tokens = token[:, 0].clone()
        exits = torch.full_like(next_tokens, n_layers)
        undecided = open_rows.clone()
        group, depth = gen.embed(token), 0
        for stop in stops + [n_layers]:
            span = caches.span(pos - group.shape[1] + 1, group.shape[1])
            group = gen.run_layers(group, depth, stop, span)
            depth = stop
            rows = undecided.nonzero().squeeze(1)
            if stop == n_layers:
                next_tokens[rows] = picker.choose(self._final_logits(caches, group[rows, -1]), rows)
                pending.clear()  # every position now has every layer's KV
                return next_tokens, exits
            hidden = self._exit_hidden(caches, stop, group, span)
            fire, logits = self._decide(stop, hidden[rows], s)
            if logits is not None:
                fired = rows[fire]
                next_tokens[fired] = picker.choose(logits, fired)
                exits[fired] = stop
                undecided[fired] = False
            joining = pending.pop() if pending and pending[-1].depth == stop else None
            if not bool(undecided.any()):
                # Stop here; the deeper layers of the whole group are owed to the next forward.
                if joining is not None:
                    group = torch.cat((joining.hidden, group), dim=1)
                pending.append(_Pending(stop, group))
                return next_tokens, exits
            if joining is not None:
                group = torch.cat((joining.hidden, group), dim=1)
        raise AssertionError("unreachable: the last stop is the final layer")

    def _lockstep(
        self,
        prompts: list[list[int]],
        s: DecodeSettings,
        params: SamplingParams,
        on_token: Callable[[int, int], bool | None] | None,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> list[DecodeResult]:
        b = len(prompts)
        width = max(len(p) for p in prompts)
        pads = [width - len(p) for p in prompts]
        caches = self._caches_for(b, width + s.max_new_tokens)
        caches.set_padding(pads)
        device = caches.gen.device
        tokens = torch.tensor([[_PAD_ID] * pad + p for pad, p in zip(pads, prompts)], dtype=torch.long, device=device)
        stops = self._exit_stops(s)
        stop_ids = frozenset(s.stop_ids)
        picker = _Picker(s, params, b, self.vocab_size, device, on_logprob)
        out: list[list[int]] = [[] for _ in range(b)]
        exit_layers: list[list[int]] = [[] for _ in range(b)]
        stopped = ["length"] * b
        open_rows = torch.ones(b, dtype=torch.bool, device=device)
        pending: list[_Pending] = []

        with torch.inference_mode():
            t0 = time.perf_counter()
            if width > 1:
                # The last prompt token is decoded like any other: it may exit early too.
                self._prefill(caches, tokens[:, :-1], [layer for layer in stops if layer in self._layer_exits])
            token, pos, t1 = tokens[:, -1:], width - 1, 0.0
            for step in range(s.max_new_tokens):
                next_tokens, exits = self._early_exit_step(
                    caches, token, pos, pending, open_rows, stops, s, picker
                )
                for r, (t, e, is_open) in enumerate(zip(next_tokens.tolist(), exits.tolist(), open_rows.tolist())):
                    if not is_open:
                        continue
                    out[r].append(t)
                    exit_layers[r].append(e)
                    picker.record(r, t)
                    if on_token is not None and on_token(t, e):
                        stopped[r] = "callback"
                        open_rows[r] = False
                    if t in stop_ids:
                        stopped[r] = "eos"
                        open_rows[r] = False
                if step == 0:
                    t1 = time.perf_counter()
                if not bool(open_rows.any()):
                    break
                token, pos = next_tokens[:, None], pos + 1
            t2 = time.perf_counter()

        results = []
        for r in range(b):
            decode_s = t2 - t1
            rate = (len(out[r]) - 1) / decode_s if len(out[r]) > 1 and decode_s > 0 else 0.0
            mean_layers = sum(exit_layers[r]) / len(exit_layers[r])
            results.append(
                DecodeResult(
                    out[r], exit_layers[r], len(prompts[r]), t1 - t0, decode_s, rate, mean_layers,
                    stopped_by=stopped[r], logprobs=None if picker.logprobs is None else picker.logprobs[r],
                )
            )
        return results

    # -- self-speculative ---------------------------------------------------------------------

    def _self_speculative(
        self,
        prompt: list[int],
        s: DecodeSettings,
        params: SamplingParams,
        on_token: Callable[[int, int], bool | None] | None,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> DecodeResult:
        n_layers = self.num_layers
        draft_layer = s.draft_exit if s.draft_exit is not None else self.model.exit_layers[-1]
        layer_exit = draft_layer in self._layer_exits
        draft_head = None if s.draft_vocab is None else self._draft_head(draft_layer, s.draft_vocab)
        caches = self._caches_for(1, len(prompt) + s.max_new_tokens)
        caches.set_padding([0])
        gen = caches.gen
        device = gen.device
        picker = _Picker(s, params, 1, self.vocab_size, device, on_logprob)
        rng = picker.rng
        row = torch.zeros(1, dtype=torch.long, device=device)
        draft_ids_kept = None if draft_head is None else draft_head[0]
        stop_ids = frozenset(s.stop_ids)
        out: list[int] = []
        exit_layers: list[int] = []
        drafted = accepted = 0
        halted = False  # on_token asked to stop

        def emit(token: int, layer: int, logprob: TokenLogprob | None = None) -> bool:
            """Record a token; True when generation must end after it."""
            nonlocal halted
            picker.record(0, token, logprob)
            out.append(token)
            exit_layers.append(layer)
            if on_token is not None and on_token(token, layer):
                halted = True
            return halted or token in stop_ids or len(out) == s.max_new_tokens

        with torch.inference_mode():
            t0 = time.perf_counter()
            fill = [draft_layer] if layer_exit else []
            h = self._prefill(caches, torch.tensor([prompt], device=device), fill)
            first = int(picker.choose(self._final_logits(caches, h[:, -1]), row)[0])
            done = emit(first, n_layers)
            layer_calls = n_layers
            t1 = time.perf_counter()
            pos = len(prompt)  # where out[-1], not yet fed, goes
            while not done:
                k = min(s.draft_len, s.max_new_tokens - len(out) - 1)
                token = torch.tensor([[out[-1]]], device=device)
                draft_ids: list[Tensor] = []
                draft_probs: list[Tensor] = []
                states: list[Tensor] = []
                doubted = False
                # Penalties see the drafts of this round as already generated.
                seen = None if picker.counts is None else picker.counts[:1].clone()
                for i in range(k):
                    span = caches.span(pos + i, 1)
                    h = gen.run_layers(gen.embed(token), 0, draft_layer, span)
                    states.append(h)
                    hidden = self._exit_hidden(caches, draft_layer, h, span)
                    if s.draft_confidence is not None and self._doubts(draft_layer, hidden, s.draft_confidence):
                        # The exit's estimator doubts this draft: verify the drafts so far now.
                        doubted = True
                        break
                    if draft_head is None:
                        logits = self._exit_logits(draft_layer, hidden)
                    else:
                        logits = torch.nn.functional.linear(hidden, draft_head[1]).float()
                    logits = picker.adjust(logits, seen, draft_ids_kept)
                    if params.greedy:
                        token = logits.argmax(-1, keepdim=True)
                    else:
                        q = probabilities(logits, params)
                        token = torch.multinomial(q, 1, generator=rng)
                        if draft_head is not None:
                            # The draft law over the whole vocabulary: zero outside the kept tokens.
                            q = torch.zeros(1, self.vocab_size, device=device).index_copy_(1, draft_head[0], q)
                        draft_probs.append(q)
                    if draft_head is not None:
                        token = draft_head[0][token]
                    draft_ids.append(token[:, 0])
                    if seen is not None:
                        seen[0, token[0, 0]] += 1
                k = len(draft_ids)
                if not doubted:
                    # The last draft through layers 1..L (a doubted step already ran it).
                    span = caches.span(pos + k, 1)
                    h = gen.run_layers(gen.embed(token), 0, draft_layer, span)
                    if layer_exit:
                        # Its exit KV is owed to later drafts if every draft is accepted.
                        layer_forward(self.model.exit(draft_layer).block, h, span, caches.exit_caches[draft_layer])
                    states.append(h)
                # Verify: all k + 1 positions on from their layer-L states.
                h = gen.run_layers(torch.cat(states, dim=1), draft_layer, n_layers, caches.span(pos, k + 1))
                draft = torch.cat(draft_ids) if k else torch.empty(0, dtype=torch.long, device=device)
                # [k + 1, vocab]; position j penalised as if drafts[:j] were generated: lossless
                # w.r.t. the penalised distribution.
                target = picker.adjust(self._final_logits(caches, h[0]), picker.history(0, draft))
                if params.greedy:
                    n_ok, next_token = accept_greedy(draft, target)
                else:
                    q_all = torch.cat(draft_probs) if k else target[:0]
                    n_ok, next_token = accept_sampled(draft, q_all, probabilities(target, params), rng)
                layer_calls += k * draft_layer + n_layers
                drafted += k
                accepted += n_ok
                emitted = torch.cat((draft[:n_ok], torch.tensor([next_token], device=device)))
                # The output is the full model's: its logprobs come from the verify pass.
                logprobs = [None] * (n_ok + 1) if picker.top is None else token_logprobs(
                    target[: n_ok + 1], emitted, picker.top)
                for t, lp in zip(draft[:n_ok].tolist(), logprobs):
                    if done := emit(t, draft_layer, lp):
                        break
                if not done:
                    done = emit(next_token, n_layers, logprobs[n_ok])
                # Positions pos..pos+n_ok now hold accepted inputs; later ones are overwritten.
                pos += n_ok + 1
            t2 = time.perf_counter()

        decode_s = t2 - t1
        rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
        return DecodeResult(
            out,
            exit_layers,
            len(prompt),
            t1 - t0,
            decode_s,
            rate,
            layer_calls / len(out),
            draft_tokens=drafted,
            accepted_tokens=accepted,
            acceptance_rate=accepted / drafted if drafted else None,
            stopped_by="eos" if out[-1] in stop_ids else "callback" if halted else "length",
            logprobs=None if picker.logprobs is None else picker.logprobs[0],
        )

