"""`eetune eval`: metrics against hand-computed values, the teacher-forced policy against the
engine, tasks, calibration, the stage end to end on a tiny model, and one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eetune.cli import main
from eetune.config import compose_config, list_recipes
from eetune.errors import EetuneError
from eetune.stages import eval as stage
from eetune.exits.spec import DEFAULT_THRESHOLD
from eetune.eval.calibration import (
    calibrated_thresholds,
    CALIBRATION_FILE,
    Candidate,
    exits_digest,
    load_calibrated_threshold,
    pick_threshold,
    write_calibration,
)
from eetune.eval.heldout import heldout_quality, token_stats
from eetune.eval.metrics import (
    exit_fractions,
    expected_calibration_error,
    first_exit,
    oracle_exit,
    precision_recall,
    reliability,
)
from eetune.eval.scoring import ExitPolicy, PolicyScorer
from eetune.eval.tasks import bundled_tasks, load_task
from eetune.eval.text_metrics import rouge_l, token_agreement, token_f1
from eetune.eval.timing import Costs
from eetune.exits import load_exits, loading
from eetune.infer.engine import DecodeSettings, Engine
from eetune.infer.policy import first_confident
from eetune.models import get_model_entry, load_base_model
from eetune.models.checkpoint import save_hf_checkpoint
from eetune.models.tiny import TINY_VOCAB_SIZE, build_tiny_tokenizer, random_decoder, tiny_hf_config
from eetune.stages import generate
from eetune.stages import tune

# --- pure metrics, against hand-computed values ------------------------------------------------


def test_first_exit_oracle_and_fractions_match_hand_computed_values():
    # 2 exits x 4 tokens.
    confidence = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.95, 0.7, 0.85, 0.3]])
    assert first_exit(confidence, 0.8).tolist() == [0, 2, 1, 2]
    assert first_exit(confidence, 0.5).tolist() == [0, 1, 0, 2]
    assert first_exit(confidence, 1.0).tolist() == [2, 2, 2, 2]  # 1.0 never exits, like the engine
    assert exit_fractions(torch.tensor([0, 2, 1, 2]), 2) == [0.25, 0.25, 0.5]
    agrees = torch.tensor([[False, True, False], [True, True, False]])
    assert oracle_exit(agrees).tolist() == [1, 0, 2]


def test_reliability_bins_and_ece_match_hand_computed_values():
    confidence = torch.tensor([0.1, 0.15, 0.85, 0.95, 1.0])
    correct = torch.tensor([False, True, True, True, False])
    bins = reliability(confidence, correct, 2)
    assert [b.count for b in bins] == [2, 3]  # 1.0 falls in the last bin
    assert bins[0].confidence == pytest.approx(0.125) and bins[0].accuracy == pytest.approx(0.5)
    assert bins[1].confidence == pytest.approx(0.9333333) and bins[1].accuracy == pytest.approx(2 / 3)
    # 2/5 * |0.5 - 0.125| + 3/5 * |2/3 - 0.9333|
    assert expected_calibration_error(bins) == pytest.approx(0.4 * 0.375 + 0.6 * 0.2666667, abs=1e-6)
    empty = reliability(torch.tensor([0.05]), torch.tensor([True]), 4)
    assert [b.count for b in empty] == [1, 0, 0, 0] and empty[1].accuracy is None


def test_precision_recall_match_hand_computed_values():
    predicted = torch.tensor([True, True, False, True, False])
    actual = torch.tensor([True, False, False, True, True])
    pr = precision_recall(predicted, actual)
    assert (pr.precision, pr.recall, pr.predicted, pr.actual) == (2 / 3, 2 / 3, 3, 3)
    none = precision_recall(torch.zeros(3, dtype=torch.bool), torch.tensor([True, False, False]))
    assert none.precision is None and none.recall == 0.0


def test_cost_model_matches_hand_computed_values():
    # Exits at 1 and 2 of 4 layers; a layer 1 s, a head 2 s, the final head 3 s, exit modules 0.5 s.
    costs = Costs(1.0, 2.0, 3.0, {1: 0.5, 2: 0.5}, {1: 0.1, 2: 0.1}, context=8)
    assert costs.full_token(4) == 7.0
    assert costs.index_costs([1, 2], 4, "max_prob") == pytest.approx([3.5, 7.0, 12.0])
    assert costs.index_costs([1, 2], 4, "learned") == pytest.approx([3.6, 5.2, 8.2])
    assert costs.index_costs([1, 2], 4, "oracle") == pytest.approx([3.5, 4.5, 7.0])
    assert costs.index_costs([1, 2], 4, "full") == pytest.approx([1.0, 2.0, 7.0])
    # `frequent`: each passed exit's module and frequent-token head, the whole head only where it leaves.
    frequent = Costs(1.0, 2.0, 3.0, {1: 0.5, 2: 0.5}, {1: 0.1, 2: 0.1}, context=8, frequent_head_s=0.25)
    assert frequent.index_costs([1, 2], 4, "frequent") == pytest.approx([3.75, 5.5, 8.5])
    # Half the tokens at exit 1, half through every layer: (3.5 + 12) / 2 per token vs 7.
    assert costs.speedup([0.5, 0.0, 0.5], [1, 2], 4, "max_prob") == pytest.approx(7 / 7.75)
    assert costs.speedup([0.5, 0.0, 0.5], [1, 2], 4, "oracle") == pytest.approx(7 / 5.25)


def test_catch_up_cost_matches_hand_computed_values():
    # Exits at 1 and 2 of 4 layers; one layer over 1, 2, 3 positions: 1, 1.5, 2 s (4: 2.5, extrapolated).
    costs = Costs(1.0, 2.0, 3.0, {1: 0.5, 2: 0.5}, {}, context=8, layer_rows_s=(1.0, 1.5, 2.0))
    assert costs.layer_over(4) == 2.5
    # Leaves at exit 1; the next token carries that position through layers 2-4 (3 x 0.5 s).
    assert costs.catch_up_s([0, 2], [1, 2], 4) == pytest.approx(1.5)
    # Two positions pend at layer 1; the third token carries them to layer 2 (1 layer over 3
    # positions: +1 s); the fourth carries those three through layers 3-4 (2 x 1.5 s).
    assert costs.catch_up_s([0, 0, 1, 2], [1, 2], 4) == pytest.approx(4.0)
    assert costs.catch_up_s([2, 2, 2], [1, 2], 4) == 0.0
    # Oracle costs per token [3.5, 4.5, 7.0]: (3.5 + 7.0 + 1.5 catch-up) against 2 x 7.0.
    assert costs.sequence_speedup([0, 2], [1, 2], 4, "oracle") == pytest.approx(14 / 12)
    # Unmeasured row counts: catch-up is free, and the order of the tokens does not matter.
    free = Costs(1.0, 2.0, 3.0, {1: 0.5, 2: 0.5}, {}, context=8)
    assert free.catch_up_s([0, 0, 1, 2], [1, 2], 4) == 0.0
    assert free.sequence_speedup([0, 2], [1, 2], 4, "oracle") == pytest.approx(
        free.speedup([0.5, 0.0, 0.5], [1, 2], 4, "oracle"))


def test_text_metrics_match_hand_computed_values():
    # LCS 3 of 3 predicted and 6 reference words: P 1, R 0.5, F 2/3.
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("the cat sat", ["dogs bark", "the cat sat"]) == pytest.approx(1.0)
    assert token_f1("The Cat!", "cat") == 1.0  # articles and punctuation are dropped
    assert token_f1("a big dog", "the dog barked") == pytest.approx(0.5)
    assert token_f1("nothing", ["dog", "nothing at all"]) == pytest.approx(0.5)
    assert token_agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5
    assert token_agreement([], []) == 1.0


def test_sweep_summary_matches_hand_computed_values():
    from eetune.eval.sweep import Output, Setting, SweepRow, summarise
    from eetune.infer.engine import DecodeResult

    def output(tokens, exits, decode_s, text, calls, drafted=0, accepted=0):
        mean = sum(exits) / len(exits)
        return Output(DecodeResult(tokens, exits, 5, 0.1, decode_s, 0.0, mean, drafted, accepted), text, calls)

    full = SweepRow(Setting("full"), [output([1, 2, 3, 4], [4] * 4, 1.5, "a b c", 4),
                                      output([5, 6], [4, 4], 0.5, "d", 2)])
    early = SweepRow(Setting("early_exit", 0.5), [output([1, 2, 9, 9], [1, 4, 2, 4], 0.5, "a b x", 7),
                                                  output([5, 6], [1, 1], 0.5, "d", 2)])
    summarise(full, full)
    summarise(early, full)
    assert full.tokens_per_s == pytest.approx(4 / 2.0)  # (3 + 1) decoded tokens over 1.5 + 0.5 s
    assert early.tokens_per_s == pytest.approx(4 / 1.0) and early.speedup == pytest.approx(2.0)
    assert early.mean_layers == pytest.approx((1 + 4 + 2 + 4 + 1 + 1) / 6)
    assert early.head_calls_per_token == pytest.approx(9 / 6)
    assert early.exit_counts == {1: 3, 4: 2, 2: 1}
    assert early.token_agreement == pytest.approx((2 / 4 + 1) / 2)
    assert early.rouge_l_vs_full == pytest.approx((2 / 3 + 1) / 2)  # "a b x" vs "a b c": LCS 2 of 3
    spec = SweepRow(Setting("self_speculative"), [output([1, 2, 3, 4], [3, 3, 4, 4], 1.0, "a b c", 4, 6, 3)])
    summarise(spec, SweepRow(Setting("full"), full.outputs[:1]))
    assert spec.acceptance_rate == 0.5 and spec.token_agreement == 1.0


# --- a tiny model with soft predictions, and exits tuned on it ---------------------------------


@pytest.fixture(scope="module")
def soft_tiny(tmp_path_factory) -> Path:
    """A 4-layer tiny SmolLM2 whose tied embeddings are small, so its distributions are soft
    (the default tiny model is near one-hot everywhere, which makes every policy trivial)."""
    entry = get_model_entry("smollm2_135m")
    config = tiny_hf_config(entry, num_hidden_layers=4, rope_theta=100_000.0, rope_scaling=None,
                            tie_word_embeddings=True, max_position_embeddings=2048)
    model = random_decoder(entry, config, seed=0)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(0))
    return save_hf_checkpoint(model, entry, config, tmp_path_factory.mktemp("soft") / "ckpt",
                              tokenizer=build_tiny_tokenizer())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(topics["assignment"][:6000])
    return path


def data_overrides(corpus: Path) -> list[str]:
    return ["data=text", f"data.path={corpus}", "data.seq_len=64", "data.heldout_sequences=2"]


@pytest.fixture(scope="module")
def tuned_run(soft_tiny, corpus, tmp_path_factory) -> Path:
    """Exits at 1/2/3 with linear confidence estimators, tuned 12 steps toward the final layer."""
    run_dir = tmp_path_factory.mktemp("tuned") / "run"
    tune.run(compose_config("tune", [
        f"model.checkpoint_dir={soft_tiny}", f"run_dir={run_dir}", *data_overrides(corpus), "exits.layers=[1,2,3]",
        "exits.confidence=linear", "loss.ce_target=teacher", "optim.lr=1e-2", "train.steps=12",
        "train.checkpoint_every=0",
    ]))
    return run_dir


@pytest.fixture(scope="module")
def base(soft_tiny):
    return load_base_model("smollm2_135m", checkpoint_dir=soft_tiny)


@pytest.fixture(scope="module")
def model(base, tuned_run):
    return load_exits(tuned_run, base.model, base.fingerprint)


def test_token_stats_agree_with_the_model_forward(model, base):
    batch = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    stats = token_stats(model, batch)
    with torch.no_grad():
        for layer in (1, 2, 3, 4):
            logits = torch.cat([model(seq[None, :-1], include_final=True)[layer][0] for seq in batch])
            targets = batch[:, 1:].reshape(-1)
            view = stats.layers[layer]
            torch.testing.assert_close(view.label_logprob, -F.cross_entropy(logits, targets, reduction="none"))
            assert torch.equal(view.top1, logits.argmax(-1))
            torch.testing.assert_close(view.max_prob, logits.softmax(-1).amax(-1))
            if layer < 4:
                hidden = torch.cat([model.exit_hidden(layer, model.hidden_states(s[None, :-1], [layer])[layer])[0]
                                    for s in batch])
                torch.testing.assert_close(view.learned, torch.sigmoid(model.exit(layer).confidence(hidden)))
    quality = heldout_quality(model, batch)
    assert quality[4].agreement == 1.0
    assert quality[2].cross_entropy == pytest.approx(float(-stats.layers[2].label_logprob.mean()))


@pytest.mark.parametrize("confidence", ["max_prob", "learned"])
def test_teacher_forced_policy_picks_the_layers_and_tokens_the_engine_decodes(model, base, confidence):
    """The scorer's per-token exit choice is the engine's, token for token (sampled, so tokens vary)."""
    prompt = base.tokenizer.encode("The assignment statement binds names", add_special_tokens=False)
    engine = Engine(model)
    seen: set[int] = set()
    for threshold in (0.5, 0.3, 0.15):
        settings = DecodeSettings(mode="early_exit", threshold=threshold, confidence=confidence, max_new_tokens=40,
                                  temperature=1.0, seed=3)
        result = engine.generate(prompt, settings)
        scored = PolicyScorer(model, ExitPolicy("early_exit", threshold, confidence)).score(prompt, result.tokens)
        assert scored.exit_layers == result.exit_layers
        seen |= set(result.exit_layers)
        greedy = engine.generate(prompt, DecodeSettings(mode="early_exit", threshold=threshold, confidence=confidence,
                                                        max_new_tokens=12))
        again = PolicyScorer(model, ExitPolicy("early_exit", threshold, confidence)).score(prompt, greedy.tokens)
        assert again.is_greedy and again.exit_layers == greedy.exit_layers
    assert len(seen) >= 3, f"the thresholds should send tokens to several layers, saw {sorted(seen)}"


@pytest.mark.parametrize("confidence", ["max_prob", "learned"])
def test_per_exit_thresholds_decide_as_the_scorer_does_and_skip_exits_at_one(model, base, confidence):
    """One threshold per exit: the engine's exit choice equals the teacher-forced scorer's, an exit
    whose threshold is 1.0 is never left at nor checked (no head call there), and equal per-exit
    thresholds decode exactly as the one global threshold."""
    prompt = base.tokenizer.encode("The assignment statement binds names", add_special_tokens=False)
    engine = Engine(model)
    seen: set[int] = set()
    for per_exit in [(0.5, 1.0, 0.15), (1.0, 0.3, 0.15), (0.3, 0.5, 1.0)]:
        settings = DecodeSettings(mode="early_exit", exit_thresholds=per_exit, confidence=confidence,
                                  max_new_tokens=40, temperature=1.0, seed=3)
        engine.head_calls.clear()
        result = engine.generate(prompt, settings)
        policy = ExitPolicy("early_exit", confidence=confidence, exit_thresholds=per_exit)
        assert PolicyScorer(model, policy).score(prompt, result.tokens).exit_layers == result.exit_layers
        off = model.exit_layers[per_exit.index(1.0)]
        assert off not in result.exit_layers and engine.head_calls[off] == 0
        seen |= set(result.exit_layers)
    assert len(seen) >= 3, f"the thresholds should send tokens to several layers, saw {sorted(seen)}"
    same = engine.generate(prompt, DecodeSettings(mode="early_exit", exit_thresholds=(0.3,) * 3, max_new_tokens=24))
    one = engine.generate(prompt, DecodeSettings(mode="early_exit", threshold=0.3, max_new_tokens=24))
    assert (same.tokens, same.exit_layers) == (one.tokens, one.exit_layers)


def test_first_confident_takes_one_threshold_per_exit():
    confidence = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.5, 0.8, 0.7, 0.3]])
    assert first_confident(confidence, 0.6).tolist() == [0, 1, 0, 2]
    assert first_confident(confidence, (0.95, 0.6)).tolist() == [2, 1, 1, 2]
    assert first_confident(confidence, (1.0, 0.3)).tolist() == [1, 1, 1, 1]  # exit 0 never fires
    assert first_confident(confidence, (1.0, 1.0)).tolist() == [2, 2, 2, 2]
    with pytest.raises(EetuneError, match="3 thresholds for 2 exits"):
        first_confident(confidence, (0.5, 0.5, 0.5))


def test_full_policy_log_likelihood_is_the_final_layers(model):
    context, continuation = [5, 17, 99, 42], [7, 8, 200]
    scored = PolicyScorer(model, ExitPolicy("full")).score(context, continuation)
    with torch.no_grad():
        logits = model.final_logits(model.hidden_states(torch.tensor([context + continuation[:-1]]), [4])[4])[0]
    expected = sum(float(logits[len(context) - 1 + i].log_softmax(-1)[t]) for i, t in enumerate(continuation))
    assert scored.logprob == pytest.approx(expected, abs=1e-4)
    assert scored.exit_layers == [4, 4, 4]
    # self_speculative is lossless: the same distribution as the full model.
    spec = PolicyScorer(model, ExitPolicy("self_speculative")).score(context, continuation)
    assert spec.logprob == pytest.approx(scored.logprob)


# --- tasks ---------------------------------------------------------------------------------------


def test_bundled_tasks_load():
    assert bundled_tasks() == ["mc", "qa", "summarize"]
    assert len(load_task("summarize", None, "rouge_l").items) == 10
    assert len(load_task("qa", None, "f1").items) == 10
    mc = load_task("mc", None, "exact_match")
    assert len(mc.items) == 12 and mc.items[0].choices[mc.items[0].answer] == "Paris"
    assert len(load_task("qa", None, "f1", max_items=3).items) == 3


@pytest.mark.parametrize(
    "lines, metric, message",
    [
        (['{"prompt": "a", "reference": "b"}', "", "{not json"], "rouge_l", r"bad.jsonl:3: not valid JSON"),
        (['{"prompt": "a", "reference": "b"}', '{"prompt": "a"}'], "f1", r"bad.jsonl:2: .*'reference'"),
        (['{"prompt": "", "reference": "b"}'], "f1", r"bad.jsonl:1: .*non-empty string 'prompt'"),
        (['["a"]'], "f1", r"bad.jsonl:1: expected a JSON object"),
        (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], "exact_match", r"bad.jsonl:1: 'answer' must"),
        (['{"question": "q", "choices": ["a"], "answer": 0}'], "exact_match", r"bad.jsonl:1: .*at least 2"),
        (['{"question": "q", "choices": ["a", "b"], "answer": "c"}'], "exact_match", r"bad.jsonl:1: 'answer' 'c'"),
        ([""], "rouge_l", "holds no items"),
    ],
)
def test_malformed_task_lines_fail_with_their_line_number(tmp_path, lines, metric, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EetuneError, match=message):
        load_task("bad", str(path), metric)


def test_task_file_errors_name_the_file(tmp_path):
    with pytest.raises(EetuneError, match="task file not found: .*nope.jsonl"):
        load_task("x", str(tmp_path / "nope.jsonl"), "f1")
    with pytest.raises(EetuneError, match="not a bundled task"):
        load_task("cnn", None, "rouge_l")
    with pytest.raises(EetuneError, match="metric 'bleu'"):
        load_task("qa", None, "bleu")


# --- calibration -----------------------------------------------------------------------------------


def test_pick_threshold_is_the_fastest_meeting_the_target():
    candidates = [Candidate(0.9, 0.995, 1.2), Candidate(0.8, 0.985, 1.5), Candidate(0.6, 0.90, 2.0)]
    assert pick_threshold("max_prob", candidates, 0.98).threshold == 0.8
    assert pick_threshold("max_prob", candidates, 0.99).threshold == 0.9
    # Nothing below 1.0 qualifies: the full model.
    none = pick_threshold("max_prob", candidates, 0.999)
    assert (none.threshold, none.agreement, none.speedup) == (1.0, 1.0, 1.0)
    # Slower than the full model is never "fastest"; equal speed goes to the higher threshold.
    slow = pick_threshold("max_prob", [Candidate(0.8, 1.0, 0.9)], 0.98)
    assert slow.threshold == 1.0
    tie = pick_threshold("max_prob", [Candidate(0.8, 1.0, 1.3), Candidate(0.6, 1.0, 1.3)], 0.98)
    assert tie.threshold == 0.8


def test_pick_threshold_treats_speedups_within_noise_as_ties():
    # 0.6 measures faster than 0.8, but by less than 2 standard errors: the conservative 0.8.
    noisy = [Candidate(0.8, 0.99, 1.50, 0.05), Candidate(0.6, 0.99, 1.55, 0.05)]
    assert pick_threshold("max_prob", noisy, 0.98).threshold == 0.8
    # Clearly faster (beyond the noise): 0.6.
    clear = [Candidate(0.8, 0.99, 1.50, 0.01), Candidate(0.6, 0.99, 1.60, 0.01)]
    assert pick_threshold("max_prob", clear, 0.98).threshold == 0.6
    # An early exit must beat the full model by more than its noise.
    assert pick_threshold("max_prob", [Candidate(0.8, 0.99, 1.05, 0.04)], 0.98).threshold == 1.0
    assert pick_threshold("max_prob", [Candidate(0.8, 0.99, 1.10, 0.04)], 0.98).threshold == 0.8


def test_pick_threshold_never_prefers_a_lower_threshold_that_made_the_same_decisions():
    # 0.3 measured clearly faster than 0.6, but it decoded exactly alike: the difference is noise.
    same = [Candidate(0.6, 0.99, 1.50, 0.01, "abc"), Candidate(0.3, 0.99, 1.80, 0.01, "abc")]
    assert pick_threshold("max_prob", same, 0.98).threshold == 0.6
    other = [Candidate(0.6, 0.99, 1.50, 0.01, "abc"), Candidate(0.3, 0.99, 1.80, 0.01, "abd")]
    assert pick_threshold("max_prob", other, 0.98).threshold == 0.3
    # No digest (an older caller): timing alone decides.
    assert pick_threshold("max_prob", [Candidate(0.6, 0.99, 1.5, 0.01), Candidate(0.3, 0.99, 1.8, 0.01)], 0.98).threshold == 0.3


def test_calibration_applies_only_to_its_dtype_and_device(tuned_run, base, tmp_path, monkeypatch):
    from eetune.serve.service import ServedModel

    run_dir = tmp_path / "run"
    shutil.copytree(tuned_run, run_dir)
    cals = [pick_threshold(c, [Candidate(0.35, 1.0, 1.5)], 0.98) for c in ("max_prob", "learned")]
    warnings: list[str] = []
    # The tiny model computes in float32 on the CPU.
    write_calibration(run_dir, cals, {"prompts": 12, "dtype": "float32", "device": "cpu"})
    assert calibrated_thresholds(run_dir, "float32", "cpu", warnings.append) == {"max_prob": 0.35, "learned": 0.35}
    assert warnings == []
    for other in ({"dtype": "bfloat16", "device": "cpu"}, {"dtype": "float32", "device": "cuda:0"}):
        write_calibration(run_dir, cals, {"prompts": 12, **other})
        assert calibrated_thresholds(run_dir, "float32", "cpu", warnings.append) == {}
        assert len(warnings) == 1 and warnings[0].startswith("ignoring ") and "\n" not in warnings[0]
        warnings.clear()
    # Older files do not say: used, with a warning.
    write_calibration(run_dir, cals, {"prompts": 12})
    assert calibrated_thresholds(run_dir, "float32", "cpu", warnings.append) == {"max_prob": 0.35, "learned": 0.35}
    assert len(warnings) == 1 and "older eetune" in warnings[0]

    # generate and serve: a bfloat16 calibration is not used by a float32 model, with one line on stderr.
    write_calibration(run_dir, cals, {"prompts": 12, "dtype": "bfloat16", "device": "cpu"})
    monkeypatch.setattr(loading, "load_base_model", lambda name, **kwargs: base)  # what generate loads with
    used: list[float] = []
    original = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, ids, settings, on_token=None: (
        used.append(settings.threshold), original(self, ids, settings, on_token))[1])
    cfg = compose_config("generate", ["generate.mode=early_exit", f"generate.run_dir={run_dir}",
                                      "generate.max_new_tokens=2", "generate.chat=false"])
    cfg.generate.prompt = "x = 1"
    from io import StringIO

    from eetune.console import make_console

    err = StringIO()
    generate.run(cfg, out=StringIO(), console=make_console(file=err))
    assert used == [DEFAULT_THRESHOLD]
    warning = [line for line in err.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "dtype bfloat16 (here float32)" in warning[0] and "rerun eetune eval" in warning[0]
    served = ServedModel.from_config(compose_config("serve", [
        f"model.checkpoint_dir={base.checkpoint_dir}", f"serve.run_dir={run_dir}", "serve.max_tokens=16",
        "serve.default_max_tokens=8"]))
    assert served.calibrated == {}
    write_calibration(run_dir, cals, {"prompts": 12, "dtype": "float32", "device": "cpu"})
    served = ServedModel.from_config(compose_config("serve", [
        f"model.checkpoint_dir={base.checkpoint_dir}", f"serve.run_dir={run_dir}", "serve.max_tokens=16",
        "serve.default_max_tokens=8"]))
    assert served.calibrated == {"max_prob": 0.35, "learned": 0.35}


def test_pick_threshold_keeps_per_exit_thresholds_only_where_they_beat_every_global_one():
    globals_ = [Candidate(0.9, 0.99, 1.30, 0.02, "a"), Candidate(0.6, 0.97, 1.60, 0.02, "b")]
    # Within noise of the best qualifying global threshold: the global one.
    close = Candidate(1.0, 0.99, 1.33, 0.02, "c", exit_thresholds=(0.95, 0.8, 1.0))
    assert pick_threshold("max_prob", [*globals_, close], 0.98).exit_thresholds is None
    # Clearly faster at the target: one threshold per exit.
    clear = Candidate(1.0, 0.985, 1.45, 0.02, "d", exit_thresholds=(0.95, 0.8, 1.0))
    won = pick_threshold("max_prob", [*globals_, clear], 0.98)
    assert (won.exit_thresholds, won.speedup) == ((0.95, 0.8, 1.0), 1.45)
    # Faster, but below the target agreement: not a candidate.
    wrong = Candidate(1.0, 0.95, 1.9, 0.02, "e", exit_thresholds=(0.5, 0.5, 1.0))
    assert pick_threshold("max_prob", [*globals_, wrong], 0.98).threshold == 0.9
    # It decoded exactly as a global threshold did: the same work, so the global one.
    alike = Candidate(1.0, 0.99, 1.45, 0.02, "a", exit_thresholds=(0.9, 0.9, 1.0))
    assert pick_threshold("max_prob", [*globals_, alike], 0.98).exit_thresholds is None


def test_per_exit_calibration_round_trips_into_generate(tuned_run, base, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tuned_run, run_dir)
    won = pick_threshold("max_prob", [Candidate(1.0, 0.99, 1.5, exit_thresholds=(0.5, 1.0, 0.2))], 0.98)
    write_calibration(run_dir, [won], {"prompts": 3})
    assert load_calibrated_threshold(run_dir) == (0.5, 1.0, 0.2)
    assert calibrated_thresholds(run_dir) == {"max_prob": (0.5, 1.0, 0.2)}
    used: list[tuple] = []
    original = Engine.generate

    def spy(self, prompt_ids, settings, on_token=None):
        used.append((settings.threshold, settings.exit_thresholds))
        return original(self, prompt_ids, settings, on_token)

    monkeypatch.setattr(loading, "load_base_model", lambda name, **kwargs: base)
    monkeypatch.setattr(Engine, "generate", spy)
    for overrides in ([], ["generate.threshold=0.9"], ["generate.exit_thresholds=[0.3,0.3,1.0]"]):
        cfg = compose_config("generate", ["generate.mode=early_exit", f"generate.run_dir={run_dir}",
                                          "generate.max_new_tokens=3", "generate.chat=false", *overrides])
        cfg.generate.prompt = "x = 1"
        generate.run(cfg, out=open(tmp_path / "out.txt", "w"))
    assert used == [(DEFAULT_THRESHOLD, (0.5, 1.0, 0.2)), (0.9, None), (DEFAULT_THRESHOLD, (0.3, 0.3, 1.0))]
    cfg = compose_config("generate", ["generate.mode=early_exit", f"generate.run_dir={run_dir}",
                                      "generate.exit_thresholds=[0.3,1.0]"])
    cfg.generate.prompt = "x = 1"
    with pytest.raises(EetuneError, match=r"exit_thresholds has 2 thresholds for 3 exits \(at \[1, 2, 3\]\)"):
        generate.run(cfg, out=open(tmp_path / "out.txt", "w"))


def test_per_exit_search_finds_a_faster_setting_at_the_same_agreement():
    """Exit 0 is right only when very sure, exit 1 whenever fairly sure: a global threshold must
    be strict everywhere for exit 0's sake, one per exit need not be."""
    from eetune.eval.per_exit import PerExitSearch

    torch.manual_seed(0)
    tokens = 400
    final = torch.randint(0, 50, (tokens,))
    conf0, conf1 = torch.rand(tokens), torch.rand(tokens)
    top0 = torch.where(conf0 > 0.9, final, (final + 1) % 50)
    top1_ = torch.where(conf1 > 0.4, final, (final + 1) % 50)
    costs = Costs(layer_s=1.0, head_s=0.1, final_s=1.0, exit_s={2: 0.0, 4: 0.0}, estimator_s={}, context=8)
    search = PerExitSearch(torch.stack([conf0, conf1]), torch.stack([top0, top1_, final]), costs, [2, 4], 8, "max_prob")
    start = search.point([0.9, 0.9])
    best = search.best_from(0.9, [0.9, 0.6, 0.4, 0.2])
    assert start.agreement == 1.0 and best.agreement == 1.0
    assert best.thresholds == (0.9, 0.4) and best.speedup > start.speedup
    assert search.best_of_all(0.9, [0.9, 0.6, 0.4, 0.2]) == best  # every combination: the same optimum
    # An exit at 1.0 is not checked: exactly the cost of decoding with exit 4 alone.
    alone = search.point([1.0, 0.4])
    index = [0 if c >= 0.4 else 1 for c in conf1.tolist()]
    assert alone.speedup == pytest.approx(costs.sequence_speedup(index, [4], 8, "max_prob"))


