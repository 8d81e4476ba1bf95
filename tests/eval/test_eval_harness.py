"""The lm-evaluation-harness model type `eetune`, on tasks defined from local files,
through lm-eval's Python API and once through its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.eval.scoring import ExitPolicy, PolicyScorer
from eetune.exits import load_exits
from eetune.infer.engine import DecodeSettings, Engine
from eetune.models import get_model_entry, load_base_model
from eetune.models.checkpoint import save_hf_checkpoint
from eetune.models.tiny import build_tiny_tokenizer, random_decoder, tiny_hf_config
from eetune.stages import tune

lm_eval = pytest.importorskip("lm_eval")
from eetune.eval import harness  # noqa: E402  (registers the model type)

REPO = Path(__file__).resolve().parents[2]
MC_ITEMS = [
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome"], "answer": 1},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight"], "answer": 1},
    {"question": "What do bees make?", "choices": ["milk", "honey", "silk", "wool"], "answer": 1},
    {"question": "What is frozen water called?", "choices": ["steam", "ice"], "answer": 1},
    {"question": "Which season follows winter?", "choices": ["spring", "autumn", "summer"], "answer": 0},
]
QA_ITEMS = [
    {"question": "Where was Anna born?", "answer": "Lisbon"},
    {"question": "What is the dog called?", "answer": "Biscuit"},
]
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Soft-output tiny model (see test_eval) with three tuned exits."""
    root = tmp_path_factory.mktemp("harness")
    entry = get_model_entry("smollm2_135m")
    config = tiny_hf_config(entry, num_hidden_layers=4, rope_theta=100_000.0, rope_scaling=None,
                            tie_word_embeddings=True, max_position_embeddings=2048)
    model = random_decoder(entry, config, seed=0)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(0))
    checkpoint = save_hf_checkpoint(model, entry, config, root / "ckpt", tokenizer=build_tiny_tokenizer())
    from pydoc_data.topics import topics

    (root / "corpus.txt").write_text(topics["assignment"][:6000])
    tune.run(compose_config("tune", [
        f"model.checkpoint_dir={checkpoint}", f"run_dir={root / 'run'}", "data=text", f"data.path={root / 'corpus.txt'}",
        "data.seq_len=64", "exits.layers=[1,2,3]", "loss.ce_target=teacher", "optim.lr=1e-2", "train.steps=6",
        "train.checkpoint_every=0",
    ]))
    return root / "run"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two lm-eval YAML tasks reading local JSONL through the `json` dataset builder."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    (root / "qa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in QA_ITEMS))
    (root / "eetune_test_mc.yaml").write_text(textwrap.dedent(f"""\
        task: eetune_test_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - metric: acc
        """))
    (root / "eetune_test_qa.yaml").write_text(textwrap.dedent(f"""\
        task: eetune_test_qa
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'qa.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: answer
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return root


@pytest.fixture(scope="module")
def tiny(run_dir):
    cfg = compose_config("tune", [f"model.checkpoint_dir={run_dir.parent / 'ckpt'}"])
    base = load_base_model("smollm2_135m", checkpoint_dir=cfg.model.checkpoint_dir)
    return base, load_exits(run_dir, base.model, base.fingerprint)


@pytest.fixture(scope="module")
def evaluated(run_dir, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return simple_evaluate(
        model="eetune",
        model_args=f"run_dir={run_dir},mode=early_exit,threshold={THRESHOLD}",
        tasks=["eetune_test_mc", "eetune_test_qa"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        device="cpu",
    )


def expected_choice_scores(base, model, item: dict) -> list[tuple[float, bool]]:
    """Our own scoring of each choice: lm-eval's encode-the-whole-then-split, the policy's log-likelihood."""
    scorer = PolicyScorer(model, ExitPolicy("early_exit", THRESHOLD))
    context_text = f"Question: {item['question']}\nAnswer:"
    context = base.tokenizer.encode(context_text, add_special_tokens=False)
    out = []
    for choice in item["choices"]:
        whole = base.tokenizer.encode(context_text + " " + choice, add_special_tokens=False)
        scored = scorer.score(context, whole[len(context):])
        out.append((scored.logprob, scored.is_greedy))
    return out


def test_multiple_choice_through_simple_evaluate_scores_with_the_exit_policy(evaluated, tiny):
    base, model = tiny
    samples = sorted(evaluated["samples"]["eetune_test_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for sample in samples:
        expected = expected_choice_scores(base, model, MC_ITEMS[sample["doc_id"]])
        got = [tuple(r) for r in sample["filtered_resps"]]
        assert [g[1] for g in got] == [e[1] for e in expected]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
        scores = [e[0] for e in expected]
        correct += int(scores.index(max(scores)) == MC_ITEMS[sample["doc_id"]]["answer"])
    assert len(samples) == len(MC_ITEMS)
    assert evaluated["results"]["eetune_test_mc"]["acc,none"] == pytest.approx(correct / len(MC_ITEMS))


def test_generate_until_through_simple_evaluate_is_the_engines_output(evaluated, tiny):
    base, model = tiny
    engine = Engine(model)
    samples = sorted(evaluated["samples"]["eetune_test_qa"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QA_ITEMS)
    for sample in samples:
        context, gen_kwargs = sample["arguments"][0]
        assert gen_kwargs["max_gen_toks"] == 6
        ids = base.tokenizer.encode(context, add_special_tokens=False)
        result = engine.generate(ids, DecodeSettings(mode="early_exit", threshold=THRESHOLD, max_new_tokens=6,
                                                     stop_ids=frozenset({2})))
        text = base.tokenizer.decode(result.tokens, skip_special_tokens=True).split("\n\n")[0]
        assert sample["resps"] == [[text]]
    info = evaluated["config"]
    assert info["eetune_mode"] == "early_exit" and info["eetune_threshold"] == THRESHOLD
    assert sum(info["eetune_exit_counts"].values()) > 0


def final_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Sum of the full model's log p(continuation | context), straight from one forward."""
    tokens = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logprobs = model.final_logits(model.hidden_states(tokens, [model.num_layers])[model.num_layers])[0].log_softmax(-1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_loglikelihood_rolling_scores_every_token_once_within_max_length(run_dir, tiny):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    base, model = tiny
    text = "The quick brown fox jumps over the lazy dog."
    ids = base.tokenizer.encode(text, add_special_tokens=False)
    bos = base.tokenizer.bos_token_id

    class Request:
        args = (text,)

    # One window when it fits: exactly the log-likelihood of the text after BOS.
    (whole,) = harness.EetuneLM(run_dir=str(run_dir), mode="full").loglikelihood_rolling([Request()])
    assert whole == pytest.approx(final_logprob(model, [bos], ids), abs=1e-4)
    # Windows of 16 positions: each token is predicted once, with at most 16 tokens of input.
    (rolled,) = harness.EetuneLM(run_dir=str(run_dir), mode="full", max_length=16).loglikelihood_rolling([Request()])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, bos, 16, 1)]
    assert len(windows) > 1 and sum(len(c) for _, c in windows) == len(ids)
    assert rolled == pytest.approx(sum(final_logprob(model, list(a), list(b)) for a, b in windows), abs=1e-4)
    assert rolled != pytest.approx(whole, abs=1e-3)  # a shorter context changes the numbers


def test_self_speculative_generation_is_the_full_models(run_dir):
    class Request:
        args = ("Q: What do bees make?\nA:", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})

    full = harness.EetuneLM(run_dir=str(run_dir), mode="full").generate_until([Request()])
    spec = harness.EetuneLM(run_dir=str(run_dir), mode="self_speculative", draft_len=3).generate_until([Request()])
    assert spec == full and full[0]


