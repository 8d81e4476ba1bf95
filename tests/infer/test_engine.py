"""Early-exit decoding engine against slow, cache-free references.

Most checks use an untied 4-layer llama: the session's `tiny_base_model` ties random
embeddings, which makes every layer echo the last input token with probability 1.0, so its
exits can never disagree with the final layer. It still serves the checks that need no
disagreement. SmolLM2 checks use untuned (copy-initialised) exits: exactness does not need
good exits, only real weights.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.eval.heldout import sequence_tokens
from eetune.eval.scoring import ExitPolicy, PolicyScorer
from eetune.exits.model import EarlyExitModel
from eetune.exits.spec import ExitSpec
from eetune.infer import (
    DecodeSettings,
    Engine,
    Generator,
    LayerKVCache,
    SamplingParams,
    accept_sampled,
    generate,
    layer_forward,
    probabilities,
)
from eetune.infer.policy import CONFIDENCES, MODES, POLICIES, first_confident
from eetune.infer.scheduler import BatchRequest, BatchScheduler, decode_all
from eetune.infer.settings import DecodeResult
from eetune.models import BaseModel

VOCAB = 256
N_LAYERS = 4
# A layer exit (own KV cache), an mlp exit with a learned estimator, a norm exit.
SPECS = [
    ExitSpec(1, "layer", init="random"),
    ExitSpec(2, "mlp", init="random", confidence="linear"),
    ExitSpec(3, "norm", init="random"),
]
# Max softmax probabilities of these random exits lie around 0.013-0.021: these thresholds
# give a mix of every exit and the final layer.
MIXED_THRESHOLDS = (0.016, 0.018, 0.02)


def _untied_llama(seed: int = 0) -> TransformerDecoder:
    torch.manual_seed(seed)
    return llama3_2(
        vocab_size=VOCAB,
        num_layers=N_LAYERS,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=256,
        intermediate_dim=128,
        rope_base=100000,
        scale_factor=1,
        norm_eps=1e-5,
        tie_word_embeddings=False,
    ).eval()


# Tiny models are all per-op overhead: one OpenMP thread is faster on two shared cores.
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


@pytest.fixture(scope="module")
def ee() -> EarlyExitModel:
    backbone = _untied_llama()
    torch.manual_seed(1)
    return EarlyExitModel(backbone, SPECS).eval()


@pytest.fixture(scope="module")
def ee_learned() -> EarlyExitModel:
    backbone = _untied_llama()
    torch.manual_seed(2)
    specs = [ExitSpec(s.layer, s.arch, init="random", confidence="linear") for s in SPECS]
    return EarlyExitModel(backbone, specs).eval()


@pytest.fixture(scope="module")
def ee_fixture(tiny_base_model: BaseModel) -> EarlyExitModel:
    # The session model is shared: exits are new modules, its own weights stay untouched.
    torch.manual_seed(3)
    return EarlyExitModel(tiny_base_model.model, SPECS).eval()


@pytest.fixture(scope="module")
def ee_shallow_agrees() -> EarlyExitModel:
    """The test engine's layer and mlp exits at 1 and 2, and a norm exit at 1 copied from the final
    norm, on a backbone whose layers 2-4 barely change the residual stream (their output
    projections scaled by 0.3): the norm exit drafts what the final layer says almost always, so
    drafting there pays and adaptive rounds draft several tokens."""
    backbone = _untied_llama()
    with torch.no_grad():
        for layer in backbone.layers[1:]:
            layer.attn.output_proj.weight.mul_(0.3)
            layer.mlp.w2.weight.mul_(0.3)
    torch.manual_seed(1)
    specs = [ExitSpec(1, "norm", init="copy"), SPECS[1]]
    return EarlyExitModel(backbone, specs).eval()


def _prompt(seed: int, n: int | None = None) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    n = n if n is not None else int(torch.randint(1, 14, (1,), generator=g))
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@torch.inference_mode()
def _reference_early_exit(
    model: EarlyExitModel,
    prompt: list[int],
    n_new: int,
    threshold: float,
    confidence: str = "max_prob",
    penalties: dict | None = None,
    logprobs: list[float] | None = None,
) -> tuple[list[int], list[int]]:
    """Early exit by definition: at every step a full forward over the whole prefix, no cache;
    the token leaves at the first exit whose confidence on that exact state reaches the threshold.

    `penalties` (presence_penalty, frequency_penalty, logit_bias) are applied by hand to the
    deciding head's logits before the argmax; the confidence stays on the raw head. The chosen
    tokens' log-probabilities (of those adjusted logits) go to `logprobs` when given.
    """
    n = model.num_layers
    p = penalties or {}

    def adjusted(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        logits = logits.float().clone()
        for token, value in p.get("logit_bias", {}).items():
            logits[token] += value
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).float()
        return logits - p.get("frequency_penalty", 0.0) * counts - p.get("presence_penalty", 0.0) * (counts > 0).float()

    seq, out, exits = list(prompt), [], []
    for _ in range(n_new):
        states = model.hidden_states(torch.tensor([seq]), model.exit_layers + [n])
        chosen, layer = adjusted(model.final_logits(states[n])[0, -1], out), n
        for exit_layer in model.exit_layers:
            hidden = model.exit_hidden(exit_layer, states[exit_layer])[0, -1]
            logits = torch.nn.functional.linear(hidden, model.head_weight(exit_layer)).float()
            if confidence == "learned":
                conf = float(torch.sigmoid(model.exit(exit_layer).confidence(hidden)))
            else:
                conf = float(logits.softmax(-1).max())
            if conf >= threshold:
                chosen, layer = adjusted(logits, out), exit_layer
                break
        token = int(chosen.argmax())
        if logprobs is not None:
            logprobs.append(float(chosen.log_softmax(-1)[token]))
        seq.append(token)
        out.append(token)
        exits.append(layer)
    return out, exits


# -- full --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["untied", "fixture"])
def test_full_equals_uncached_argmax_and_threshold_one_is_full(
    which: str, ee: EarlyExitModel, ee_fixture: EarlyExitModel
) -> None:
    model = ee if which == "untied" else ee_fixture
    engine = Engine(model)
    for seed in range(3):
        prompt = _prompt(seed)
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=12))
        seq = list(prompt)
        with torch.inference_mode():
            for _ in range(12):
                seq.append(int(model.backbone(torch.tensor([seq]))[0, -1].argmax()))
        assert full.tokens == seq[len(prompt) :]
        assert full.exit_layers == [N_LAYERS] * 12 and full.mean_layers == N_LAYERS
        at_one = engine.generate(prompt, DecodeSettings(mode="early_exit", threshold=1.0, max_new_tokens=12))
        assert at_one.tokens == full.tokens
        assert at_one.exit_layers == [N_LAYERS] * 12


# -- early exit ----------------------------------------------------------------------------


def test_early_exit_matches_cache_free_reference(ee: EarlyExitModel) -> None:
    engine = Engine(ee, max_seq_len=64)  # fixed caches reused across requests
    seen: Counter[int] = Counter()
    for seed in range(8):
        prompt = _prompt(seed)
        for threshold in MIXED_THRESHOLDS:
            streamed: list[tuple[int, int]] = []
            result = engine.generate(
                prompt,
                DecodeSettings(mode="early_exit", threshold=threshold, max_new_tokens=14),
                on_token=lambda t, e: streamed.append((t, e)),
            )
            assert (result.tokens, result.exit_layers) == _reference_early_exit(ee, prompt, 14, threshold)
            assert streamed == list(zip(result.tokens, result.exit_layers))
            assert result.mean_layers == pytest.approx(sum(result.exit_layers) / 14)
            seen.update(result.exit_layers)
    # Every exit and the final layer were used, so deferred fills at every depth were exercised.
    assert set(seen) == {1, 2, 3, N_LAYERS}


def test_deferred_kv_fill_equals_full_forward_kv(ee: EarlyExitModel) -> None:
    prompt = _prompt(11, n=6)
    engine = Engine(ee)
    result = engine.generate(prompt, DecodeSettings(mode="early_exit", threshold=0.017, max_new_tokens=20))
    exits = result.exit_layers
    last_full = max(i for i, e in enumerate(exits) if e == N_LAYERS)
    # Step i fed position len(prompt) - 1 + i; up to the last full-depth step every layer is filled.
    complete = len(prompt) + last_full
    early = [e for e in exits[: last_full + 1] if e < N_LAYERS]
    assert len(early) >= 3, exits
    caches = engine.caches()
    ids = prompt + result.tokens[:-1]
    ref = Generator(ee.backbone)
    ref.prefill(ids)
    for got, want in zip(caches.gen.caches, ref.caches):
        torch.testing.assert_close(got.k[:, :, :complete], want.k[:, :, :complete], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.v[:, :, :complete], want.v[:, :, :complete], atol=1e-5, rtol=0)
    # The layer exit's own cache holds its block's KV for every position that reached layer 1
    # (all fed positions: every token passes layer 1).
    fed = len(ids)
    block_cache = LayerKVCache(1, 2, 64, 16, dtype=torch.float32)
    with torch.inference_mode():
        h1 = ee.hidden_states(torch.tensor([ids]), [1])[1]
        layer_forward(ee.exit(1).block, h1, ref.span(0, fed), block_cache)
    torch.testing.assert_close(caches.exit_caches[1].k[:, :, :fed], block_cache.k[:, :, :fed], atol=1e-5, rtol=0)
    torch.testing.assert_close(caches.exit_caches[1].v[:, :, :fed], block_cache.v[:, :, :fed], atol=1e-5, rtol=0)


def test_eval_catch_up_model_carries_the_positions_the_engine_carries(
    ee: EarlyExitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval's cost model replays the exits in order; the engine's decoding layer calls carry
    exactly the positions it predicts (a layer over r positions costing r here)."""
    import eetune.infer.early_exit as early_exit
    from eetune.eval.timing import Costs

    decoding, calls = [False], []
    step, run_layers = early_exit.early_exit_step, Generator.run_layers

    def stepping(*args, **kwargs):
        decoding[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            decoding[0] = False

    def recording(self, h, start, end, span, caches=None):
        if decoding[0]:
            calls.append((end - start, h.shape[1]))
        return run_layers(self, h, start, end, span, caches)

    monkeypatch.setattr(early_exit, "early_exit_step", stepping)
    monkeypatch.setattr(Generator, "run_layers", recording)
    result = Engine(ee).generate(_prompt(11, n=6), DecodeSettings(mode="early_exit", threshold=0.017,
                                                                   max_new_tokens=20))
    carried = sum(layers * (positions - 1) for layers, positions in calls)
    assert carried > 0, result.exit_layers  # some tokens left early and were carried later
    exit_layers = [spec.layer for spec in SPECS]
    index = [exit_layers.index(e) if e < N_LAYERS else len(exit_layers) for e in result.exit_layers]
    linear = Costs(1.0, 0.0, 0.0, {}, {}, context=8, layer_rows_s=(1.0, 2.0))
    assert linear.catch_up_s(index, exit_layers, N_LAYERS) == carried


# A token order (most frequent first) for the `frequent` policy: its head keeps the first VOCAB / 8.
TOKEN_ORDER = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(7))