def test_calibration_round_trip_and_staleness(tuned_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tuned_run, run_dir)
    assert load_calibrated_threshold(run_dir) is None
    cal = pick_threshold("max_prob", [Candidate(0.6, 0.99, 1.4)], 0.98)
    write_calibration(run_dir, [cal], {"prompts": 3})
    assert load_calibrated_threshold(run_dir) == 0.6
    assert load_calibrated_threshold(run_dir, "learned") is None
    # Other exits (re-tuned weights) make the calibration stale.
    (run_dir / "exits.safetensors").write_bytes((run_dir / "exits.safetensors").read_bytes() + b" ")
    assert load_calibrated_threshold(run_dir) is None
    (run_dir / CALIBRATION_FILE).write_text("{oops")
    with pytest.raises(EetuneError, match="calibration.json is not valid JSON"):
        load_calibrated_threshold(run_dir)


def test_generate_defaults_to_the_calibrated_threshold(tuned_run, base, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tuned_run, run_dir)
    used: list[float] = []
    original = Engine.generate

    def spy(self, prompt_ids, settings, on_token=None):
        used.append(settings.threshold)
        return original(self, prompt_ids, settings, on_token)

    monkeypatch.setattr(loading, "load_base_model", lambda name, **kwargs: base)  # what generate loads with
    monkeypatch.setattr(Engine, "generate", spy)

    def run(*overrides):
        cfg = compose_config("generate", ["generate.mode=early_exit", f"generate.run_dir={run_dir}",
                                          "generate.max_new_tokens=3", "generate.chat=false", *overrides])
        cfg.generate.prompt = "x = 1"
        generate.run(cfg, out=open(tmp_path / "out.txt", "w"))

    run()
    write_calibration(run_dir, [pick_threshold("max_prob", [Candidate(0.35, 1.0, 1.5)], 0.98)], {})
    run()
    run("generate.threshold=0.9")
    assert used == [DEFAULT_THRESHOLD, 0.35, 0.9]