class Request:
    def __init__(self, *args):
        self.args = args


def spy_batches(lm) -> list[int]:
    """Rows of each engine.generate_batch call of this EetuneLM."""
    sizes: list[int] = []
    generate_batch = lm.engine.generate_batch

    def spy(prompts, settings):
        sizes.append(len(prompts))
        return generate_batch(prompts, settings)

    lm.engine.generate_batch = spy
    return sizes


GEN_REQUESTS = [
    ("Q: What do bees make?\nA:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
    ("The assignment statement binds names to objects, and", {"until": ["."], "max_gen_toks": 6}),
    ("Q: Where was Anna born?\nA:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
    ("x", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
    ("If the target list is a single target", {"until": ["."], "max_gen_toks": 6}),
    ("Q: Which season follows winter? Think of the months.\nA:", {"until": ["\n\n"], "max_gen_toks": 8,
                                                                   "do_sample": False}),
    ("Assignment", {"until": ["."], "max_gen_toks": 6}),
]


@pytest.mark.parametrize("mode", ["full", "early_exit"])
def test_batched_generate_until_equals_batch_1(run_dir, mode):
    """batch_size=3: requests grouped by their generation kwargs decode 3 at a time (ragged
    prompts), and every text, in the requests' order, is batch 1's."""
    requests = [Request(*args) for args in GEN_REQUESTS]
    one = harness.EetuneLM(run_dir=str(run_dir), mode=mode, threshold=THRESHOLD)
    three = harness.EetuneLM(run_dir=str(run_dir), mode=mode, threshold=THRESHOLD, batch_size=3)
    assert spy_batches(one) == []
    sizes = spy_batches(three)
    expected = one.generate_until(requests)
    got = three.generate_until(requests)
    assert got == expected and sum(bool(t) for t in got) >= 5
    # Groups of 4 and 3 requests, 3 at a time: the 4th of the first group decodes alone (generate).
    assert sizes == [3, 3]
    assert three.exit_counts == one.exit_counts and three.decoded_tokens == one.decoded_tokens
    assert three.get_model_info()["eetune_batch_size"] == 3
    if mode == "early_exit":
        assert len(one.exit_counts) >= 2  # some tokens left early


def test_self_speculative_and_sampled_requests_decode_one_at_a_time(run_dir):
    requests = [Request(*args) for args in GEN_REQUESTS[:4]]
    spec_one = harness.EetuneLM(run_dir=str(run_dir), mode="self_speculative", draft_len=3)
    spec = harness.EetuneLM(run_dir=str(run_dir), mode="self_speculative", draft_len=3, batch_size=3)
    sizes = spy_batches(spec)
    assert spec.generate_until(requests) == spec_one.generate_until(requests) and sizes == []
    sampled = [Request(c, {**k, "do_sample": True, "temperature": 1.0}) for c, k in GEN_REQUESTS[:4]]
    lm_one = harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=THRESHOLD, seed=5)
    lm = harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=THRESHOLD, seed=5, batch_size=3)
    sizes = spy_batches(lm)
    assert lm.generate_until(sampled) == lm_one.generate_until(sampled) and sizes == []


def test_batched_loglikelihood_equals_batch_1(run_dir, tiny):
    """batch_size=3: ragged (context, continuation) pairs scored 3 per forward (right padding);
    each logprob and is_greedy is batch 1's; rolling windows too."""
    base, model = tiny
    engine = Engine(model)
    texts = ["Question: What is the capital of France?\nAnswer:", "The", "An augmented assignment evaluates",
             "Question: How many legs does a spider have?\nAnswer:", "x = 1", "If the target list"]
    requests = []
    for i, text in enumerate(texts):
        context = base.tokenizer.encode(text, add_special_tokens=False)
        greedy = engine.generate(context, DecodeSettings(mode="early_exit", threshold=THRESHOLD,
                                                         max_new_tokens=1 + i % 4)).tokens
        other = base.tokenizer.encode(" Paris is nice", add_special_tokens=False)[: 1 + i % 3]
        requests += [(None, context, greedy), (None, context, other)]
    one = harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=THRESHOLD)
    three = harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=THRESHOLD, batch_size=3)
    calls: list[int] = []
    score_batch = three.scorer.score_batch
    three.scorer.score_batch = lambda pairs: calls.append(len(pairs)) or score_batch(pairs)
    expected = one._loglikelihood_tokens(requests)
    got = three._loglikelihood_tokens(requests)
    assert calls == [3, 3, 3, 3]
    assert [g[1] for g in got] == [e[1] for e in expected] and sum(e[1] for e in expected) >= 6
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)
    # Rolling: windows of 16 positions, batched across requests.
    rolling = [Request("The quick brown fox jumps over the lazy dog. " * 2), Request("Short text."),
               Request("Assignment statements are used to (re)bind names to values.")]
    one = harness.EetuneLM(run_dir=str(run_dir), mode="full", max_length=16)
    three = harness.EetuneLM(run_dir=str(run_dir), mode="full", max_length=16, batch_size=3)
    assert three.loglikelihood_rolling(rolling) == pytest.approx(one.loglikelihood_rolling(rolling), abs=1e-5)