def test_learned_confidence_runs_the_head_only_where_tokens_exit(ee_learned: EarlyExitModel) -> None:
    for seed in range(4):
        prompt = _prompt(seed + 20)
        engine = Engine(ee_learned)
        settings = DecodeSettings(mode="early_exit", threshold=0.5, confidence="learned", max_new_tokens=12)
        result = engine.generate(prompt, settings)
        assert (result.tokens, result.exit_layers) == _reference_early_exit(ee_learned, prompt, 12, 0.5, "learned")
        # One head evaluation per token, at the layer it left at; none at exits it passed.
        assert engine.head_calls == Counter(result.exit_layers)
    assert any(e < N_LAYERS for e in result.exit_layers)


def test_frequent_confidence_decides_on_the_frequent_rows_and_runs_the_whole_head_where_tokens_exit(
    ee_learned: EarlyExitModel,
) -> None:
    """`frequent`: each exit a token passes puts it through the head's rows of the 32 most frequent
    tokens; the whole head runs once per token, where it leaves, and picks its token (the exit's argmax)."""
    kept = TOKEN_ORDER[: VOCAB // 8]
    engine = Engine(ee_learned, token_order=TOKEN_ORDER)
    prompt, probe = _prompt(23, 6), _prompt(24, 12)
    layers = sequence_tokens(ee_learned, torch.tensor([prompt + probe[:-1]]), torch.tensor(probe), TOKEN_ORDER)
    threshold = _mid_threshold(torch.stack([layers[layer].confidence["frequent"] for layer in ee_learned.exit_layers]))
    settings = DecodeSettings(mode="early_exit", threshold=threshold, confidence="frequent", max_new_tokens=12)
    with _LinearCalls() as calls:
        result = engine.generate(prompt, settings)
    assert engine.head_calls == Counter(result.exit_layers)
    assert calls.head_rows(VOCAB) == len(result.tokens)
    frequent_rows = sum(rows for w, rows in calls.calls if w.dim() == 2 and w.shape[0] == len(kept))
    assert frequent_rows >= len(result.tokens)  # a check at every exit a token passed
    assert any(e < N_LAYERS for e in result.exit_layers) and any(e == N_LAYERS for e in result.exit_layers)
    # By hand: the first exit whose frequent-row softmax reaches the threshold, its head's argmax there.
    ids = list(prompt)
    for token, layer in zip(result.tokens, result.exit_layers):
        with torch.inference_mode():
            states = ee_learned.hidden_states(torch.tensor([ids]), [*ee_learned.exit_layers, N_LAYERS])
            for exit_layer in ee_learned.exit_layers:
                hidden = ee_learned.exit_hidden(exit_layer, states[exit_layer])[0, -1]
                head = ee_learned.head_weight(exit_layer)
                if torch.softmax(head[kept] @ hidden, -1).max() >= threshold:
                    assert (layer, token) == (exit_layer, int((head @ hidden).argmax()))
                    break
            else:
                assert layer == N_LAYERS and token == int(ee_learned.final_logits(states[N_LAYERS])[0, -1].argmax())
        ids.append(token)


def test_frequent_confidence_needs_token_frequencies(ee_learned: EarlyExitModel) -> None:
    settings = DecodeSettings(mode="early_exit", threshold=0.2, confidence="frequent", max_new_tokens=4)
    with pytest.raises(EetuneError, match="confidence 'frequent' needs token frequencies"):
        Engine(ee_learned).generate(_prompt(1), settings)


class _LinearCalls(TorchFunctionMode):
    """Every `F.linear` the engine runs, as (weight, rows): counted outside the engine, so a
    head or layer that runs through another path than the engine's own counters still shows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            self.calls.append((weight, math.prod(x.shape[:-1])))
        return func(*args, **(kwargs or {}))

    def rows(self, weight: torch.Tensor) -> list[int]:
        """Rows per call through `weight` (matched by storage: views of it count too)."""
        ptr = weight.untyped_storage().data_ptr()
        return [rows for w, rows in self.calls if w.untyped_storage().data_ptr() == ptr]

    def head_rows(self, vocab: int) -> int:
        """Rows put through any vocabulary head ([vocab, dim] weights)."""
        return sum(rows for w, rows in self.calls if w.dim() == 2 and w.shape[0] == vocab)


def test_learned_confidence_evaluates_no_head_for_tokens_that_stay(ee_learned: EarlyExitModel) -> None:
    """Counted at F.linear, not by the engine: one head row per generated token under `learned`,
    far more under `max_prob` (its check runs the head at every exit a token passes)."""
    rows = {}
    for confidence in ("learned", "max_prob"):
        engine = Engine(ee_learned)
        settings = DecodeSettings(mode="early_exit", threshold=0.5, confidence=confidence, max_new_tokens=12)
        with _LinearCalls() as calls:
            result = engine.generate(_prompt(21), settings)
        rows[confidence] = calls.head_rows(VOCAB)
        if confidence == "learned":
            assert rows["learned"] == len(result.tokens)
            assert any(e < N_LAYERS for e in result.exit_layers) and any(e == N_LAYERS for e in result.exit_layers)
    assert rows["max_prob"] > rows["learned"]


# -- self-speculative ------------------------------------------------------------------------


def test_self_speculative_greedy_equals_full(ee: EarlyExitModel) -> None:
    engine = Engine(ee)
    total_drafted = total_accepted = 0
    for seed in range(8):
        prompt = _prompt(seed + 100)
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=16)).tokens
        for draft_exit in ee.exit_layers:
            for k in (1, 3, 5):
                settings = DecodeSettings(
                    mode="self_speculative", draft_exit=draft_exit, draft_len=k, max_new_tokens=16
                )
                result = engine.generate(prompt, settings)
                assert result.tokens == full, (seed, draft_exit, k)
                assert 0 <= result.accepted_tokens <= result.draft_tokens
                assert result.acceptance_rate == result.accepted_tokens / result.draft_tokens
                assert result.exit_layers.count(draft_exit) == result.accepted_tokens
                total_drafted += result.draft_tokens
                total_accepted += result.accepted_tokens
    # Random exits agree with the final layer often but not always: both paths ran.
    assert 0 < total_accepted < total_drafted


@pytest.mark.parametrize("draft_exit", [1, 2])
@pytest.mark.parametrize("draft_confidence", [None, 0.5])
def test_self_speculative_reuses_the_draft_layers(
    ee_learned: EarlyExitModel, draft_exit: int, draft_confidence: float | None
) -> None:
    """Per round, layers 1..L run once per drafted position (one position per call) and the
    verify pass runs only layers L+1..N, once, over the k + 1 positions; recomputing the
    prefix, or the drafts through layers 1..L again, changes these counts."""
    engine = Engine(ee_learned)
    prompt = _prompt(7, 9)
    settings = DecodeSettings(
        mode="self_speculative", draft_exit=draft_exit, draft_len=3, max_new_tokens=20,
        draft_confidence=draft_confidence,
    )
    with _LinearCalls() as calls:
        result = engine.generate(prompt, settings)
    layers = ee_learned.backbone.layers
    per_layer = [calls.rows(layer.attn.q_proj.weight) for layer in layers]
    # The first call of every layer is the prompt's prefill: the whole prompt at once.
    assert all(rows[0] == len(prompt) for rows in per_layer)
    rounds = len(per_layer[-1]) - 1
    positions = result.draft_tokens + rounds  # each round verifies its k drafts + 1
    assert rounds >= 2
    for i, rows in enumerate(per_layer):
        decode = rows[1:]
        if i < draft_exit:  # drafting layers: one position per call, each position once
            assert decode == [1] * positions, i
        else:  # verifying layers: one call per round over its k + 1 positions
            assert len(decode) == rounds and sum(decode) == positions, i
    assert result.tokens == engine.generate(prompt, DecodeSettings(max_new_tokens=20)).tokens


def test_self_speculative_stops_at_stop_id_inside_accepted_drafts(ee: EarlyExitModel) -> None:
    engine = Engine(ee)
    prompt = _prompt(5)
    full = engine.generate(prompt, DecodeSettings(max_new_tokens=16)).tokens
    stop = full[6]
    for k in (1, 4):
        result = engine.generate(
            prompt,
            DecodeSettings(
                mode="self_speculative", draft_exit=3, draft_len=k, max_new_tokens=16, stop_ids=frozenset({stop})
            ),
        )
        assert result.tokens == full[: full.index(stop) + 1]
        assert result.stopped_by == "eos"


def test_rejection_sampling_step_reproduces_the_target_distribution() -> None:
    # Draft and target laws that disagree: accepted drafts, residual samples and bonus tokens all occur.
    q = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    p = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5, 0.0]])
    rng = torch.Generator().manual_seed(0)
    trials = 20_000
    first = torch.zeros(5)
    second_given_first_kept = torch.zeros(5)
    n_kept = 0
    for _ in range(trials):
        draft = torch.stack([torch.multinomial(q[i], 1, generator=rng)[0] for i in range(2)])
        n_ok, nxt = accept_sampled(draft, q, p, rng)
        emitted = draft[:n_ok].tolist() + [nxt]
        first[emitted[0]] += 1
        if n_ok >= 1:
            n_kept += 1
            second_given_first_kept[emitted[1]] += 1
    # The first emitted token follows p_0 exactly; after a kept draft the next follows p_1.
    assert 0.5 * (first / trials - p[0]).abs().sum() < 0.02
    assert 0.5 * (second_given_first_kept / n_kept - p[1]).abs().sum() < 0.03
    # Expected acceptance of the first draft: sum_x min(p, q) = 0.1 + 0.2 + 0.1 + 0.1 = 0.5.
    assert n_kept / trials == pytest.approx(0.5, abs=0.02)


@torch.inference_mode()
def _frequency_order(seed: int = 0) -> torch.Tensor:
    """A made-up token ranking (a fixed permutation of the vocabulary)."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("draft_vocab", [1, 16, 128])
def test_restricted_draft_vocab_greedy_equals_full(ee: EarlyExitModel, draft_vocab: int) -> None:
    order = _frequency_order()
    kept = set(order[:draft_vocab].tolist())
    engine = Engine(ee, token_order=order)
    accepted_any = False
    for seed in range(8):
        prompt = _prompt(seed + 300)
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=16)).tokens
        for draft_exit in (1, 3):
            settings = DecodeSettings(
                mode="self_speculative", draft_exit=draft_exit, draft_len=3, max_new_tokens=16, draft_vocab=draft_vocab
            )
            result = engine.generate(prompt, settings)
            assert result.tokens == full, (seed, draft_exit)
            drafted_and_kept = [t for t, e in zip(result.tokens, result.exit_layers) if e == draft_exit]
            assert set(drafted_and_kept) <= kept  # accepted drafts come from the kept tokens only
            accepted_any |= bool(drafted_and_kept)
    assert accepted_any or draft_vocab == 1  # one kept token is rarely the right one