def test_a_tune_run_saved_without_the_eval_section_still_resumes(soft_tiny, corpus, tmp_path):
    """Older run dirs have no `eval` section, generate.threshold 0.8 and no parallel.dp_replicate (a field
    added later, so they ran at its default): none of it stops a resume (here one extending 1 step to 2)."""
    import yaml

    overrides = [f"model.checkpoint_dir={soft_tiny}", f"run_dir={tmp_path / 'run'}", *data_overrides(corpus),
                 "exits.layers=[1,2]", "train.steps=2", "train.checkpoint_every=1"]
    tune.run(compose_config("tune", [*overrides, "train.steps=1"]))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["eval"]
    del saved["parallel"]["dp_replicate"]
    saved["generate"]["threshold"] = 0.8
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert tune.run(compose_config("tune", [*overrides, "resume=true"])).steps == 2


# --- the stage end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(soft_tiny, corpus, tuned_run, tmp_path_factory):
    """One eval run of the tiny model (with W&B offline), on a copy of the tuned run dir."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "run"
    shutil.copytree(tuned_run, run_dir)
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_SILENT", "true")
    cfg = compose_config("eval", [
        f"model.checkpoint_dir={soft_tiny}", f"run_dir={run_dir}", *data_overrides(corpus),
        "eval.thresholds=[1.0,0.3,0.15]", "eval.max_items=2", "eval.max_new_tokens=8", "eval.timing_repeats=2",
        "eval.target_agreement=0.5", f"eval.out_dir={root / 'out'}", "logger=wandb", "logger.mode=offline",
    ])
    try:
        yield stage.run(cfg), run_dir, cfg
    finally:
        mp.undo()


def test_eval_writes_the_report_and_plots(evaluated):
    result, run_dir, _ = evaluated
    out = result.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "exits.png", "speed_quality.png", "exit_histogram.png", "reliability.png"} <= names
    for plot in result.plots.values():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.partial"))
    report = json.loads((out / "report.json").read_text())
    assert report["plots"]["speed_quality"] == "speed_quality.png"
    md = (out / "report.md").read_text()
    assert "| setting | tok/s | speedup |" in md and "| self_speculative(k=4) |" in md
    assert "![speed vs quality](speed_quality.png)" in md
    assert report["heldout"]["split"] == "tail" and "the tail of the tuning data, which tuning never saw" in md


def test_eval_per_exit_metrics_are_the_held_out_ones(evaluated, model, base, corpus):
    result, _, cfg = evaluated
    from eetune.data import heldout_batch

    quality = heldout_quality(model, heldout_batch(cfg.data, base.tokenizer))
    per_exit = {e["layer"]: e for e in result.report["per_exit"]}
    assert sorted(per_exit) == [1, 2, 3, 4] and per_exit[4]["final"]
    for layer, q in quality.items():
        assert per_exit[layer]["cross_entropy"] == pytest.approx(q.cross_entropy)
        assert per_exit[layer]["perplexity"] == pytest.approx(math.exp(q.cross_entropy))
        assert per_exit[layer]["agreement"] == pytest.approx(q.agreement)
        assert sum(b["count"] for b in per_exit[layer]["reliability"]) == result.report["heldout"]["tokens"]
    assert per_exit[1]["estimator"]["precision"] is not None and per_exit[4]["estimator"] is None
    for policy in [*result.report["policies"], result.report["oracle"]]:
        assert sum(policy["fractions"].values()) == pytest.approx(1.0)
    oracle = result.report["oracle"]
    assert oracle["agreement"] == 1.0
    # The oracle's speedup is the report's own cost model (measured times) applied to its fractions.
    c = result.report["costs"]
    costs = Costs(c["layer_s"], c["head_s"], c["final_s"], {int(k): v for k, v in c["exit_s"].items()},
                  {int(k): v for k, v in c["estimator_s"].items()}, context=c["context"])
    assert len(c["layer_rows_s"]) == 4 and c["layer_rows_s"][0] == c["layer_s"]
    exit_layers = result.report["exit_layers"]
    fractions = [oracle["fractions"][str(layer)] for layer in [*exit_layers, result.report["num_layers"]]]
    # Plus the catch-up of the layers its early tokens skipped, which the fractions alone do not give.
    no_catch_up = costs.speedup(fractions, exit_layers, result.report["num_layers"], "oracle")
    full_s = costs.full_token(result.report["num_layers"])
    assert full_s / oracle["speedup"] == pytest.approx(full_s / no_catch_up + oracle["catch_up_s"])
    assert oracle["catch_up_s"] >= 0.0
    # Tokens no exit gets right must go through every layer: the oracle's final share.
    agree_any = 1.0 - oracle["fractions"]["4"]
    assert agree_any >= max(q.agreement for layer, q in quality.items() if layer < 4) - 1e-9
    at_one = [p for p in result.report["policies"] if p["threshold"] == 1.0]
    assert all(p["speedup"] == pytest.approx(1.0) and p["agreement"] == 1.0 for p in at_one)


def test_eval_sweep_runs_every_setting_through_the_engine(evaluated):
    result, _, _ = evaluated
    sweep = {r["setting"]: r for r in result.report["sweep"]}
    searched = result.report["per_exit_thresholds"]
    per_exit = {c: [f"{c}@{'/'.join(f'{t:g}' for t in p['thresholds'])}" for p in searched.get(c, [])]
                for c in ("max_prob", "learned")}
    assert list(sweep) == ["full", "max_prob@0.3", "max_prob@0.15", *per_exit["max_prob"], "learned@0.3",
                           "learned@0.15", *per_exit["learned"], "self_speculative(k=4)"]
    # Each per-exit setting was searched from a global threshold and beats it in the cost model.
    policies = {(p["confidence"], p["threshold"]): p for p in result.report["policies"]}
    for confidence, points in searched.items():
        for p in points:
            start = policies[(confidence, p["start"])]
            assert p["agreement"] >= start["agreement"] and p["speedup"] >= 1.02 * start["speedup"]
            assert len(p["thresholds"]) == 3 and len(set(p["thresholds"])) > 1
            assert sweep[f"{confidence}@{'/'.join(f'{t:g}' for t in p['thresholds'])}"]["exit_thresholds"] == p["thresholds"]
    full = sweep["full"]
    assert full["speedup"] == 1.0 and full["mean_layers"] == 4.0 and full["token_agreement"] == 1.0
    assert full["exit_counts"] == {"4": full["tokens"]}
    # Greedy self-speculative decoding is lossless: the full model's tokens exactly (fp32).
    spec = sweep["self_speculative(k=4)"]
    assert spec["token_agreement"] == 1.0 and spec["rouge_l_vs_full"] == 1.0
    assert [o["text"] for o in spec["outputs"]] == [o["text"] for o in full["outputs"]]
    assert spec["acceptance_rate"] is not None
    for r in sweep.values():
        assert sum(r["exit_counts"].values()) == r["tokens"]
        assert set(r["task_scores"]) == {"summarize", "qa", "mc"}
        assert all(0.0 <= v <= 1.0 for v in r["task_scores"].values())
        mean_exit = sum(int(k) * v for k, v in r["exit_counts"].items()) / r["tokens"]
        if r["mode"] == "early_exit":
            assert r["mean_layers"] == pytest.approx(mean_exit)


def test_eval_calibrates_the_run_dir_and_generate_reads_it(evaluated):
    result, run_dir, _ = evaluated
    cal = json.loads((run_dir / CALIBRATION_FILE).read_text())
    chosen = cal["thresholds"]["max_prob"]
    rows = [r for r in result.report["sweep"] if r["confidence"] == "max_prob"]
    # The sweep's measured agreement, speedup and its standard error decide (rules: test_pick_threshold_*).
    candidates = [
        Candidate(1.0, r["token_agreement"], r["speedup"], r["speedup_se"], exit_thresholds=tuple(r["exit_thresholds"]))
        if r["exit_thresholds"] is not None else Candidate(r["threshold"], r["token_agreement"], r["speedup"], r["speedup_se"])
        for r in rows
    ]
    assert all(r["speedup_se"] > 0 for r in rows)
    expected = pick_threshold("max_prob", candidates, 0.5)
    assert chosen["threshold"] == expected.threshold
    assert chosen["exit_thresholds"] == (None if expected.exit_thresholds is None else list(expected.exit_thresholds))
    assert load_calibrated_threshold(run_dir) == (expected.exit_thresholds or expected.threshold)
    assert set(cal["thresholds"]) == {"max_prob", "learned"}
    assert result.report["calibration"]["thresholds"]["max_prob"]["threshold"] == expected.threshold


def test_eval_records_what_the_calibration_was_measured_on(evaluated):
    _, run_dir, _ = evaluated
    measured = json.loads((run_dir / CALIBRATION_FILE).read_text())["measured_on"]
    assert (measured["dtype"], measured["device"]) == ("float32", "cpu")
    assert measured["engine"] == {"decoding": "greedy", "batch_size": 1}
    assert measured["prompts"] == 4 and 4 <= measured["tokens"] <= 4 * 8
    assert calibrated_thresholds(run_dir, "float32", "cpu", lambda m: pytest.fail(m))


def test_eval_with_batch_size_3_reports_batch_1s_outputs(evaluated, soft_tiny, corpus, tuned_run, tmp_path):
    """The stage with eval.batch_size=3: the same texts per prompt and setting as batch 1, and
    the report and calibration say which batch size the sweep used."""
    _, _, cfg = evaluated
    run_dir = tmp_path / "run"
    shutil.copytree(tuned_run, run_dir)
    one = json.loads((evaluated[0].out_dir / "report.json").read_text())
    result = stage.run(compose_config("eval", [
        f"model.checkpoint_dir={soft_tiny}", f"run_dir={run_dir}", *data_overrides(corpus),
        "eval.thresholds=[1.0,0.3,0.15]", "eval.max_items=2", "eval.max_new_tokens=8", "eval.timing_repeats=2",
        "eval.target_agreement=0.5", f"eval.out_dir={tmp_path / 'out'}", "eval.batch_size=3",
    ]))
    three = result.report
    assert one["sweep_info"]["batch_size"] == 1 and three["sweep_info"]["batch_size"] == 3
    # The per-exit settings come from each eval's own timings of the pieces, so they may differ.
    def global_settings(report):
        return [r["setting"] for r in report["sweep"] if r["exit_thresholds"] is None]

    assert global_settings(three) == global_settings(one)
    rows = {r["setting"]: r for r in three["sweep"]}
    for a, b in ((a, rows[a["setting"]]) for a in one["sweep"] if a["setting"] in rows):
        assert b["outputs"] == a["outputs"], a["setting"]
        assert (b["exit_counts"], b["tokens"], b["token_agreement"]) == (a["exit_counts"], a["tokens"], a["token_agreement"])
        assert b["tokens_per_s"] > 0
    assert "batch 3 (full and early_exit decode 3 prompts together" in (result.out_dir / "report.md").read_text()
    measured = json.loads((run_dir / CALIBRATION_FILE).read_text())["measured_on"]
    assert measured["engine"] == {"decoding": "greedy", "batch_size": 3}


def test_eval_of_shipped_exits_writes_its_calibration_beside_the_report(
    soft_tiny, corpus, tuned_run, tmp_path, monkeypatch
):
    """A shipped (read-only) run dir is left untouched; the calibration for its exits goes to eval.out_dir."""
    import eetune.stages.eval as eval_stage

    run_dir = tmp_path / "shipped"
    shutil.copytree(tuned_run, run_dir)
    (run_dir / CALIBRATION_FILE).unlink(missing_ok=True)
    monkeypatch.setattr(eval_stage, "is_builtin", lambda path: Path(path).resolve() == run_dir.resolve())
    before = sorted(p.name for p in run_dir.iterdir())
    result = stage.run(compose_config("eval", [
        f"model.checkpoint_dir={soft_tiny}", f"run_dir={run_dir}", *data_overrides(corpus),
        "eval.thresholds=[1.0,0.3]", "eval.max_items=1", "eval.max_new_tokens=4", "eval.timing_repeats=1",
        "eval.target_agreement=0.5", "eval.self_speculative=false", f"eval.out_dir={tmp_path / 'out'}",
    ]))
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert result.calibration == tmp_path / "out" / CALIBRATION_FILE
    assert result.report["calibration"]["path"] == str(result.calibration)  # what report.md says
    written = json.loads(result.calibration.read_text())
    assert written["exits_sha256"] == exits_digest(run_dir)  # the shipped exits', not the report folder's


def test_two_calibrations_with_different_seeds_pick_the_same_threshold(soft_tiny, corpus, tuned_run, tmp_path):
    """The choice does not move with the setting order (the seed) nor with the timing noise of a
    shared machine. Thresholds 0.003, 0.002 and 0.001 lie below 1/vocab (the least a max_prob can
    be), so every token leaves at the first exit under each: the same decisions, different timings
    only, and the highest of them is picked. (Thresholds that decide even slightly differently,
    such as 0.3 and 0.2 here, differ by a real but tiny amount of work that noise can outweigh:
    that flaked in CI.)"""
    assert 0.003 < 1 / TINY_VOCAB_SIZE
    picks = []
    for seed in (0, 1):
        run_dir = tmp_path / f"run{seed}"
        shutil.copytree(tuned_run, run_dir)
        stage.run(compose_config("eval", [
            f"model.checkpoint_dir={soft_tiny}", f"run_dir={run_dir}", *data_overrides(corpus), f"seed={seed}",
            "eval.thresholds=[1.0,0.003,0.002,0.001]", "eval.tasks=[{name:summarize,metric:rouge_l},{name:qa,metric:f1}]",
            "eval.confidences=[max_prob]", "eval.self_speculative=false", "eval.timing_repeats=2", "eval.target_agreement=0.3",
            f"eval.out_dir={tmp_path / f'out{seed}'}",
        ]))
        cal = json.loads((run_dir / CALIBRATION_FILE).read_text())
        assert cal["measured_on"]["prompts"] == 12 and cal["measured_on"]["seed"] == seed
        assert cal["measured_on"]["tokens"] > 12 * 16
        candidates = cal["thresholds"]["max_prob"]["candidates"]
        assert len({c["decisions"] for c in candidates if c["threshold"] < 1.0}) == 1
        picks.append({c: t["threshold"] for c, t in cal["thresholds"].items()})
    assert picks[0] == picks[1] == {"max_prob": 0.003}


def test_the_sweep_order_follows_the_seed(model):
    from eetune.eval.sweep import Prompt, Setting, run_sweep

    order: dict[int, list[str]] = {}
    for seed in (0, 1):
        seen: list[float] = []

        class Spy(Engine):
            def generate(self, ids, settings, on_token=None):
                seen.append(settings.threshold)
                return super().generate(ids, settings, on_token)

        settings = [Setting("full"), *(Setting("early_exit", t) for t in (0.9, 0.6, 0.3, 0.15))]
        run_sweep(Spy(model), [Prompt([1, 5, 9], "t", 0)] * 3, settings, max_new_tokens=2, stop_ids=frozenset(),
                  decode=str, seed=seed)
        order[seed] = seen[2:]  # after the two warm-up calls
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]


def test_a_batched_sweep_decodes_every_prompt_as_batch_1_does(model, base):
    """eval.batch_size=3: full and early_exit decode chunks of 3 prompts together (generate_batch),
    self_speculative one at a time; every prompt's tokens, exit layers and text equal batch 1's."""
    from eetune.eval.sweep import Prompt, Setting, run_sweep

    texts = ["The assignment statement binds names", "If the target list is a single target",
             "Assignment", "An augmented assignment evaluates the target, which", "x = 1"]
    prompts = [Prompt(base.tokenizer.encode(t, add_special_tokens=False), "t", i) for i, t in enumerate(texts)]
    assert len({len(p.ids) for p in prompts}) == len(prompts)  # ragged
    settings = [Setting("full"), Setting("early_exit", 0.3), Setting("early_exit", 0.15),
                Setting("early_exit", 0.3, "learned"), Setting("self_speculative", draft_len=3)]
    batches: list[tuple[int, str, float]] = []  # (rows, setting, head calls) of each generate_batch

    class Spy(Engine):
        def generate_batch(self, prompts, settings):
            before = sum(self.head_calls.values())
            results = super().generate_batch(prompts, settings)
            batches.append((len(prompts), Setting(settings.mode, settings.threshold, settings.confidence).name,
                            sum(self.head_calls.values()) - before))
            return results

    def sweep(engine, batch_size):
        ticks = []
        rows = run_sweep(engine, prompts, settings, max_new_tokens=10, stop_ids=frozenset({2}),
                         decode=lambda ids: base.tokenizer.decode(ids), advance=lambda: ticks.append(1),
                         batch_size=batch_size)
        assert len(ticks) == len(prompts) * len(settings)
        return rows

    one = sweep(Engine(model), 1)
    engine = Spy(model, max_batch_size=3)
    three = sweep(engine, 3)
    # Warm-up (one batch of 3 under full), then 2 chunks x the 4 batchable settings.
    assert [n for n, _, _ in batches] == [3] * 5 + [2] * 4
    exits = set()
    for a, b in zip(one, three):
        assert a.setting == b.setting and len(a.outputs) == len(b.outputs) == len(prompts)
        for x, y in zip(a.outputs, b.outputs):
            assert (y.result.tokens, y.result.exit_layers, y.text) == (x.result.tokens, x.result.exit_layers, x.text)
            exits |= set(y.result.exit_layers)
        assert b.token_agreement == a.token_agreement and b.exit_counts == a.exit_counts
        assert b.mean_layers == pytest.approx(a.mean_layers)
        assert b.tokens_per_s > 0 and b.speedup > 0
    assert len(exits) >= 3, f"the thresholds should send tokens to several layers, saw {sorted(exits)}"
    # A batch's time and head calls are shared by its rows: the shares add up to the batch's totals.
    for row in three[:4]:
        assert [o.chunk for o in row.outputs] == [0, 0, 0, 1, 1]
        first = row.outputs[:3]
        assert sum(o.time_s for o in first) == pytest.approx(first[0].result.decode_s)
        assert row.head_calls_per_token > 0
    spec = three[4].outputs
    assert all(o.decode_s is None and o.time_s == o.result.decode_s for o in spec)  # decoded alone
    assert [o.chunk for o in spec] == [0, 0, 0, 1, 1]
    # Head calls: each batch's engine count, whole, over its rows.
    for n, name, calls in batches[1:]:
        row = next(r for r in three if r.setting.name == name)
        rows = row.outputs[:3] if n == 3 else row.outputs[3:]
        assert sum(o.head_calls for o in rows) == pytest.approx(calls)


def test_eval_logs_tables_and_images_to_wandb(evaluated, read_wandb_records):
    from eetune.eval.report import sweep_table

    result, _, _ = evaluated
    offline = list((result.out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    logged: dict[str, dict[str, object]] = {}  # key -> {field: value} of each logged media object
    summary: set[str] = set()
    for record in read_wandb_records(offline[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                if len(item.nested_key) == 2:
                    logged.setdefault(item.nested_key[0], {})[item.nested_key[1]] = json.loads(item.value_json)
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    for key in ("eval/sweep", "eval/per_exit", "eval/policies", "eval/estimator", "eval/costs"):
        assert logged[key]["_type"] == "table-file", key
    for key in ("eval/exits", "eval/speed_quality", "eval/exit_histogram", "eval/reliability"):
        assert logged[key]["_type"] == "image-file", key
    # The logged sweep table holds exactly the report's main table.
    table = json.loads((offline[0].parent / "files" / logged["eval/sweep"]["path"]).read_text())
    header, rows = sweep_table(result.report)
    assert table["columns"] == header and table["data"] == rows
    assert "eval/oracle_speedup" in summary and "eval/speedup/max_prob@0.3" in summary


# --- config and bad input: one line, exit 2, before any model loads ---------------------------------


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes_for_eval_and_takes_the_eval_group(recipe):
    extra = ["data.path=/data/train.jsonl", "model.checkpoint_dir=/ckpt", "run_dir=runs/x"]
    cfg = compose_config("eval", [f"recipe={recipe}", *extra])
    assert cfg.stage == "eval" and list(cfg.eval.thresholds) == [1.0, 0.9, 0.8, 0.6, 0.4, 0.2]
    assert [t.name for t in cfg.eval.tasks] == ["summarize", "qa", "mc"]
    quick = compose_config("eval", [f"recipe={recipe}", *extra, "eval=quick"])
    assert list(quick.eval.thresholds) == [1.0, 0.8, 0.4] and quick.eval.max_items == 3


def test_eval_print_config_shows_a_custom_task(monkeypatch, capsys):
    import yaml

    monkeypatch.setattr(sys, "argv", ["eetune", "eval", "run_dir=runs/x", "eval.tasks=[{name:qa2,path:/d/qa.jsonl,metric:f1}]",
                                      "eval.thresholds=[0.7]", "--print-config"])
    main()
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["stage"] == "eval" and cfg["run_dir"] == "runs/x" and cfg["eval"]["thresholds"] == [0.7]
    assert cfg["eval"]["tasks"] == [{"name": "qa2", "path": "/d/qa.jsonl", "metric": "f1"}]


def test_bad_eval_input_is_one_line_and_exit_2(run_cli, tuned_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": 3, "reference": "b"}\n')
    cases = [
        (["run_dir=/nope/run"], "run dir not found: /nope/run"),
        ([f"run_dir={tuned_run}", "eval.thresholds=[0.8,1.5]"], "eval.thresholds has 1.5"),
        ([f"run_dir={tuned_run}", "eval.thresholds=[0]"], "eval.thresholds has 0"),
        ([f"run_dir={tuned_run}", "eval.tasks=[{name:x,path:/nope/x.jsonl,metric:f1}]"], "task file not found"),
        ([f"run_dir={tuned_run}", f"eval.tasks=[{{name:x,path:{bad},metric:f1}}]"], f"{bad}:2:"),
        ([f"run_dir={tuned_run}", "eval.confidences=[max_prob,entropy]"], "eval.confidences has 'entropy'"),
        ([f"run_dir={tuned_run}", "eval.tasks=[{name:mc,metric:exact_match}]"], "no generation task"),
        ([f"run_dir={tuned_run}", "eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
    ]
    for overrides, message in cases:
        code, _, err = run_cli("eval", *overrides)
        assert code == 2, (overrides, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
