"""Iteration-level scheduling: requests join a running batch and leave it at step boundaries.

`BatchScheduler` is how a server shares one weight stream among concurrent users (vLLM's
continuous batching). It decodes full-model requests (`mode=full`, or an `early_exit`
threshold that never exits) on a `ContinuousBatch`: `admit` prefills a request into a free
row and picks its first token; each `step` decodes one more token for every row, each with
its own sampling settings, seed, penalties, logit bias and logprobs (one `Picker` per
request), its own stop ids and token budget, and its own `on_token` callback (True: stop,
e.g. a stop string or a client that went away). A request's tokens equal its solo
`Engine.generate` output: greedy exactly, sampled with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from eetune.errors import EetuneError
from eetune.infer.continuous import ContinuousBatch
from eetune.infer.generate import _check_request_length
from eetune.infer.picker import Picker
from eetune.infer.sampling import TokenLogprob
from eetune.infer.settings import DecodeResult, DecodeSettings

OnToken = Callable[[int, int], "bool | None"]
OnLogprob = Callable[[TokenLogprob], None]


@dataclass(eq=False)
class BatchRequest:
    """One request in the batch; `result` is set once it has finished."""

    prompt: list[int]
    settings: DecodeSettings
    on_token: OnToken | None = None
    on_logprob: OnLogprob | None = None
    tokens: list[int] = field(default_factory=list)
    result: DecodeResult | None = None
    _picker: Picker | None = None
    admitted_at: float = 0.0  # perf_counter() when it joined the batch
    _first: float = 0.0


class BatchScheduler:
    """Full-model requests decoding together, up to `max_batch_size` at a time."""

    def __init__(self, engine, max_batch_size: int, max_seq_len: int | None = None) -> None:
        self.engine = engine
        self.batch = ContinuousBatch(engine.model.backbone, max_batch_size=max_batch_size,
                                     max_seq_len=max_seq_len or engine.max_seq_len)
        self.rows: list[BatchRequest] = []
        self._zero = torch.zeros(1, dtype=torch.long, device=self.batch.gen.device)

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def has_room(self) -> bool:
        return self.size < self.batch.capacity

    def batchable(self, settings: DecodeSettings) -> bool:
        """Whether this scheduler decodes such a request (full model only, for now)."""
        return settings.mode != "self_speculative" and not self.engine._exit_stops(settings)

    def admit(self, request: BatchRequest) -> bool:
        """Prefill `request` into a free row and pick its first token; True if it already finished."""
        s = request.settings
        if not self.batchable(s):
            raise EetuneError(f"the batch decodes the full model only, not mode={s.mode} with exits")
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
        logits = self.batch.admit(request.prompt)
        self.rows.append(request)
        return self._take(len(self.rows) - 1, logits[None])

    def step(self) -> list[BatchRequest]:
        """One token for every row; the requests that finished with it (their rows are freed)."""
        if not self.rows:
            return []
        logits = self.batch.step([r.tokens[-1] for r in self.rows])
        finished = [r for row, r in enumerate(list(self.rows)) if self._take(row, logits[row : row + 1], retire=False)]
        for request in finished:
            self._retire(request)
        return finished

    def cancel(self, request: BatchRequest) -> None:
        """End a request now (stopped_by callback), freeing its row."""
        if request in self.rows:
            self._retire(request)
            self._finish(request, "callback")

    # -- internals ---------------------------------------------------------------------------

    def _take(self, row: int, logits: torch.Tensor, retire: bool = True) -> bool:
        """Pick row `row`'s next token from its logits [1, vocab]; True if the request finished."""
        request = self.rows[row]
        s, picker = request.settings, request._picker
        token = int(picker.choose(logits, self._zero)[0])
        picker.record(0, token)
        request.tokens.append(token)
        if len(request.tokens) == 1:
            request._first = time.perf_counter()  # time to first token ends here
        self.engine.head_calls[self.engine.num_layers] += 1
        halted = request.on_token is not None and bool(request.on_token(token, self.engine.num_layers))
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
        out, n = request.tokens, self.engine.num_layers
        decode_s = now - request._first if out else 0.0
        rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
        picker = request._picker
        request.result = DecodeResult(
            list(out), [n] * len(out), len(request.prompt), (request._first or now) - request.admitted_at, decode_s,
            rate, float(n), stopped_by=stopped_by,
            logprobs=None if picker is None or picker.logprobs is None else picker.logprobs[0],
        )


def decode_all(scheduler: BatchScheduler, requests: Sequence[BatchRequest]) -> list[DecodeResult]:
    """Admit requests as rows free up and step until all have finished (e.g. a corpus build)."""
    waiting = list(requests)
    while waiting or scheduler.rows:
        while waiting and scheduler.has_room:
            scheduler.admit(waiting.pop(0))
        scheduler.step()
    return [r.result for r in requests]