def test_adaptive_draft_length_stays_exact(ee_learned: EarlyExitModel) -> None:
    engine = Engine(ee_learned)
    drafted: dict[float, int] = {}
    for threshold in (0.45, 0.5, 0.55, 1.0):
        drafted[threshold] = 0
        for seed in range(6):
            prompt = _prompt(seed + 500)
            full = engine.generate(prompt, DecodeSettings(max_new_tokens=16)).tokens
            for draft_exit in (1, 2):
                result = engine.generate(
                    prompt,
                    DecodeSettings(
                        mode="self_speculative", draft_exit=draft_exit, draft_len=4, max_new_tokens=16,
                        draft_confidence=threshold,
                    ),
                )
                assert result.tokens == full, (threshold, seed, draft_exit)
                drafted[threshold] += result.draft_tokens
    # An estimator that always doubts drafts nothing (plain full decoding); lower bars draft more.
    assert drafted[1.0] == 0
    assert drafted[0.45] >= drafted[0.5] >= drafted[0.55] and drafted[0.45] > drafted[0.55]


def test_token_order_ranks_by_frequency_with_forced_ids() -> None:
    from eetune.infer.draft_vocab import count_tokens, token_order

    counts = count_tokens(torch.tensor([[5, 3, 3, -100], [5, 5, 7, 3]]), vocab_size=8)
    assert counts.tolist() == [0, 0, 0, 3, 0, 3, 0, 1]
    # 3 and 5 tie (lower id first), then 7, then the unseen ids in id order.
    assert token_order(counts).tolist() == [3, 5, 7, 0, 1, 2, 4, 6]
    assert token_order(counts, always=(2,)).tolist()[:3] == [2, 3, 5]


