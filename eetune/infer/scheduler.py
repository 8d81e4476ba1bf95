"""Iteration-level scheduling: requests join a running batch and leave it at step boundaries.

`BatchScheduler` is how a server shares one weight stream among concurrent users (vLLM's
continuous batching). It decodes requests in every mode on a `ContinuousBatch`:
`admit` prefills a request into a free row; each `step` decodes one more token for every row,
each with its own sampling settings, seed, penalties, logit bias and logprobs (one `Picker` per
request), its own stop ids and token budget, and its own `on_token` callback (True: stop, e.g.
a stop string or a client that went away). The rows of a batch share one decoding group
(`group_of`): the full model; early exit with one confidence policy and threshold (each row
still leaves at its own exit); or self-speculative with one drafting exit and draft settings
(each row accepts its own prefix). A request's tokens equal its solo `Engine.generate` output:
greedy exactly, sampled with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from eetune.errors import EetuneError
from eetune.infer.continuous import ContinuousBatch
from eetune.infer.draft_schedule import DraftSchedule
from eetune.infer.generate import _check_request_length
from eetune.infer.picker import Picker
from eetune.infer.policy import settings_thresholds
from eetune.infer.sampling import TokenLogprob
from eetune.infer.settings import DecodeResult, DecodeSettings
from eetune.infer.speculative_batch import Drafting, speculative_round

OnToken = Callable[[int, int], "bool | None"]
OnLogprob = Callable[[TokenLogprob], None]
FULL = "full"
SPECULATIVE = "self_speculative"


@dataclass(eq=False)
class BatchRequest:
    """One request in the batch; `result` is set once it has finished."""

    prompt: list[int]
    settings: DecodeSettings
    on_token: OnToken | None = None
    on_logprob: OnLogprob | None = None
    tokens: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)  # the layer each token left at
    layer_calls: int = 0  # backbone layer calls (a call over several positions counts once)
    drafted: int = 0  # self_speculative: draft tokens made, and accepted
    accepted: int = 0
    result: DecodeResult | None = None
    _picker: Picker | None = None
    _schedule: DraftSchedule | None = None  # self_speculative: its draft lengths
    admitted_at: float = 0.0  # perf_counter() when it joined the batch
    _first: float = 0.0


class BatchScheduler:
    """Requests of one decoding group decoding together, up to `max_batch_size` at a time."""

    def __init__(
        self, engine, max_batch_size: int, max_seq_len: int | None = None, prefill_chunk: int | None = None
    ) -> None:
        """`prefill_chunk`: prompt tokens prefilled per step before the running rows decode (chunked
        prefill: a long prompt joins over several steps instead of stalling them); None: a request's
        whole prompt is prefilled when it is admitted."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise EetuneError(f"prefill_chunk must be >= 1 (or None), got {prefill_chunk}")
        self.engine = engine
        self.batch = ContinuousBatch(engine.model, max_batch_size=max_batch_size,
                                     max_seq_len=max_seq_len or engine.max_seq_len)
        self.prefill_chunk = prefill_chunk
        self.rows: list[BatchRequest] = []
        self.joining: list[BatchRequest] = []  # admitted, waiting for (the rest of) their prefill
        self.group: Hashable | None = None  # what the running rows decode (group_of)
        self._stops: list[int] = []
        self._drafting: Drafting | None = None
        self._zero = torch.zeros(1, dtype=torch.long, device=self.batch.gen.device)

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def has_room(self) -> bool:
        return self.size + len(self.joining) < self.batch.capacity

    def group_of(self, settings: DecodeSettings) -> Hashable | None:
        """The batch such a request decodes in: "full" (also early exit that never exits), early exit
        with its confidence policy and threshold(s), or self_speculative with its draft settings."""
        if settings.mode == SPECULATIVE:
            s = settings
            draft_exit = s.draft_exit if s.draft_exit is not None else self.engine.model.exit_layers[-1]
            return (SPECULATIVE, draft_exit, s.draft_len, s.draft_schedule, s.draft_vocab, s.draft_confidence)
        if not self.engine._exit_stops(settings):
            return FULL
        return ("early_exit", settings.confidence, settings_thresholds(settings))

    def batchable(self, settings: DecodeSettings) -> bool:
        return self.group_of(settings) is not None

    def fits(self, settings: DecodeSettings) -> bool:
        """Whether such a request may join the running batch now (any group, once it has drained)."""
        group = self.group_of(settings)
        return group is not None and (not (self.rows or self.joining) or group == self.group)

    def admit(self, request: BatchRequest) -> bool:
        """Take `request` into the batch; True if it already finished. Its prompt is prefilled now
        (or, with `prefill_chunk`, over the next steps) into a free row; a full-model or
        self-speculative row picks its first token when it joins, an early-exit row at the step
        after (its last prompt token may leave early)."""
        s = request.settings
        group = self.group_of(s)
        if group is None:
            raise EetuneError(f"mode={s.mode} decodes alone")
        if (self.rows or self.joining) and group != self.group:
            raise EetuneError("the running batch decodes with other exit settings: admit this request once it drains")
        if not self.has_room:
            raise EetuneError(f"the batch is full ({self.batch.capacity} rows)")
        params = self.engine._check_settings(s)
        request.prompt = self.engine._check_prompt(request.prompt)
        _check_request_length(len(request.prompt), s.max_new_tokens, self.batch.max_seq_len, "the batch's")
        request._picker = Picker(s, params, 1, self.engine.vocab_size, self.batch.gen.device, request.on_logprob)
        request.admitted_at = time.perf_counter()
        if s.max_new_tokens == 0:
            self._finish(request, "length")
            return True
        speculative = group != FULL and group[0] == SPECULATIVE
        self.group, self._stops = group, self.engine._exit_stops(s)
        self._drafting = Drafting.of(self.engine, s) if speculative else None
        request._schedule = None if self._drafting is None else self._drafting.schedule(self.engine)
        self.joining.append(request)
        if self.prefill_chunk is None:
            return request in self._prefill_joining(None)
        return False

    def step(self) -> list[BatchRequest]:
        """Up to `prefill_chunk` prompt tokens of joining requests, then one token for every row; the
        requests that finished (their rows are freed)."""
        finished = [] if self.prefill_chunk is None else self._prefill_joining(self.prefill_chunk)
        if not self.rows:
            return finished
        inputs = [r.tokens[-1] if r.tokens else r.prompt[-1] for r in self.rows]
        if self._drafting is not None:
            return finished + self._speculative_step(inputs)
        if self.group == FULL:
            logits = self.batch.step(inputs)
            self.engine.head_calls[self.engine.num_layers] += len(self.rows)
            tokens = [self._pick(row, logits[row : row + 1]) for row in range(len(self.rows))]
            exits = [self.engine.num_layers] * len(tokens)
        else:
            tokens, exits = self.batch.step_exits(self.engine, inputs, self._stops, self.rows[0].settings, self._choose)
        ended = [r for row, r in enumerate(list(self.rows)) if self._record(row, tokens[row], exits[row], retire=False)]
        for request in ended:
            self._retire(request)
        return finished + ended

    def cancel(self, request: BatchRequest) -> None:
        """End a request now (stopped_by callback), freeing its row."""
        if request in self.joining:
            if request is self.joining[0] and self.batch.prefilling is not None:
                self.batch.abort_prefill()
            self.joining.remove(request)
            self._finish(request, "callback")
        elif request in self.rows:
            self._retire(request)
            self._finish(request, "callback")

    # -- internals ---------------------------------------------------------------------------

    def _prefill_joining(self, budget: int | None) -> list[BatchRequest]:
        """Prefill joining requests in order with up to `budget` prompt tokens (None: all of them);
        each joins the batch as its prefill completes. Returns those that finished on joining."""
        finished = []
        deferred = self._drafting is None and self.group != FULL  # early exit: the last prompt token decodes
        n_layers = self.engine.num_layers
        while self.joining and (budget is None or budget > 0):
            request = self.joining[0]
            if self.batch.prefilling is None:
                self.batch.start(request.prompt, self._fill(), deferred=deferred)
            if deferred and (budget is None or self.batch.prefill_left <= budget):
                self.batch.flush(self._stops)  # it joins now: the others settle what they owe first
            done = self.batch.advance(budget)
            budget = None if budget is None else budget - done
            if self.batch.prefill_left:
                break
            logits = self.batch.join()
            self.joining.pop(0)
            self.rows.append(request)
            if logits is not None:
                row = len(self.rows) - 1
                token = self._pick(row, logits[None])
                self.engine.head_calls[n_layers] += 1
                request.layer_calls += n_layers
                if self._record(row, token, n_layers):
                    finished.append(request)
        return finished

    def _fill(self) -> list[int]:
        """The `layer` exits whose own KV a joining row's prompt must fill: the drafting one, or every exit stop."""
        layers = self._stops if self._drafting is None else [self._drafting.layer]
        return [layer for layer in layers if layer in self.batch.caches.exit_caches]

    def _speculative_step(self, inputs: list[int]) -> list[BatchRequest]:
        """One draft-and-verify round for every row; each emits its accepted drafts and one more token."""
        budgets = [r.settings.max_new_tokens - len(r.tokens) for r in self.rows]
        outputs = speculative_round(self.engine, self.batch, inputs, budgets, [r._picker for r in self.rows],
                                    [r._schedule for r in self.rows], self._drafting)
        finished = []
        for row, (request, out) in enumerate(zip(list(self.rows), outputs)):
            request.drafted += out.drafted
            request.accepted += out.accepted
            request.layer_calls += out.drafted * self._drafting.layer + self.engine.num_layers
            for token, layer, logprob in zip(out.tokens, out.layers, out.logprobs):
                request._picker.record(0, token, logprob)
                if self._record(row, token, layer, retire=False):
                    finished.append(request)
                    break
        for request in finished:
            self._retire(request)
        return finished

    def _choose(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._pick(row, logits[i : i + 1]) for i, row in enumerate(rows.tolist())],
                            dtype=torch.long, device=logits.device)

    def _pick(self, row: int, logits: torch.Tensor) -> int:
        """Row `row`'s next token from its logits [1, vocab], by its request's own picker."""
        picker = self.rows[row]._picker
        token = int(picker.choose(logits, self._zero)[0])
        picker.record(0, token)
        return token

    def _record(self, row: int, token: int, layer: int, retire: bool = True) -> bool:
        """Row `row` took `token` at `layer`; True if its request finished."""
        request = self.rows[row]
        s = request.settings
        request.tokens.append(token)
        request.exits.append(layer)
        if len(request.tokens) == 1:
            request._first = time.perf_counter()  # time to first token ends here
        halted = request.on_token is not None and bool(request.on_token(token, layer))
        if token in s.stop_ids or halted or len(request.tokens) == s.max_new_tokens:
            if retire:
                self._retire(request)
            self._finish(request, "eos" if token in s.stop_ids else "callback" if halted else "length")
            return True
        return False

    def _retire(self, request: BatchRequest) -> None:
        row = self.rows.index(request)
        moved = self.batch.retire(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
        self.rows.pop()

    def _finish(self, request: BatchRequest, stopped_by: str) -> None:
        if request.result is not None:
            return
        now = time.perf_counter()
        out, exits = request.tokens, request.exits
        decode_s = now - request._first if out else 0.0
        rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
        picker = request._picker
        speculative = request.settings.mode == SPECULATIVE
        if speculative:
            mean_layers = request.layer_calls / len(out) if out else 0.0
        else:
            mean_layers = sum(exits) / len(exits) if exits else 0.0
        request.result = DecodeResult(
            list(out), list(exits), len(request.prompt), (request._first or now) - request.admitted_at, decode_s,
            rate, mean_layers, draft_tokens=request.drafted, accepted_tokens=request.accepted,
            acceptance_rate=request.accepted / request.drafted if speculative and request.drafted else None,
            stopped_by=stopped_by, logprobs=None if picker is None or picker.logprobs is None else picker.logprobs[0],
        )


def decode_all(scheduler: BatchScheduler, requests: Sequence[BatchRequest]) -> list[DecodeResult]:
    """Admit requests as rows free up and step until all have finished (e.g. a corpus build).
    A request of another decoding group waits until the running batch has drained."""
    for request in requests:
        if not scheduler.batchable(request.settings):
            raise EetuneError(f"mode={request.settings.mode} decodes alone: call Engine.generate for it")
    waiting = list(requests)
    while waiting or scheduler.rows or scheduler.joining:
        while waiting and scheduler.has_room and scheduler.fits(waiting[0].settings):
            scheduler.admit(waiting.pop(0))
        scheduler.step()
    return [r.result for r in requests]
