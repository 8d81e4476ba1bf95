"""Self-speculative decoding for the rows of a continuous batch (LayerSkip, batched).

Every row drafts with the exit's layers and head and verifies with the deeper layers in the same
forwards, each at its own positions, and accepts its own prefix. A round runs as many draft
steps as its most ambitious row: row r considers only its own k_r drafts (the ones its solo
decode would make: its draft schedule's length, fewer near its token budget, fewer where the
drafting exit's estimator doubts a draft), so its tokens are its solo output. Positions a row drafted past its
k_r, like rejected drafts, are simply overwritten later (the caches are position-indexed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eetune.infer.continuous import ContinuousBatch
from eetune.infer.draft_schedule import DraftSchedule
from eetune.infer.picker import Picker
from eetune.infer.policy import POLICIES
from eetune.infer.sampling import TokenLogprob, probabilities, token_logprobs
from eetune.infer.settings import DecodeSettings
from eetune.infer.speculative import accept_greedy, accept_sampled, draft_logits, draft_schedule, pick_draft

if TYPE_CHECKING:
    from eetune.infer.engine import Engine


@dataclass(frozen=True)
class Drafting:
    """How rows draft: the exit, FR-Spec head (kept ids, their head rows), estimator cut, and the
    settings each row's own DraftSchedule (tokens per round) starts from."""

    layer: int
    head: tuple[Tensor, Tensor] | None
    confidence: float | None
    settings: DecodeSettings

    @classmethod
    def of(cls, engine: Engine, s: DecodeSettings) -> Drafting:
        layer = s.draft_exit if s.draft_exit is not None else engine.model.exit_layers[-1]
        head = None if s.draft_vocab is None else engine._draft_head(layer, s.draft_vocab)
        return cls(layer, head, s.draft_confidence, s)

    def schedule(self, engine: Engine) -> DraftSchedule:
        """A new row's draft lengths."""
        return draft_schedule(engine, self.settings, self.layer)


@dataclass
class RoundOutput:
    """One row's round: the tokens it emits (accepted drafts, then the verifier's), the layer each
    left at, their logprob entries (None unless asked for), and how many it drafted and kept."""

    tokens: list[int]
    layers: list[int]
    logprobs: list[TokenLogprob | None]
    drafted: int
    accepted: int


@torch.inference_mode()
def speculative_round(
    engine: Engine,
    batch: ContinuousBatch,
    inputs: list[int],
    budgets: list[int],
    pickers: list[Picker],
    schedules: list[DraftSchedule],
    d: Drafting,
) -> list[RoundOutput]:
    """Row r feeds inputs[r] (its newest token) and may emit up to budgets[r] tokens, drafting as
    many as schedules[r] says; draft, verify and accept for every row, and tell each schedule what
    was accepted. Advances each row's length by the positions it accepted."""
    n, gen, n_layers = batch.size, batch.gen, engine.num_layers
    backbone, caches = gen.row_caches(0, n), batch.caches.rows(0, n)
    device = gen.device
    pos = torch.tensor(batch.lengths, dtype=torch.long, device=device)  # where inputs[r] goes
    # Row r's drafts this round (its solo decode's k), bounded so every row's positions fit.
    room = batch.max_seq_len - 1 - int(pos.max())
    ks = [schedule.next_length(min(budget - 1, room)) for schedule, budget in zip(schedules, budgets)]
    steps = max(ks)
    tokens = torch.tensor(inputs, dtype=torch.long, device=device)[:, None]
    states: list[Tensor] = []
    drafts: list[list[int]] = [[] for _ in range(n)]
    laws: list[list[Tensor]] = [[] for _ in range(n)]
    seen = [None if p.counts is None else p.counts[:1].clone() for p in pickers]
    for i in range(steps + 1):
        span = gen.row_span(pos + i, 1)
        h = gen.run_layers(gen.embed(tokens), 0, d.layer, span, backbone)
        states.append(h)
        # Also writes a `layer` exit's own KV: the next draft, or the next round, reads it.
        hidden = engine._exit_hidden(caches, d.layer, h, span)
        drafting = [r for r in range(n) if i < ks[r]]
        if i == steps or not drafting:
            break
        if d.confidence is not None:
            doubted = POLICIES["learned"].score(None, hidden, engine.model.exit(d.layer).confidence) < d.confidence
            for r in drafting:
                if bool(doubted[r]):
                    ks[r] = i  # verify the drafts so far, as its solo decode would
            drafting = [r for r in drafting if i < ks[r]]
        if drafting:
            rows = torch.tensor(drafting, device=device)
            logits = draft_logits(engine, d.layer, hidden[rows], d.head)
            tokens = tokens.clone()
            for j, r in enumerate(drafting):
                token, law = pick_draft(pickers[r], logits[j : j + 1], seen[r], d.head, engine.vocab_size)
                tokens[r] = token[0]
                drafts[r].append(int(token))
                if law is not None:
                    laws[r].append(law)
    width = len(states)
    h = gen.run_layers(torch.cat(states, dim=1), d.layer, n_layers, gen.row_span(pos, width), backbone)
    full = engine._final_logits(caches, h)  # [n, width, vocab]
    outputs = []
    for r in range(n):
        k, picker = ks[r], pickers[r]
        draft = torch.tensor(drafts[r][:k], dtype=torch.long, device=device)
        # Position j penalised as if drafts[:j] were generated: lossless w.r.t. the penalised law.
        target = picker.adjust(full[r, : k + 1], picker.history(0, draft))
        if picker.params.greedy:
            n_ok, next_token = accept_greedy(draft, target)
        else:
            law = torch.cat(laws[r][:k]) if k else target[:0]
            n_ok, next_token = accept_sampled(draft, law, probabilities(target, picker.params), picker.rng)
        emitted = draft[:n_ok].tolist() + [next_token]
        logprobs = [None] * len(emitted) if picker.top is None else token_logprobs(
            target[: n_ok + 1], torch.tensor(emitted, device=device), picker.top)
        schedules[r].record(k, n_ok)
        outputs.append(RoundOutput(emitted, [d.layer] * n_ok + [n_layers], logprobs, k, n_ok))
        batch.lengths[r] += n_ok + 1
    return outputs