@pytest.mark.parametrize("draft_vocab", [None, 40])
def test_sampled_self_speculative_matches_full_model_distribution(ee: EarlyExitModel, draft_vocab: int | None) -> None:
    # top_k=3 keeps the exact joint law of the first 3 tokens small (27 outcomes) and the
    # exit's top-3 often differ from the final layer's, so rejections happen.
    prompt = _prompt(7, n=5)
    params = SamplingParams(temperature=1.0, top_k=3)
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, mass in exact.items():
            logits = ee.backbone(torch.tensor([prompt + list(prefix)]))[0, -1]
            dist = probabilities(logits, params)
            for token in dist.nonzero().flatten().tolist():
                grown[prefix + (token,)] = mass * float(dist[token])
        exact = grown
    # With a restricted draft vocabulary, the draft law is zero outside the kept tokens: still exact.
    engine = Engine(ee, token_order=_frequency_order(1))
    runs = 1500

    def settings(seed: int) -> DecodeSettings:
        return DecodeSettings(mode="self_speculative", draft_exit=2, draft_len=2, max_new_tokens=3, temperature=1.0,
                              top_k=3, seed=seed, draft_vocab=draft_vocab)

    # The runs decode 100 at a time in one batch (each row with its own seed's RNG), which is
    # each seed's solo decode: checked here on the first seeds.
    scheduler = BatchScheduler(engine, max_batch_size=100, max_seq_len=16)
    results = decode_all(scheduler, [BatchRequest(prompt, settings(seed)) for seed in range(runs)])
    for seed in range(20):
        assert results[seed].tokens == engine.generate(prompt, settings(seed)).tokens, seed
    counts = Counter(tuple(r.tokens) for r in results)
    drafted = sum(r.draft_tokens for r in results)
    accepted = sum(r.accepted_tokens for r in results)
    assert set(counts) <= set(exact)
    chi2 = sum((counts[o] - runs * m) ** 2 / (runs * m) for o, m in exact.items())
    # 26 degrees of freedom: P(chi2 > 60) ~ 2e-4 under the exact law.
    assert chi2 < 60, chi2
    assert 0 < accepted < drafted


# -- logit bias, penalties, logprobs ------------------------------------------------------------

PENALTIES = {"presence_penalty": 0.6, "frequency_penalty": 0.5, "logit_bias": {5: 2.0, 17: -100.0, 99: 1.0}}


def test_penalties_and_logit_bias_match_a_hand_penalised_reference_in_every_mode(ee: EarlyExitModel) -> None:
    engine = Engine(ee, max_batch_size=2, token_order=_frequency_order(1))
    changed = 0
    for seed in range(3):
        prompt = _prompt(seed + 60, n=6)
        want_lp: list[float] = []
        want = _reference_early_exit(ee, prompt, 14, 1.0, penalties=PENALTIES, logprobs=want_lp)
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=14, logprobs=2, **PENALTIES))
        assert (full.tokens, full.exit_layers) == want
        assert [e.logprob for e in full.logprobs] == pytest.approx(want_lp, abs=1e-4)
        # Greedy: the chosen token is the most likely one of the distribution reported.
        assert all(e.top[0][0] == e.token and len(e.top) == 2 for e in full.logprobs)
        changed += full.tokens != engine.generate(prompt, DecodeSettings(max_new_tokens=14)).tokens
        for threshold in (0.017, 0.02):
            want_lp = []
            want = _reference_early_exit(ee, prompt, 14, threshold, penalties=PENALTIES, logprobs=want_lp)
            settings = DecodeSettings(mode="early_exit", threshold=threshold, max_new_tokens=14, logprobs=0,
                                      **PENALTIES)
            early = engine.generate(prompt, settings)
            assert (early.tokens, early.exit_layers) == want
            assert any(e < N_LAYERS for e in early.exit_layers)
            # A token that left early reports its exit head's (penalised) distribution.
            assert [e.logprob for e in early.logprobs] == pytest.approx(want_lp, abs=1e-4)
            # The batch path penalises each row by its own history.
            other = _prompt(seed + 70, n=3)
            batch = engine.generate_batch([prompt, other], settings)
            assert (batch[0].tokens, batch[0].exit_layers) == want
            assert batch[1].tokens == engine.generate(other, settings).tokens
        for draft_exit, k, draft_vocab in ((1, 1, None), (3, 4, None), (2, 3, 40)):
            settings = DecodeSettings(mode="self_speculative", draft_exit=draft_exit, draft_len=k,
                                      draft_vocab=draft_vocab, max_new_tokens=14, logprobs=2, **PENALTIES)
            spec = engine.generate(prompt, settings)
            assert spec.tokens == full.tokens, (seed, draft_exit, k)
            assert spec.draft_tokens > 0
            # Its output is the full model's, and so are its logprobs (from the verify pass).
            for got, expected in zip(spec.logprobs, full.logprobs):
                assert got.token == expected.token and got.logprob == pytest.approx(expected.logprob, abs=1e-4)
                assert [t for t, _ in got.top] == [t for t, _ in expected.top]
    assert changed  # the penalties are not a no-op on these prompts


def test_sampled_logprobs_are_before_temperature_and_self_speculative_keeps_the_penalised_law(
    ee: EarlyExitModel,
) -> None:
    engine = Engine(ee)
    prompt = _prompt(9, n=4)
    settings = DecodeSettings(max_new_tokens=8, temperature=0.7, seed=3, logprobs=1, **PENALTIES)
    result = engine.generate(prompt, settings)
    with torch.inference_mode():
        for i, entry in enumerate(result.logprobs):
            logits = ee.backbone(torch.tensor([prompt + result.tokens[:i]]))[0, -1]
            counts = torch.bincount(torch.tensor(result.tokens[:i], dtype=torch.long), minlength=VOCAB).float()
            for token, value in PENALTIES["logit_bias"].items():
                logits[token] += value
            logits -= PENALTIES["frequency_penalty"] * counts + PENALTIES["presence_penalty"] * (counts > 0).float()
            assert entry.logprob == pytest.approx(float(logits.log_softmax(-1)[entry.token]), abs=1e-4)
    assert 17 not in result.tokens  # biased by -100
    # Sampled self_speculative with penalties: the first 3 tokens' law equals full sampling's.
    params = SamplingParams(temperature=1.0, top_k=3)
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.inference_mode():
        for _ in range(3):
            grown: dict[tuple[int, ...], float] = {}
            for prefix, mass in exact.items():
                logits = ee.backbone(torch.tensor([prompt + list(prefix)]))[0, -1]
                counts = torch.bincount(torch.tensor(prefix, dtype=torch.long), minlength=VOCAB).float()
                for token, value in PENALTIES["logit_bias"].items():
                    logits[token] += value
                logits -= 2.0 * counts
                dist = probabilities(logits, params)
                for token in dist.nonzero().flatten().tolist():
                    grown[prefix + (token,)] = mass * float(dist[token])
            exact = grown
    runs = 1200
    counts_seen: Counter[tuple[int, ...]] = Counter()
    for seed in range(runs):
        spec = DecodeSettings(mode="self_speculative", draft_exit=2, draft_len=2, max_new_tokens=3, temperature=1.0,
                              top_k=3, seed=seed, frequency_penalty=2.0, logit_bias=PENALTIES["logit_bias"])
        counts_seen[tuple(engine.generate(prompt, spec).tokens)] += 1
    assert set(counts_seen) <= set(exact)
    chi2 = sum((counts_seen[o] - runs * m) ** 2 / (runs * m) for o, m in exact.items())
    assert chi2 < 3 * len(exact), (chi2, len(exact))


