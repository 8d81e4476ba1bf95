"""Cached, layer-by-layer generation against torchtune's own uncached forward."""

from __future__ import annotations

import math

import pytest
import torch
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.models.qwen2._component_builders import qwen2
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.infer import Generator, SamplingParams, generate, make_rng, probabilities, sample
from eetune.infer import sampling
from eetune.infer.continuous import ContinuousBatch

VOCAB = 256
MAX_SEQ_LEN = 128


def _tiny_llama() -> TransformerDecoder:
    torch.manual_seed(0)
    return llama3_2(
        vocab_size=VOCAB,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=MAX_SEQ_LEN,
        intermediate_dim=128,
        rope_base=100000,
        scale_factor=1,
        norm_eps=1e-5,
        tie_word_embeddings=True,
    ).eval()


def _tiny_qwen2() -> TransformerDecoder:
    # qkv projections with bias, untied head, a different RoPE implementation.
    torch.manual_seed(1)
    return qwen2(
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        intermediate_dim=128,
        max_seq_len=MAX_SEQ_LEN,
    ).eval()


@pytest.fixture(scope="module")
def llama() -> TransformerDecoder:
    return _tiny_llama()


@pytest.fixture(scope="module", params=["llama3_2", "qwen2"])
def model(request: pytest.FixtureRequest) -> TransformerDecoder:
    return _tiny_llama() if request.param == "llama3_2" else _tiny_qwen2()


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@torch.inference_mode()
def _reference_logits(model: TransformerDecoder, ids: list[int]) -> torch.Tensor:
    """torchtune's own forward, no cache: [len(ids), vocab]."""
    return model(torch.tensor([ids]))[0]


def test_prefill_matches_model_forward(model: TransformerDecoder) -> None:
    ids = _prompt(23)
    gen = Generator(model)
    logits = gen.prefill(ids, all_logits=True)
    assert logits.shape == (1, 23, VOCAB)
    assert gen.length == 23
    torch.testing.assert_close(logits[0], _reference_logits(model, ids), atol=1e-5, rtol=0)


