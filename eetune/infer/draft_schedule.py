"""How many tokens a self-speculative round drafts: always `draft_len` (`constant`), or as many as
pay off given how often this row's drafts have been accepted so far (`adaptive`).

`adaptive` (the idea of SWIFT and DEL, and of transformers' heuristic assistant schedule, with a
cost model instead of a fixed step): a row keeps a running estimate `alpha` of the chance that a
draft token is accepted (its own past rounds, counts decayed by DECAY per round, a uniform prior)
and drafts the k in 0..draft_len with the most expected tokens per unit of work:

    tokens(k) = 1 + alpha + ... + alpha^k          the accepted prefix, then the verifier's token
    work(k)   = (k + 1) * below + k * (exit + draft_head) + (1 + EXTRA_POSITION * k) * (above + head)

in parameters streamed (decoding at batch 1 is bound by reading weights): `below` the layers up to
the drafting exit, `exit` its module, `draft_head` its head (or FR-Spec's kept rows), `above` the
layers after it, `head` the LM head; a verify pass over k + 1 positions reads its weights once and
pays EXTRA_POSITION of that per extra position (scripts/bench/batch_step.py on 2 AVX2 cores: 8 rows
cost about 2x one). k = 0 is a plain full-model step: where drafting does not pay, the row decodes
like `full`, and every PROBE_EVERY such steps drafts one token to keep `alpha` current (at once
again after a probe that was accepted, so a row recovers quickly when drafts start to agree).

Every k is lossless (the acceptance step is exact for whatever was drafted), and the choice
depends only on the row's own accepted counts, never on timing: a seeded run repeats exactly,
and a row decodes the same alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("constant", "adaptive")
# Past rounds weigh DECAY^age: acceptance drifts with the text (code, lists, prose).
DECAY = 0.9
# Full-model steps between one-token probes once drafting stopped paying.
PROBE_EVERY = 8
# A verify pass's cost per extra position, as a fraction of one position's (see above).
EXTRA_POSITION = 0.15


@dataclass(frozen=True)
class DraftCosts:
    """Work of a round's parts, in parameters streamed (see the module docstring)."""

    below: float
    exit: float
    draft_head: float
    above: float
    head: float

    def work(self, k: int) -> float:
        return (k + 1) * self.below + k * (self.exit + self.draft_head) + (1 + EXTRA_POSITION * k) * (
            self.above + self.head
        )


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round with k drafts emits on average when each draft is accepted with chance alpha."""
    return sum(alpha**i for i in range(k + 1))


def best_length(alpha: float, max_len: int, costs: DraftCosts) -> int:
    """The k in 0..max_len with the most expected tokens per unit of work (the smallest on ties)."""
    rates = [expected_tokens(alpha, k) / costs.work(k) for k in range(max_len + 1)]
    return max(range(max_len + 1), key=lambda k: (rates[k], -k))


class DraftSchedule:
    """One row's draft lengths: `next_length` before a round, `record` after it."""

    def __init__(self, schedule: str, max_len: int, costs: DraftCosts | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown draft schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if schedule == "adaptive" and costs is None:
            raise ValueError("the adaptive draft schedule needs the round's costs")
        self.schedule, self.max_len, self.costs = schedule, max_len, costs
        self.accepted = 0.0  # decayed accepted drafts
        self.trials = 0.0  # decayed drafts judged (accepted, plus the first rejected one of a round)
        self.full_steps = 0  # rounds in a row without drafting

    @property
    def alpha(self) -> float:
        """The running chance that a draft token is accepted (uniform prior: 0.5 before any round)."""
        return (self.accepted + 1.0) / (self.trials + 2.0)

    def next_length(self, limit: int) -> int:
        """Drafts for the next round, at most `limit` (the row's token budget and cache room)."""
        if self.schedule == "constant" or limit <= 0:
            return max(0, min(self.max_len, limit))
        assert self.costs is not None
        k = best_length(self.alpha, self.max_len, self.costs)
        if k == 0:
            self.full_steps += 1
            if self.full_steps >= PROBE_EVERY:
                self.full_steps, k = 0, 1
        else:
            self.full_steps = 0
        return min(k, limit)

    def record(self, drafted: int, accepted: int) -> None:
        """A round drafted `drafted` tokens and the verifier accepted the first `accepted`."""
        if drafted == 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.trials = DECAY * self.trials + accepted + (1 if accepted < drafted else 0)
        if accepted == drafted and self.full_steps == 0:
            # Every draft kept: were drafting still not to pay, probe again at once.
            self.full_steps = PROBE_EVERY - 1