@pytest.mark.parametrize("temperature", [1e-45, 5e-324])
def test_a_vanishing_temperature_samples_like_greedy_in_every_mode(ee: EarlyExitModel, temperature: float) -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    probs = probabilities(logits, SamplingParams(temperature=temperature, top_p=0.9))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    engine = Engine(ee)
    prompt = _prompt(12, n=5)
    for mode in ({"mode": "full"}, {"mode": "early_exit", "threshold": 0.017},
                 {"mode": "self_speculative", "draft_exit": 3, "draft_len": 3}):
        greedy = engine.generate(prompt, DecodeSettings(**mode, max_new_tokens=10)).tokens
        cold = engine.generate(prompt, DecodeSettings(**mode, max_new_tokens=10, temperature=temperature, seed=1))
        assert cold.tokens == greedy, mode


# -- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        DecodeSettings(max_new_tokens=12),
        DecodeSettings(mode="early_exit", threshold=0.017, max_new_tokens=12),
        DecodeSettings(mode="early_exit", threshold=0.018, max_new_tokens=12),
    ],
)
def test_batch_on_ragged_prompts_equals_one_by_one(ee: EarlyExitModel, settings: DecodeSettings) -> None:
    prompts = [_prompt(40, n=3), _prompt(41, n=9), _prompt(42, n=1), _prompt(43, n=6)]
    engine = Engine(ee, max_batch_size=4)
    single = [engine.generate(p, settings) for p in prompts]
    batch = engine.generate_batch(prompts, settings)
    for one, row, p in zip(single, batch, prompts):
        assert (row.tokens, row.exit_layers, row.prompt_len) == (one.tokens, one.exit_layers, len(p))
    # A row that emits a stop id ends there while the others go on.
    stop = single[1].tokens[4]
    with_stop = DecodeSettings(**{**settings.__dict__, "stop_ids": frozenset({stop})})
    for one, row in zip([engine.generate(p, with_stop) for p in prompts], engine.generate_batch(prompts, with_stop)):
        assert (row.tokens, row.exit_layers, row.stopped_by) == (one.tokens, one.exit_layers, one.stopped_by)
    assert batch[1].stopped_by == "length"


@pytest.mark.parametrize(
    "settings",
    [
        DecodeSettings(max_new_tokens=12),
        DecodeSettings(mode="early_exit", threshold=0.018, max_new_tokens=12),
        DecodeSettings(mode="self_speculative", draft_exit=3, draft_len=3, max_new_tokens=12),
    ],
    ids=["full", "early_exit", "self_speculative"],
)
def test_on_token_returning_true_stops_decoding_after_that_token(ee: EarlyExitModel, settings: DecodeSettings) -> None:
    engine = Engine(ee)
    prompt = _prompt(7, n=5)
    whole = engine.generate(prompt, settings)
    assert whole.stopped_by == "length" and len(whole.tokens) == 12
    for stop_after in (1, 5, 12):
        seen: list[int] = []

        def on_token(token: int, layer: int) -> bool:
            seen.append(token)
            return len(seen) == stop_after

        result = engine.generate(prompt, settings, on_token=on_token)
        assert result.tokens == seen == whole.tokens[:stop_after]
        assert result.exit_layers == whole.exit_layers[:stop_after]
        assert result.stopped_by == "callback"
    # A stop id on the same token is the more specific reason.
    stop = DecodeSettings(**{**settings.__dict__, "stop_ids": frozenset({whole.tokens[4]})})
    result = engine.generate(prompt, stop, on_token=lambda token, layer: token == whole.tokens[4])
    assert result.tokens == whole.tokens[: whole.tokens.index(whole.tokens[4]) + 1]
    assert result.stopped_by == "eos"
    # The engine is left clean: the next request decodes as if nothing had happened.
    assert engine.generate(prompt, settings).tokens == whole.tokens


# -- errors -----------------------------------------------------------------------------------


def test_bad_settings_raise_eetune_error(ee: EarlyExitModel, ee_fixture: EarlyExitModel) -> None:
    engine = Engine(ee, max_batch_size=2)
    prompt = [1, 2, 3]
    cases = [
        (DecodeSettings(logit_bias={VOCAB: 1.0}), r"logit_bias token ids must be in \[0, 256\)"),
        (DecodeSettings(seed=2**64, temperature=1.0), "seed must be in"),
        (DecodeSettings(logprobs=-1), "logprobs must be >= 0"),
        (DecodeSettings(mode="fast"), "unknown decoding mode"),
        (DecodeSettings(mode="early_exit", threshold=0.0), "threshold"),
        (DecodeSettings(mode="early_exit", threshold=1.5), "threshold"),
        (DecodeSettings(mode="early_exit", threshold=math.nan), "threshold"),
        (DecodeSettings(mode="early_exit", threshold=0.5, confidence="entropy"), "unknown confidence"),
        (DecodeSettings(mode="self_speculative", draft_exit=4), "draft_exit 4 is not an exit"),
        (DecodeSettings(mode="self_speculative", draft_len=0), "draft_len"),
        (DecodeSettings(mode="self_speculative", draft_vocab=8), "token_order"),
        (DecodeSettings(mode="self_speculative", draft_exit=1, draft_confidence=0.5), "estimator on the drafting exit 1"),
        (DecodeSettings(mode="self_speculative", draft_confidence=1.5), "draft_confidence"),
        # exits 1 and 3 have no estimator
        (DecodeSettings(mode="early_exit", threshold=0.5, confidence="learned"), r"exit\(s\) \[1, 3\]"),
        (DecodeSettings(max_new_tokens=-1), "max_new_tokens"),
        (DecodeSettings(max_new_tokens=300), "max_seq_len"),
        (DecodeSettings(temperature=-1.0), "temperature"),
    ]
    for settings, message in cases:
        with pytest.raises(EetuneError, match=message):
            engine.generate(prompt, settings)
    with pytest.raises(EetuneError, match="max_batch_size 2"):
        engine.generate_batch([prompt] * 3, DecodeSettings())
    with pytest.raises(EetuneError, match="self_speculative decodes one sequence"):
        engine.generate_batch([prompt], DecodeSettings(mode="self_speculative"))
    with pytest.raises(EetuneError, match="empty"):
        engine.generate([], DecodeSettings())
    with pytest.raises(EetuneError, match="vocabulary"):
        engine.generate([VOCAB], DecodeSettings())
    with pytest.raises(EetuneError, match="max_seq_len"):
        Engine(ee, max_seq_len=10).generate(prompt, DecodeSettings(max_new_tokens=8))
    with pytest.raises(EetuneError, match="EarlyExitModel"):
        Engine(ee.backbone)  # type: ignore[arg-type]
    with pytest.raises(EetuneError, match="needs a model with exits"):
        no_exits = Engine(EarlyExitModel(ee_fixture.backbone, []))
        no_exits.generate(prompt, DecodeSettings(mode="early_exit", threshold=0.5))
    assert engine.generate(prompt, DecodeSettings(max_new_tokens=0)).tokens == []