def test_layer_by_layer_pieces_match_model_forward(model: TransformerDecoder) -> None:
    ids = _prompt(17)
    gen = Generator(model)
    n = gen.num_layers
    with torch.inference_mode():
        span = gen.span(0, len(ids))
        h = gen.embed(torch.tensor([ids]))
        h = gen.run_layers(h, 0, n // 2, span)  # e.g. stop at an exit ...
        h = gen.run_layers(h, n // 2, n, span)  # ... and resume the deeper layers later
        logits = gen.final_logits(h)
    torch.testing.assert_close(logits[0], _reference_logits(model, ids), atol=1e-5, rtol=0)


def test_chunk_after_cached_positions_uses_causal_mask(llama: TransformerDecoder) -> None:
    # A multi-token chunk on top of a cache is what speculative verification will do.
    ids = _prompt(30)
    gen = Generator(llama)
    gen.prefill(ids[:12])
    chunk_logits = gen.forward(torch.tensor([ids[12:]]), all_logits=True)
    assert gen.length == 30
    # 1e-4 like decoding: the chunk's matmuls have other shapes than the full sequence's.
    torch.testing.assert_close(chunk_logits[0], _reference_logits(llama, ids)[12:], atol=1e-4, rtol=0)


def test_cached_greedy_matches_uncached_argmax(model: TransformerDecoder) -> None:
    prompt = _prompt(9, seed=3)
    gen = Generator(model)
    seq = list(prompt)
    logits = gen.prefill(prompt)[0]
    for _ in range(20):
        ref = _reference_logits(model, seq)[-1]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
        token = int(logits.argmax())
        assert token == int(ref.argmax())
        seq.append(token)
        logits = gen.decode_step(token)[0]
    assert generate(model, prompt, 20).tokens == seq[len(prompt) :]


def test_teacher_forced_decode_matches_uncached(llama: TransformerDecoder) -> None:
    # Random tokens rather than the tiny model's repetitive greedy output: every cached
    # position then holds a distinct key.
    ids = _prompt(40, seed=5)
    gen = Generator(llama)
    gen.prefill(ids[:5])
    ref = _reference_logits(llama, ids)
    for pos in range(5, 40):
        torch.testing.assert_close(gen.decode_step(ids[pos])[0], ref[pos], atol=1e-4, rtol=0)


def test_rewind_recomputes_the_same_continuation(llama: TransformerDecoder) -> None:
    ids = _prompt(20, seed=6)
    gen = Generator(llama)
    gen.prefill(ids[:10])
    for t in ids[10:15]:
        gen.decode_step(t)
    gen.rewind(12)  # roll back as after a rejected draft; later entries get overwritten
    logits = [gen.decode_step(t)[0] for t in ids[12:20]]
    ref = _reference_logits(llama, ids)
    torch.testing.assert_close(torch.stack(logits), ref[12:20], atol=1e-4, rtol=0)
    with pytest.raises(EetuneError):
        gen.rewind(21)


def test_batched_cache_shapes_and_prefill(llama: TransformerDecoder) -> None:
    gen = Generator(llama, max_seq_len=32, batch_size=2)
    assert [tuple(c.k.shape) for c in gen.caches] == [(2, 2, 32, 16)] * 4
    assert gen.caches[0].v.dtype == llama.tok_embeddings.weight.dtype
    tokens = torch.tensor([_prompt(11, seed=7), _prompt(11, seed=8)])
    logits = gen.prefill(tokens, all_logits=True)
    with torch.inference_mode():
        ref = llama(tokens)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune's fp32 RMSNorm
def test_bf16_model_uses_bf16_cache() -> None:
    model = _tiny_llama().to(torch.bfloat16)
    ids = _prompt(16)
    gen = Generator(model)
    assert gen.caches[0].k.dtype == torch.bfloat16
    logits = gen.prefill(ids, all_logits=True)
    assert logits.dtype == torch.float32
    ref = _reference_logits(model, ids)
    # Same math, different bf16 rounding order (folded GQA attention).
    assert (logits[0] - ref).abs().max() < 0.25
    assert (logits[0].argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_seeded_sampling_is_reproducible(model: TransformerDecoder) -> None:
    # High temperature: the random tied-embedding model is nearly deterministic at 1.0.
    prompt = _prompt(8)
    a = generate(model, prompt, 24, temperature=10.0, seed=123)
    b = generate(model, prompt, 24, temperature=10.0, seed=123)
    c = generate(model, prompt, 24, temperature=10.0, seed=124)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert len(a.tokens) == 24 and a.stopped_by == "length"


def test_top_k_1_and_tiny_top_p_equal_greedy(model: TransformerDecoder) -> None:
    prompt = _prompt(8, seed=2)
    greedy = generate(model, prompt, 16).tokens
    assert generate(model, prompt, 16, temperature=0.7, top_k=1, seed=0).tokens == greedy
    assert generate(model, prompt, 16, temperature=0.7, top_p=1e-6, seed=0).tokens == greedy


def test_stop_id_halts_generation_and_streams(model: TransformerDecoder) -> None:
    prompt = _prompt(8, seed=4)
    full = generate(model, prompt, 12)
    stop = full.tokens[3]
    streamed: list[int] = []
    result = generate(model, prompt, 12, stop_ids={stop}, on_token=streamed.append)
    first = full.tokens.index(stop)
    assert result.tokens == full.tokens[: first + 1]
    assert streamed == result.tokens
    assert result.stopped_by == "eos"
    assert result.prompt_len == 8
    assert full.stopped_by == "length" and len(full.tokens) == 12
    assert full.prefill_s > 0 and full.decode_s > 0 and full.tokens_per_s > 0


def test_request_length_limits(llama: TransformerDecoder) -> None:
    prompt = _prompt(100)
    with pytest.raises(EetuneError, match="max_seq_len"):
        generate(llama, prompt, MAX_SEQ_LEN - 100 + 1)
    assert len(generate(llama, prompt, MAX_SEQ_LEN - 100).tokens) == MAX_SEQ_LEN - 100
    gen = Generator(llama, max_seq_len=16)
    with pytest.raises(EetuneError, match="max_seq_len"):
        gen.generate(_prompt(10), 7)
    with pytest.raises(EetuneError, match="max_seq_len"):
        Generator(llama, max_seq_len=MAX_SEQ_LEN + 1)


def test_bad_requests_raise_eetune_error(llama: TransformerDecoder) -> None:
    with pytest.raises(EetuneError, match="empty"):
        generate(llama, [], 4)
    with pytest.raises(EetuneError, match="vocabulary"):
        generate(llama, [1, VOCAB], 4)
    with pytest.raises(EetuneError, match="max_new_tokens"):
        generate(llama, [1, 2], -1)
    with pytest.raises(EetuneError, match="temperature"):
        generate(llama, [1, 2], 4, temperature=-0.5)
    with pytest.raises(EetuneError, match="top_k"):
        generate(llama, [1, 2], 4, temperature=1.0, top_k=0)
    with pytest.raises(EetuneError, match="top_p"):
        generate(llama, [1, 2], 4, temperature=1.0, top_p=0.0)
    assert generate(llama, [1, 2], 0).tokens == []


def test_probabilities_apply_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # 0.5 + 0.3 < 0.85, so the third token is needed to reach the mass; the fourth is not.
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.85))
    torch.testing.assert_close(nucleus, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    greedy = probabilities(logits, SamplingParams())
    torch.testing.assert_close(greedy, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # Sampling frequencies follow the processed distribution.
    draws = torch.stack([sample(logits, SamplingParams(temperature=1.0, top_k=2), make_rng(i)) for i in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.3, top_p=0.5, top_k=40),
     SamplingParams(temperature=2.0, top_p=0.999)],  # a nucleus wider than the candidates: the exact path
    ids=["top_p", "top_k_then_top_p", "wide"],
)
def test_top_p_sampling_draws_from_the_processed_distribution(params: SamplingParams, monkeypatch) -> None:
    """Top-p sampling looks among the most likely candidates first; its draws must still follow
    `probabilities` (a chi-square test over 4 rows x 20k draws, candidates shrunk to 64)."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 64)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=g) * 2.5
    expected = probabilities(logits, params)
    rng = make_rng(1)
    counts = torch.zeros_like(expected)
    for _ in range(20_000 // 50):
        draws = torch.stack([sample(logits, params, rng) for _ in range(50)])  # [50, 4]
        counts.scatter_add_(1, draws.T, torch.ones(4, 50))
    for row in range(4):
        support = expected[row] > 0
        assert bool((counts[row][~support] == 0).all())  # nothing outside the nucleus
        e = expected[row][support] * counts[row].sum()
        chi2 = float(((counts[row][support] - e) ** 2 / e).sum())
        dof = int(support.sum()) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (row, chi2, dof)


def test_top_p_first_look_draws_the_token_the_wide_look_draws(monkeypatch) -> None:
    """The small first look at the candidates must not change what a seed picks: the same
    token as looking at all NUCLEUS_CANDIDATES at once, whether the first look held the nucleus."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.7, top_p=0.95)
    first_look_held = 0
    for trial in range(60):
        logits = torch.randn(1, 4096, generator=g) * (2.0 + trial % 4)
        t = sampling._tempered(logits, params.temperature)
        top = (t.topk(sampling.NUCLEUS_FIRST_LOOK).values - t.logsumexp(-1, keepdim=True)).exp()
        first_look_held += int(top.sum() >= params.top_p)
        for seed in range(4):
            staged = sample(logits, params, make_rng(seed))
            monkeypatch.setattr(sampling, "NUCLEUS_FIRST_LOOK", sampling.NUCLEUS_CANDIDATES)
            wide = sample(logits, params, make_rng(seed))
            monkeypatch.undo()
            assert torch.equal(staged, wide), (trial, seed)
    assert 10 < first_look_held < 50  # both paths ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_blocks_equal_the_module_path_bit_for_bit(dtype: torch.dtype) -> None:
    model = _tiny_llama().to(dtype)
    fast = Generator(model, max_seq_len=64, batch_size=2)
    slow = Generator(model, max_seq_len=64, batch_size=2, fast=False)
    assert all(b is not None for b in fast.blocks) and all(b is None for b in slow.blocks)
    tokens = torch.tensor([_prompt(12, seed=3), _prompt(12, seed=4)])
    with torch.inference_mode():
        # A prefill, a chunk after cached positions (masked), then single tokens.
        for start, length in ((0, 7), (7, 3), (10, 1), (11, 1)):
            chunk = tokens[:, start : start + length]
            a = fast.forward(chunk, all_logits=True)
            b = slow.forward(chunk, all_logits=True)
            assert torch.equal(a, b), (start, length)
    for f, s in zip(fast.caches, slow.caches):
        assert torch.equal(f.k[:, :, :12], s.k[:, :, :12]) and torch.equal(f.v[:, :, :12], s.v[:, :, :12])


def test_fast_blocks_skip_layers_they_cannot_express() -> None:
    # Qwen2's RoPE rotates halves, not interleaved pairs: it keeps torchtune's module path.
    assert all(b is None for b in Generator(_tiny_qwen2(), max_seq_len=16).blocks)


# -- continuous batching ----------------------------------------------------------------------


def _untied_llama() -> TransformerDecoder:
    torch.manual_seed(3)
    return llama3_2(vocab_size=VOCAB, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=MAX_SEQ_LEN,
                    intermediate_dim=128, rope_base=100000, scale_factor=1, norm_eps=1e-5,
                    tie_word_embeddings=False).eval()


@pytest.mark.parametrize("build", [_untied_llama, _tiny_qwen2], ids=["llama-fast-block", "qwen2-module-path"])
def test_rows_joining_and_leaving_a_continuous_batch_decode_as_alone(build) -> None:
    model = build()
    prompts = [[1, 17, 40, 3], [1, 90], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 200, 201], [1, 33, 34, 35, 36]]
    wanted = [9, 14, 6, 11, 8]  # new tokens per request
    solo = [generate(model, p, n).tokens for p, n in zip(prompts, wanted)]
    assert len({tuple(s) for s in solo}) == len(solo)  # distinct continuations: a mix-up would show

    batch = ContinuousBatch(model, max_batch_size=3, max_seq_len=32)
    rows: list[int] = []  # request held by each row
    out: dict[int, list[int]] = {}
    waiting = list(range(len(prompts)))
    step = 0
    while waiting or rows:
        # Admit one request every other step while a row is free: rows join mid-flight.
        if waiting and batch.size < batch.capacity and step % 2 == 0:
            request = waiting.pop(0)
            out[request] = [int(batch.admit(prompts[request]).argmax())]
            rows.append(request)
        else:
            logits = batch.step([out[r][-1] for r in rows])
            for row, request in enumerate(rows):
                out[request].append(int(logits[row].argmax()))
        for row in reversed(range(len(rows))):
            if len(out[rows[row]]) == wanted[rows[row]]:
                moved = batch.retire(row)
                rows[row] = rows[-1]
                rows.pop()
                assert moved == (len(rows) if row != len(rows) else None)
        step += 1
    assert [out[r] for r in range(len(prompts))] == solo


def test_continuous_batch_refuses_what_does_not_fit() -> None:
    batch = ContinuousBatch(_untied_llama(), max_batch_size=1, max_seq_len=6)
    batch.admit([1, 2, 3, 4, 5])
    with pytest.raises(EetuneError, match="batch is full"):
        batch.admit([1])
    with pytest.raises(EetuneError, match="one token per row"):
        batch.step([1, 2])
    batch.step([7])  # fills position 5, the last one
    with pytest.raises(EetuneError, match="filled all 6 positions"):
        batch.step([7])
    with pytest.raises(EetuneError, match="no row 1"):
        batch.retire(1)