def test_batch_size_comes_from_lm_evals_flags_or_model_args(run_dir):
    args = f"run_dir={run_dir},mode=full"
    flags = {"batch_size": 4, "max_batch_size": None, "device": "cpu"}
    assert harness.EetuneLM.create_from_arg_string(args, flags).batch_size == 4
    # lm-eval's CLI always passes its --batch_size (default 1): model_args win.
    assert harness.EetuneLM.create_from_arg_string(args + ",batch_size=3", {**flags, "batch_size": 1}).batch_size == 3
    assert harness.EetuneLM.create_from_arg_obj({"run_dir": str(run_dir)}, {"batch_size": "2"}).batch_size == 2
    assert harness.EetuneLM.create_from_arg_string(args, {"batch_size": "auto"}).batch_size == harness.AUTO_BATCH_SIZE
    assert harness.EetuneLM.create_from_arg_string(args, {"batch_size": "auto:4", "max_batch_size": 2}).batch_size == 2
    lm = harness.EetuneLM.create_from_arg_string(args, {"batch_size": 5})
    assert lm.engine.max_batch_size == 5
    for bad in (0, "-1", "big"):
        with pytest.raises(EetuneError, match="must be a positive integer or auto"):
            harness.EetuneLM(run_dir=str(run_dir), batch_size=bad)