# -- SmolLM2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_ee(smollm2: BaseModel) -> EarlyExitModel:
    # Untuned: copy-initialised norm exit at 24 and mlp exit at 12, shared frozen head.
    return EarlyExitModel(smollm2.model, [ExitSpec(12, "mlp"), ExitSpec(24, "norm")]).eval()


def _chat(smollm2: BaseModel, question: str) -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return smollm2.tokenizer(text).input_ids


def test_smollm2_self_speculative_and_early_exit_are_exact(smollm2: BaseModel, smollm2_ee: EarlyExitModel) -> None:
    engine = Engine(smollm2_ee)
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    drafted = accepted = 0
    for question in questions:
        prompt = _chat(smollm2, question)
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=16, stop_ids=frozenset({2})))
        assert full.tokens == generate(smollm2.model, prompt, 16, stop_ids={2}).tokens
        for draft_exit, k in ((24, 4), (12, 3)):
            settings = DecodeSettings(
                mode="self_speculative", draft_exit=draft_exit, draft_len=k, max_new_tokens=16, stop_ids=frozenset({2})
            )
            result = engine.generate(prompt, settings)
            assert result.tokens == full.tokens, (question, draft_exit, k)
            drafted += result.draft_tokens
            accepted += result.accepted_tokens
    assert 0 < accepted <= drafted
    prompt = _chat(smollm2, questions[0])
    result = engine.generate(prompt, DecodeSettings(mode="early_exit", threshold=0.8, max_new_tokens=10))
    assert (result.tokens, result.exit_layers) == _reference_early_exit(smollm2_ee, prompt, 10, 0.8)


# -- the exit policy: one decision for runtime and eval ----------------------------------------


def _mid_threshold(confidence: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring confidences near the median: a mix of
    exits, and no token's confidence within rounding of it."""
    values = confidence.flatten().sort().values
    i = len(values) // 2
    return float((values[i - 1] + values[i]) / 2)


@pytest.mark.parametrize("confidence", list(POLICIES))
def test_eval_exit_decision_equals_the_engines_for_every_policy(ee_learned: EarlyExitModel, confidence: str) -> None:
    """Teacher-forced eval (eetune.eval.scoring, exit_metrics) sends every token to the exit the
    engine's early_exit decode left it at, for every registered confidence policy."""
    engine = Engine(ee_learned, token_order=TOKEN_ORDER)
    exits = ee_learned.exit_layers
    for seed in range(3):
        prompt = _prompt(100 + seed, 6)
        probe = _prompt(200 + seed, 12)
        layers = sequence_tokens(ee_learned, torch.tensor([prompt + probe[:-1]]), torch.tensor(probe), TOKEN_ORDER)
        threshold = _mid_threshold(torch.stack([layers[layer].confidence[confidence] for layer in exits]))
        settings = DecodeSettings(mode="early_exit", threshold=threshold, confidence=confidence, max_new_tokens=12)
        result = engine.generate(prompt, settings)
        scorer = PolicyScorer(ee_learned, ExitPolicy("early_exit", threshold, confidence), TOKEN_ORDER)
        scored = scorer.score(prompt, result.tokens)
        assert scored.exit_layers == result.exit_layers, (seed, threshold)
        assert scored.is_greedy
        assert len(set(result.exit_layers)) > 1, "the threshold should mix exits"
        # exit_metrics' policy sweep makes the same decision from the same confidences.
        taught = sequence_tokens(ee_learned, torch.tensor([prompt + result.tokens[:-1]]), torch.tensor(result.tokens),
                                 TOKEN_ORDER)
        index = first_confident(torch.stack([taught[layer].confidence[confidence] for layer in exits]), threshold)
        assert [[*exits, N_LAYERS][i] for i in index.tolist()] == result.exit_layers


def test_every_policy_is_a_choice_everywhere() -> None:
    """The choice lists the config schema, serve's protocol, eval and the engine validate against
    are the policy registry's."""
    from eetune.config.schema import CHOICES
    from eetune.serve.protocol import EarlyExitOptions

    assert CONFIDENCES == tuple(POLICIES) and CHOICES["generate.confidence"] == CONFIDENCES
    assert CHOICES["serve.confidence"] == CONFIDENCES and CHOICES["serve.mode"] == MODES
    for name in POLICIES:
        assert EarlyExitOptions(confidence=name).confidence == name
        ExitPolicy("early_exit", 0.5, name)


# -- continuous batching ------------------------------------------------------------------------


def _solo(ee: EarlyExitModel, prompt: list[int], settings: DecodeSettings) -> DecodeResult:
    return Engine(ee).generate(prompt, settings)


class _PrefillSpy:
    """Counts the prompt tokens each scheduler step prefills (chunked prefill bounds them)."""

    def __init__(self, scheduler: BatchScheduler) -> None:
        self.per_step: list[int] = [0]  # tokens prefilled since the last step, this step included
        real = scheduler.batch._prefill

        def counting(row, tokens, start, fill):
            self.per_step[-1] += tokens.shape[1]
            return real(row, tokens, start, fill)

        scheduler.batch._prefill = counting

    def step(self, scheduler: BatchScheduler) -> None:
        scheduler.step()
        self.per_step.append(0)


@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_scheduler_requests_joining_a_running_batch_decode_as_alone(ee: EarlyExitModel, prefill_chunk) -> None:
    """Rows join (prefilled whole, or 3 prompt tokens per step between the others' steps) and
    leave a running full-model batch; each equals its solo decode."""
    engine = Engine(ee)
    prompts = [[1, 5, 9, 200, 17], [1, 33], [1, 7, 7, 7, 90, 91, 92, 93], [1, 250, 3], [1, 60, 61], [1, 2, 3, 4]]
    settings = [
        DecodeSettings(max_new_tokens=10),
        DecodeSettings(max_new_tokens=14, temperature=0.9, top_p=0.8, seed=3),
        DecodeSettings(max_new_tokens=6, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={7: 2.0}),
        DecodeSettings(mode="early_exit", threshold=1.0, max_new_tokens=9, logprobs=2),  # never exits: full model
        DecodeSettings(max_new_tokens=12, temperature=1.3, top_k=20, seed=11, logprobs=0),
        DecodeSettings(max_new_tokens=8),
    ]
    solo = [_solo(ee, p, s) for p, s in zip(prompts, settings)]
    # A stop id that the first request emits mid-way ends it there, as alone.
    stop = solo[0].tokens[4]
    settings[0] = DecodeSettings(max_new_tokens=10, stop_ids=frozenset({stop}))
    solo[0] = _solo(ee, prompts[0], settings[0])
    assert solo[0].stopped_by == "eos"

    scheduler = BatchScheduler(engine, max_batch_size=3, max_seq_len=64, prefill_chunk=prefill_chunk)
    spy = _PrefillSpy(scheduler)
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    requests = [BatchRequest(p, s, on_token=lambda t, layer, i=i: streamed[i].append(t))
                for i, (p, s) in enumerate(zip(prompts, settings))]
    waiting, sizes = list(requests), []
    while waiting or scheduler.rows or scheduler.joining:
        if waiting and scheduler.has_room:  # one admission per step: rows join a running batch
            scheduler.admit(waiting.pop(0))
        sizes.append(scheduler.size)
        spy.step(scheduler)
    assert max(sizes) == 3
    if prefill_chunk is not None:  # prompts of 5 and 8 tokens joined over several steps, 3 tokens a step
        assert max(spy.per_step) == 3 and sum(spy.per_step) == sum(len(p) for p in prompts)
    for i, (request, alone) in enumerate(zip(requests, solo)):
        assert request.result.tokens == alone.tokens == streamed[i], i
        assert request.result.stopped_by == alone.stopped_by
        if alone.logprobs is not None:  # the same entries; values to float rounding (batched matmuls)
            got, want = request.result.logprobs, alone.logprobs
            assert [(e.token, [t for t, _ in e.top]) for e in got] == [(e.token, [t for t, _ in e.top]) for e in want]
            assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-4)


