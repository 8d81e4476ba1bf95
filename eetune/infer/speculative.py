"""Self-speculative decoding (LayerSkip) and its acceptance step.

`decode_self_speculative`: draft k tokens with layers 1..L and the exit at L (writing the same
layers-1..L cache the full model uses), then one verify forward: the last draft through
layers 1..L and all k + 1 positions from their layer-L states through layers L+1..N.
Rejected positions are forgotten by rewinding the position counter (nothing is copied).
Drafting may use only the most frequent tokens (FR-Spec, `draft_vocab`) and stop early where
the drafting exit's estimator doubts a draft (`draft_confidence`).

The acceptance step (Leviathan et al. 2023, Chen et al. 2023):

Given k drafted tokens, the draft distributions they were sampled from and the target
(full-model) distributions at the same k + 1 positions, emit the longest accepted prefix
plus one token from the target side. The emitted sequence is distributed exactly as if
every token had been sampled from the target model; with one-hot (greedy) distributions it
reduces to "accept while the draft equals the target's argmax, then the target's argmax".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eetune.infer.draft_schedule import DraftSchedule
from eetune.infer.generate import layer_forward
from eetune.infer.picker import Picker
from eetune.infer.policy import POLICIES
from eetune.infer.sampling import SamplingParams, TokenLogprob, probabilities, token_logprobs
from eetune.infer.settings import DecodeResult, DecodeSettings

if TYPE_CHECKING:
    from eetune.infer.engine import Engine


def accept_greedy(draft: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """draft [k] token ids, target_logits [k + 1, vocab] -> (accepted count, next token)."""
    target = target_logits.argmax(-1)
    agree = (draft == target[: draft.shape[0]]).long()
    # cumprod turns the first disagreement and everything after it into zeros.
    accepted = int(agree.cumprod(0).sum()) if draft.numel() else 0
    return accepted, int(target[accepted])


def accept_sampled(
    draft: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    rng: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling.

    draft [k] ids sampled from draft_probs [k, vocab]; target_probs [k + 1, vocab].
    Token i is kept with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected one is
    replaced by a sample of normalise(max(p_i - q_i, 0)); if all k are kept, one more token
    is sampled from p_k. Returns (accepted count, the token emitted after them).
    """
    k = draft.shape[0]
    if k:
        # One uniform per draft, drawn up front so the RNG stream does not depend on where
        # the first rejection falls (reproducible for a given seed either way).
        u = torch.rand(k, generator=rng, device=draft.device)
        rows = torch.arange(k, device=draft.device)
        p = target_probs[rows, draft]
        q = draft_probs[rows, draft]
        rejected = (u * q >= p).nonzero()  # u >= p / q without dividing by q
        if rejected.numel():
            i = int(rejected[0, 0])
            residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
            mass = residual.sum()
            # p == q up to rounding leaves no residual mass; then p itself is the right law.
            dist = residual / mass if mass > 0 else target_probs[i]
            return i, int(torch.multinomial(dist, 1, generator=rng))
    return k, int(torch.multinomial(target_probs[k], 1, generator=rng))