def test_simple_evaluate_with_batch_size_3_gives_batch_1s_answers(run_dir, task_dir, evaluated):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    batched = simple_evaluate(
        model="eetune", model_args=f"run_dir={run_dir},mode=early_exit,threshold={THRESHOLD}",
        tasks=["eetune_test_mc", "eetune_test_qa"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, device="cpu", batch_size=3,
    )
    assert batched["config"]["eetune_batch_size"] == 3
    for task in ("eetune_test_mc", "eetune_test_qa"):
        one = sorted(evaluated["samples"][task], key=lambda s: s["doc_id"])
        three = sorted(batched["samples"][task], key=lambda s: s["doc_id"])
        for a, b in zip(one, three, strict=True):
            if task == "eetune_test_qa":
                assert b["resps"] == a["resps"]
            else:
                assert [r[1] for r in b["filtered_resps"]] == [r[1] for r in a["filtered_resps"]]
                assert [r[0] for r in b["filtered_resps"]] == pytest.approx([r[0] for r in a["filtered_resps"]], abs=1e-5)
        assert batched["results"][task] == evaluated["results"][task]


def test_bad_model_args_are_one_line_errors(run_dir):
    with pytest.raises(EetuneError, match="needs run_dir"):
        harness.EetuneLM()
    with pytest.raises(EetuneError, match="threshold must be in"):
        harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=1.5)
    with pytest.raises(EetuneError, match="run dir not found"):
        harness.EetuneLM(run_dir="/nope/run")
    with pytest.raises(EetuneError, match="needs an estimator on every exit"):
        harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=0.5, confidence="learned")
    with pytest.raises(EetuneError, match="give one threshold per exit joined by '/'"):
        harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", exit_thresholds="0.5,0.4")
    with pytest.raises(EetuneError, match="both threshold and exit_thresholds"):
        harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", threshold=0.5, exit_thresholds="0.5/0.5")


def test_per_exit_thresholds_from_model_args_decode_as_the_engine(run_dir, tiny):
    base, model = tiny
    per_exit = tuple([THRESHOLD] * (len(model.exit_layers) - 1) + [1.0])
    lm = harness.EetuneLM(run_dir=str(run_dir), mode="early_exit", exit_thresholds="/".join(map(str, per_exit)))
    assert lm.policy.exit_thresholds == per_exit
    ids = base.tokenizer.encode("Question: what is two plus two?", add_special_tokens=False)
    settings = lm._settings(8, 0.0)
    assert settings.exit_thresholds == per_exit
    expected = Engine(model).generate(ids, DecodeSettings(mode="early_exit", exit_thresholds=per_exit,
                                                          max_new_tokens=8, stop_ids=settings.stop_ids))
    assert lm.engine.generate(ids, settings).tokens == expected.tokens
    info = lm.get_model_info()
    assert (info["eetune_threshold"], info["eetune_exit_thresholds"]) == (None, list(per_exit))


def test_lm_eval_command_line_runs_the_eetune_model(run_dir, task_dir, evaluated, tmp_path):
    """`eetune lm-eval` is lm-eval's own CLI (legacy form, no subcommand) with the model registered."""
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "eetune.cli", "lm-eval", "--model", "eetune",
         "--model_args", f"run_dir={run_dir},mode=early_exit,threshold={THRESHOLD}",
         "--tasks", "eetune_test_mc", "--include_path", str(task_dir), "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["eetune_test_mc"]["acc,none"] == evaluated["results"]["eetune_test_mc"]["acc,none"]
    assert results["config"]["model"] == "eetune"