@pytest.mark.parametrize("mode", ["full", "early_exit", "self_speculative"])
def test_rows_leaving_while_a_long_prompt_is_prefilled_in_chunks(ee: EarlyExitModel, mode: str) -> None:
    """A row that ends (or is cancelled) while another request's prompt is half prefilled moves
    the half-built row with it: the joining request still decodes as alone."""
    extra = {"early_exit": dict(threshold=0.018), "self_speculative": dict(draft_exit=1, draft_len=2)}.get(mode, {})
    short = DecodeSettings(mode=mode, max_new_tokens=2, **extra)
    long = DecodeSettings(mode=mode, max_new_tokens=8, **extra)
    prompts = [_prompt(90, n=1), _prompt(91, n=2), _prompt(92, n=13)]
    scheduler = BatchScheduler(Engine(ee), max_batch_size=3, max_seq_len=64, prefill_chunk=2)
    half_built: list[int] = []
    requests = [BatchRequest(prompts[0], short,
                             on_token=lambda t, layer: half_built.append(scheduler.batch.prefill_left)),
                BatchRequest(prompts[1], long), BatchRequest(prompts[2], long)]
    for r in requests:
        scheduler.admit(r)
    cancelled = False
    while scheduler.rows or scheduler.joining:
        scheduler.step()
        if requests[0].result is not None and not cancelled and scheduler.batch.prefill_left:
            scheduler.cancel(requests[1])  # a client leaves mid-prefill too
            cancelled = True
    assert half_built[-1] > 0 and cancelled  # the short row ended while the long prompt was half prefilled
    for r, p, s in zip(requests, prompts, (short, long, long)):
        alone = _solo(ee, p, s)
        if r is requests[1]:
            assert r.result.stopped_by == "callback" and r.result.tokens == alone.tokens[: len(r.result.tokens)]
        else:
            assert (r.result.tokens, r.result.exit_layers) == (alone.tokens, alone.exit_layers)


def test_scheduler_callback_and_cancel_end_one_request_only(ee: EarlyExitModel) -> None:
    engine = Engine(ee)
    prompts = [[1, 5, 9], [1, 33, 34], [1, 70]]
    s = DecodeSettings(max_new_tokens=12)
    solo = [_solo(ee, p, s) for p in prompts]
    scheduler = BatchScheduler(engine, max_batch_size=3)
    stopper = BatchRequest(prompts[0], s, on_token=lambda t, layer: len(stopper.tokens) == 3)
    others = [BatchRequest(p, s) for p in prompts[1:]]
    for r in (stopper, *others):
        scheduler.admit(r)
    scheduler.step()
    scheduler.step()
    assert stopper.result.stopped_by == "callback" and stopper.result.tokens == solo[0].tokens[:3]
    scheduler.cancel(others[0])  # the client left: its row is free at once
    assert others[0].result.stopped_by == "callback" and scheduler.size == 1
    assert decode_all(scheduler, [BatchRequest(prompts[0], s)])[0].tokens == solo[0].tokens
    while scheduler.rows:
        scheduler.step()
    assert others[1].result.tokens == solo[2].tokens


@pytest.mark.parametrize("threshold, prefill_chunk",
                         [(0.017, None), (0.018, None), (0.018, 2), ((1.0, 0.017, 0.018), None)])
def test_scheduler_early_exit_rows_leave_at_their_own_exits_as_alone(
    ee: EarlyExitModel, threshold: float | tuple[float, ...], prefill_chunk: int | None
) -> None:
    """Rows join and leave a running early-exit batch at different steps, each at its own
    positions; every request's tokens and exit layers equal its solo decode, so the deferred KV
    fill (backbone and the `layer` exit's own cache) stays exact per row. With one threshold per
    exit, an exit at 1.0 is skipped (its `layer` block's cache never filled) and the rest stays exact."""
    engine = Engine(ee)
    prompts = [_prompt(50, n=5), _prompt(51, n=1), _prompt(52, n=11), _prompt(53, n=3), _prompt(54, n=7), _prompt(55, n=2)]
    per_exit = isinstance(threshold, tuple)
    base = dict(mode="early_exit", **({"exit_thresholds": threshold} if per_exit else {"threshold": threshold}))
    settings = [
        DecodeSettings(**base, max_new_tokens=14),
        DecodeSettings(**base, max_new_tokens=9, temperature=0.9, top_p=0.8, seed=3),
        DecodeSettings(**base, max_new_tokens=12, presence_penalty=0.5, logit_bias={7: 2.0}, logprobs=1),
        DecodeSettings(**base, max_new_tokens=16),
        DecodeSettings(**base, max_new_tokens=5, temperature=1.2, top_k=30, seed=8),
        DecodeSettings(**base, max_new_tokens=11),
    ]
    solo = [_solo(ee, p, s) for p, s in zip(prompts, settings)]
    # every exit (but one at threshold 1.0) and the final layer
    skipped = {layer for layer, t in zip(ee.exit_layers, threshold) if t == 1.0} if per_exit else set()
    assert {layer for r in solo for layer in r.exit_layers} == {*ee.exit_layers, N_LAYERS} - skipped
    stop = solo[3].tokens[6]
    settings[3] = DecodeSettings(**base, max_new_tokens=16, stop_ids=frozenset({stop}))
    solo[3] = _solo(ee, prompts[3], settings[3])

    scheduler = BatchScheduler(engine, max_batch_size=3, max_seq_len=64, prefill_chunk=prefill_chunk)
    streamed: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(prompts))}
    requests = [BatchRequest(p, s, on_token=lambda t, layer, i=i: streamed[i].append((t, layer)))
                for i, (p, s) in enumerate(zip(prompts, settings))]
    waiting, sizes, owed = list(requests), [], 0
    while waiting or scheduler.rows or scheduler.joining:
        if waiting and scheduler.has_room:  # one admission per step: rows join a running batch
            scheduler.admit(waiting.pop(0))
        sizes.append(scheduler.size)
        scheduler.step()
        owed += bool(scheduler.batch.pending)
    assert max(sizes) == 3 and owed > 0  # rows joined while deeper layers were owed
    for i, (request, alone) in enumerate(zip(requests, solo)):
        got = request.result
        assert (got.tokens, got.exit_layers, got.stopped_by) == (alone.tokens, alone.exit_layers, alone.stopped_by), i
        assert streamed[i] == list(zip(alone.tokens, alone.exit_layers))
        if alone.logprobs is not None:
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)