def decode_self_speculative(
    engine: Engine,
    prompt: list[int],
    s: DecodeSettings,
    params: SamplingParams,
    on_token: Callable[[int, int], bool | None] | None,
    on_logprob: Callable[[TokenLogprob], None] | None = None,
) -> DecodeResult:
    n_layers = engine.num_layers
    draft_layer = s.draft_exit if s.draft_exit is not None else engine.model.exit_layers[-1]
    layer_exit = draft_layer in engine._layer_exits
    draft_head = None if s.draft_vocab is None else engine._draft_head(draft_layer, s.draft_vocab)
    schedule = draft_schedule(engine, s, draft_layer)
    caches = engine._caches_for(1, len(prompt) + s.max_new_tokens)
    caches.set_padding([0])
    gen = caches.gen
    device = gen.device
    picker = Picker(s, params, 1, engine.vocab_size, device, on_logprob)
    rng = picker.rng
    row = torch.zeros(1, dtype=torch.long, device=device)
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
        h = engine._prefill(caches, torch.tensor([prompt], device=device), fill)
        first = int(picker.choose(engine._final_logits(caches, h[:, -1]), row)[0])
        done = emit(first, n_layers)
        layer_calls = n_layers
        t1 = time.perf_counter()
        pos = len(prompt)  # where out[-1], not yet fed, goes
        while not done:
            k = schedule.next_length(s.max_new_tokens - len(out) - 1)
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
                hidden = engine._exit_hidden(caches, draft_layer, h, span)
                if s.draft_confidence is not None and _doubts(engine, draft_layer, hidden, s.draft_confidence):
                    # The exit's estimator doubts this draft: verify the drafts so far now.
                    doubted = True
                    break
                token, q = pick_draft(picker, draft_logits(engine, draft_layer, hidden, draft_head), seen, draft_head,
                                      engine.vocab_size)
                if q is not None:
                    draft_probs.append(q)
                draft_ids.append(token[:, 0])
            k = len(draft_ids)
            if not doubted:
                # The last draft through layers 1..L (a doubted step already ran it).
                span = caches.span(pos + k, 1)
                h = gen.run_layers(gen.embed(token), 0, draft_layer, span)
                if layer_exit:
                    # Its exit KV is owed to later drafts if every draft is accepted.
                    layer_forward(engine.model.exit(draft_layer).block, h, span, caches.exit_caches[draft_layer])
                states.append(h)
            # Verify: all k + 1 positions on from their layer-L states.
            h = gen.run_layers(torch.cat(states, dim=1), draft_layer, n_layers, caches.span(pos, k + 1))
            draft = torch.cat(draft_ids) if k else torch.empty(0, dtype=torch.long, device=device)
            # [k + 1, vocab]; position j penalised as if drafts[:j] were generated: lossless
            # w.r.t. the penalised distribution.
            target = picker.adjust(engine._final_logits(caches, h[0]), picker.history(0, draft))
            if params.greedy:
                n_ok, next_token = accept_greedy(draft, target)
            else:
                q_all = torch.cat(draft_probs) if k else target[:0]
                n_ok, next_token = accept_sampled(draft, q_all, probabilities(target, params), rng)
            layer_calls += k * draft_layer + n_layers
            drafted += k
            accepted += n_ok
            schedule.record(k, n_ok)
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


def draft_schedule(engine: Engine, s: DecodeSettings, layer: int) -> DraftSchedule:
    """A row's draft lengths under settings `s`, drafting at exit `layer`."""
    costs = engine._draft_costs(layer, s.draft_vocab) if s.draft_schedule == "adaptive" else None
    return DraftSchedule(s.draft_schedule, s.draft_len, costs)


def draft_logits(engine: Engine, layer: int, hidden: Tensor, draft_head: tuple[Tensor, Tensor] | None) -> Tensor:
    """Exit `layer`'s logits for hidden [n, dim]: over the whole vocabulary, or the kept ids of `draft_head`."""
    if draft_head is None:
        return engine._exit_logits(layer, hidden)
    return torch.nn.functional.linear(hidden, draft_head[1]).float()


def pick_draft(
    picker: Picker, logits: Tensor, seen: Tensor | None, draft_head: tuple[Tensor, Tensor] | None, vocab: int
) -> tuple[Tensor, Tensor | None]:
    """One row's draft token [1, 1] (a vocabulary id) from its draft logits [1, V'], with the row's
    bias and penalties (`seen`: its counts with this round's drafts, updated here); and, when
    sampling, the law it was drawn from over the whole vocabulary [1, vocab] (zero outside kept ids)."""
    kept = None if draft_head is None else draft_head[0]
    logits = picker.adjust(logits, seen, kept)
    q = None
    if picker.params.greedy:
        token = logits.argmax(-1, keepdim=True)
    else:
        q = probabilities(logits, picker.params)
        token = torch.multinomial(q, 1, generator=picker.rng)
        if kept is not None:
            q = torch.zeros(1, vocab, device=logits.device).index_copy_(1, kept, q)
    if kept is not None:
        token = kept[token]
    if seen is not None:
        seen[0, token[0, 0]] += 1
    return token, q


def _doubts(engine: Engine, layer: int, hidden: Tensor, threshold: float) -> bool:
    """Whether exit `layer`'s learned estimator puts its agreement below `threshold`."""
    return float(POLICIES["learned"].score(None, hidden, engine.model.exit(layer).confidence)) < threshold
