"""Early-exit decoding (EE-LLM) and the full model, in lock step over a batch.

A token leaves at the first exit whose confidence reaches the threshold (the policy:
eetune.infer.policy). The deeper layers still owe its KV entries; as in EE-LLM they are
computed exactly, later: the token's hidden state at its exit is kept (`_Pending`) and joins
the next token's forward at that depth, so the deeper layers run once over [pending
positions..., new position]. Pending positions are always the newest ones and older ones are
never shallower, so every such forward covers a contiguous span of positions and an ordinary
causal mask serves. A `layer` exit's block has its own cache and runs over every position that
reaches it.

Batches are left-padded; rows decode in lock step and a step goes as deep as its least
confident row needs, so every row's tokens equal its own decode. `decode_full` is the plain
full model for batch 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eetune.infer.caches import DecodeCaches
from eetune.infer.picker import Picker
from eetune.infer.sampling import SamplingParams, TokenLogprob
from eetune.infer.settings import DecodeResult, DecodeSettings

if TYPE_CHECKING:
    from eetune.infer.engine import Engine

# Left padding: any valid id; padded positions are masked out of every real query.
_PAD_ID = 0


@dataclass(slots=True)
class _Pending:
    """The newest positions whose hidden states stopped at `depth` (an exit layer): [b, n, dim]."""

    depth: int
    hidden: Tensor


def decode_full(
    engine: Engine,
    prompt: list[int],
    s: DecodeSettings,
    params: SamplingParams,
    on_token: Callable[[int, int], bool | None] | None,
    on_logprob: Callable[[TokenLogprob], None] | None = None,
) -> DecodeResult:
    n = engine.num_layers
    gen = engine._caches_for(1, len(prompt) + s.max_new_tokens).gen
    picker = Picker(s, params, 1, engine.vocab_size, gen.device, on_logprob)
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
    engine.head_calls[n] += len(out)
    decode_s = t2 - t1
    rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
    return DecodeResult(
        out, [n] * len(out), len(prompt), t1 - t0, decode_s, rate, float(n), stopped_by=stopped_by,
        logprobs=None if picker.logprobs is None else picker.logprobs[0],
    )



def early_exit_step(
    engine: Engine,
    caches: DecodeCaches,
    token: Tensor,
    pos: int,
    pending: list[_Pending],
    open_rows: Tensor,
    stops: list[int],
    s: DecodeSettings,
    picker: Picker,
) -> tuple[Tensor, Tensor]:
    """Feed token [b, 1] at `pos`; returns next tokens [b] and the layer each left at [b].

    Goes as deep as the least confident open row needs, carrying pending positions along
    from their depth; rows not open (finished) are not decided and echo `token`.
    """
    gen, n_layers = caches.gen, engine.num_layers
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
            next_tokens[rows] = picker.choose(engine._final_logits(caches, group[rows, -1]), rows)
            pending.clear()  # every position now has every layer's KV
            return next_tokens, exits
        hidden = engine._exit_hidden(caches, stop, group, span)
        fire, logits = engine._decide(stop, hidden[rows], s)
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



def decode_lockstep(
    engine: Engine,
    prompts: list[list[int]],
    s: DecodeSettings,
    params: SamplingParams,
    on_token: Callable[[int, int], bool | None] | None,
    on_logprob: Callable[[TokenLogprob], None] | None = None,
) -> list[DecodeResult]:
    b = len(prompts)
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    caches = engine._caches_for(b, width + s.max_new_tokens)
    caches.set_padding(pads)
    device = caches.gen.device
    tokens = torch.tensor([[_PAD_ID] * pad + p for pad, p in zip(pads, prompts)], dtype=torch.long, device=device)
    stops = engine._exit_stops(s)
    stop_ids = frozenset(s.stop_ids)
    picker = Picker(s, params, b, engine.vocab_size, device, on_logprob)
    out: list[list[int]] = [[] for _ in range(b)]
    exit_layers: list[list[int]] = [[] for _ in range(b)]
    stopped = ["length"] * b
    open_rows = torch.ones(b, dtype=torch.bool, device=device)
    pending: list[_Pending] = []

    with torch.inference_mode():
        t0 = time.perf_counter()
        if width > 1:
            # The last prompt token is decoded like any other: it may exit early too.
            engine._prefill(caches, tokens[:, :-1], [layer for layer in stops if layer in engine._layer_exits])
        token, pos, t1 = tokens[:, -1:], width - 1, 0.0
        for step in range(s.max_new_tokens):
            next_tokens, exits = early_exit_step(engine, caches, token, pos, pending, open_rows, stops, s, picker)
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

# -- engine-speculative ---------------------------------------------------------------------