def test_scheduler_flush_settles_the_owed_kv_like_a_full_forward(ee: EarlyExitModel) -> None:
    """After rows left early, `flush` fills every layer's KV (and the `layer` exit's) for the owed
    positions: each row's caches then equal one full forward over its own sequence."""
    engine = Engine(ee)
    s = DecodeSettings(mode="early_exit", threshold=0.016, max_new_tokens=20)
    scheduler = BatchScheduler(engine, max_batch_size=2, max_seq_len=64)
    requests = [BatchRequest(_prompt(60, n=4), s), BatchRequest(_prompt(61, n=9), s)]
    for r in requests:
        scheduler.admit(r)
    while not scheduler.batch.pending:
        scheduler.step()
    scheduler.batch.flush(scheduler._stops)
    assert not scheduler.batch.pending
    reference = Engine(ee)
    for row, r in enumerate(requests):
        seq = r.prompt + r.tokens[:-1]  # the newest token is not fed yet
        assert scheduler.batch.lengths[row] == len(seq)
        reference.generate(seq, DecodeSettings(max_new_tokens=1))  # full model: every layer's KV
        want = reference.caches(1).gen.caches
        for layer, (got, expect) in enumerate(zip(scheduler.batch.gen.caches, want)):
            torch.testing.assert_close(got.k[row, :, : len(seq)], expect.k[0, :, : len(seq)], msg=f"layer {layer}")
            torch.testing.assert_close(got.v[row, :, : len(seq)], expect.v[0, :, : len(seq)], msg=f"layer {layer}")


@pytest.mark.parametrize(
    "model, prefill_chunk, schedule",
    [("ee", None, "constant"), ("ee_learned", None, "constant"), ("ee", 4, "constant"),
     ("ee_shallow_agrees", None, "adaptive")],
)
def test_scheduler_self_speculative_rows_accept_their_own_prefix_as_alone(
    model: str, prefill_chunk: int | None, schedule: str, request: pytest.FixtureRequest
) -> None:
    """Rows draft and verify together, each at its own positions, and accept their own prefix:
    every request's tokens (greedy, sampled with its seed, penalised, FR-Spec, adaptive drafts)
    equal its solo decode; greedy ones also the full model's."""
    ee = request.getfixturevalue(model)
    engine = Engine(ee, token_order=_frequency_order())
    # ee's exits: a `layer` exit at 1 (own KV cache) and an mlp exit at 2; ee_learned: estimators that cut drafts short.
    # ee_shallow_agrees: a norm exit at 1 that mostly agrees, so adaptive rows draft 0 to 3 tokens a round.
    draft = dict(mode="self_speculative", draft_exit=2 if model == "ee_learned" else 1, draft_len=3,
                 draft_schedule=schedule, draft_confidence=0.5 if model == "ee_learned" else None)
    prompts = [_prompt(70, n=5), _prompt(71, n=1), _prompt(72, n=11), _prompt(73, n=3), _prompt(74, n=7)]
    settings = [
        DecodeSettings(**draft, max_new_tokens=14),
        DecodeSettings(**draft, max_new_tokens=9, temperature=0.9, top_p=0.8, seed=3),
        DecodeSettings(**draft, max_new_tokens=12, presence_penalty=0.5, logit_bias={7: 2.0}, logprobs=1),
        DecodeSettings(**draft, max_new_tokens=16),
        DecodeSettings(**draft, max_new_tokens=10, temperature=1.2, top_k=30, seed=8),
    ]
    if model == "ee":  # FR-Spec drafting is part of the group: all rows draft over 40 tokens
        settings = [DecodeSettings(**{**s.__dict__, "draft_vocab": 40}) for s in settings]
    solo = [Engine(ee, token_order=_frequency_order()).generate(p, s) for p, s in zip(prompts, settings)]
    assert sum(r.accepted_tokens for r in solo) > 0
    full = _solo(ee, prompts[0], DecodeSettings(max_new_tokens=14))
    assert solo[0].tokens == full.tokens

    scheduler = BatchScheduler(engine, max_batch_size=3, max_seq_len=64, prefill_chunk=prefill_chunk)
    requests = [BatchRequest(p, s) for p, s in zip(prompts, settings)]
    waiting, sizes = list(requests), []
    while waiting or scheduler.rows or scheduler.joining:
        if waiting and scheduler.has_room:
            scheduler.admit(waiting.pop(0))
        sizes.append(scheduler.size)
        scheduler.step()
    assert max(sizes) == 3
    for i, (r, alone) in enumerate(zip(requests, solo)):
        got = r.result
        assert (got.tokens, got.exit_layers, got.stopped_by) == (alone.tokens, alone.exit_layers, alone.stopped_by), i
        assert (got.draft_tokens, got.accepted_tokens, got.mean_layers) == (
            alone.draft_tokens, alone.accepted_tokens, pytest.approx(alone.mean_layers)), i
        if alone.logprobs is not None:
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)


def test_scheduler_switches_decoding_groups_as_the_batch_drains(ee: EarlyExitModel) -> None:
    """One scheduler decodes group after group (self-speculative, early exit, full, ...): nothing of
    one group's state leaks into the next."""
    groups = [DecodeSettings(mode="self_speculative", draft_exit=1, draft_len=3, max_new_tokens=10),
              DecodeSettings(mode="early_exit", threshold=0.017, max_new_tokens=10),
              DecodeSettings(max_new_tokens=10),
              DecodeSettings(mode="self_speculative", draft_exit=2, draft_len=2, max_new_tokens=10)]
    work = [(_prompt(80 + i, n=2 + i % 5), groups[i // 2 % len(groups)]) for i in range(10)]
    results = decode_all(BatchScheduler(Engine(ee), max_batch_size=2, max_seq_len=64),
                         [BatchRequest(p, s) for p, s in work])
    for (p, s), got in zip(work, results):
        alone = _solo(ee, p, s)
        assert (got.tokens, got.exit_layers) == (alone.tokens, alone.exit_layers), s


def test_scheduler_refuses_what_it_cannot_batch(ee: EarlyExitModel) -> None:
    scheduler = BatchScheduler(Engine(ee), max_batch_size=2, max_seq_len=16)
    speculative = DecodeSettings(mode="self_speculative", max_new_tokens=4)
    assert scheduler.batchable(speculative)
    # One batch, one decoding group: other exit settings wait until it drains.
    scheduler.admit(BatchRequest([1, 2], DecodeSettings(mode="early_exit", threshold=0.5, max_new_tokens=4)))
    other = DecodeSettings(mode="early_exit", threshold=0.4, max_new_tokens=4)
    assert scheduler.batchable(other) and not scheduler.fits(other) and not scheduler.fits(DecodeSettings())
    with pytest.raises(EetuneError, match="other exit settings"):
        scheduler.admit(BatchRequest([1, 2], other))
    assert not scheduler.fits(speculative) and not scheduler.fits(DecodeSettings(**{**speculative.__dict__, "draft_len": 2}))
    while scheduler.rows:
        scheduler.step()
    scheduler = BatchScheduler(Engine(ee), max_batch_size=1, max_seq_len=16)
    with pytest.raises(EetuneError, match=r"= 17 exceeds the batch's max_seq_len of 16"):
        scheduler.admit(BatchRequest([1] * 10, DecodeSettings(max_new_tokens=7)))
    scheduler.admit(BatchRequest([1, 2], DecodeSettings(max_new_tokens=4)))
    with pytest.raises(EetuneError, match="batch is full"):
        scheduler.admit(BatchRequest([1, 2], DecodeSettings(max_new_tokens=4)))
