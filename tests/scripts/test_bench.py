"""The arithmetic the benchmarks draw conclusions from (scripts/bench/), on hand-made timings."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
import confidence_frontier  # noqa: E402
import decode_profile  # noqa: E402
import prompt_diversity  # noqa: E402
import serve_load  # noqa: E402
import tuning_curves  # noqa: E402

from eetune.eval.timing import Costs  # noqa: E402


class _Model:
    exit_layers = [8]
    num_layers = 20


# Seconds: a layer costs 1/32, so a full token (20 layers + final head 0.375) costs 1 and layers
# 1..8 cost 0.25; the vocab head 0.25, a 100-token draft head 0.05, the exit module nothing.
COSTS = Costs(layer_s=1 / 32, head_s=0.25, final_s=0.375, exit_s={8: 0.0, 16: 0.0}, estimator_s={}, context=8)
PIECES = {"draft_head": 0.05, "verify": {"8:1": 1.0}}


def test_self_speculative_break_even_acceptance():
    full_vocab, small_vocab = decode_profile._speculative_costs(
        _Model(), COSTS, PIECES, "8:1,16:2", 100, {"8:1:100": 0.6}
    )
    # k=1: one draft (0.25 + 0.25) + the last draft's layers (0.25) + verify (1.0) = 1.75 full tokens
    # for 1 + r tokens: break-even at r = 0.75; even r = 1 gives 2 / 1.75 < 1.4x.
    assert full_vocab["round_cost_in_full_tokens"] == pytest.approx(1.75)
    assert full_vocab["max_speedup_all_accepted"] == pytest.approx(2 / 1.75)
    assert full_vocab["acceptance_for_1x"] == pytest.approx(0.75, abs=1e-9)
    assert full_vocab["acceptance_for_1_4x"] is None
    assert full_vocab["measured_acceptance"] is None
    # A 100-token draft head: 0.25 + 0.05 + 0.25 + 1.0 = 1.55 -> break-even at r = 0.55.
    assert small_vocab["draft_vocab"] == 100
    assert small_vocab["acceptance_for_1x"] == pytest.approx(0.55, abs=1e-9)
    assert small_vocab["measured_acceptance"] == 0.6


def test_exit_costs_charge_max_prob_a_head_per_check_and_learned_only_where_it_leaves():
    costs = decode_profile._exit_costs([8, 16], 20, COSTS)
    assert costs["head_in_layers"] == pytest.approx(8.0)
    # exit 8: 0.25 of layers + one head; exit 16: 0.5 + two heads (max_prob) or one (learned);
    # no exit: the full token + two heads (max_prob) or none (learned).
    assert costs["max_prob"] == pytest.approx({"exit_8": 0.5, "exit_16": 1.0, "no_exit": 1.5})
    assert costs["learned"] == pytest.approx({"exit_8": 0.5, "exit_16": 0.75, "no_exit": 1.0})


def test_confidence_frontier_costs_a_check_per_passed_exit_and_a_head_where_a_token_leaves():
    import torch

    # Exit 8 leaves after 8 layers (0.25), exit 16 after 16 (0.5); each passed check (a frequent-token
    # head) 0.05, the whole head 0.25 where a token leaves.
    costs = dataclasses.replace(COSTS, frequent_head_s=0.05)
    per_index = costs.index_costs([8, 16], 20, "frequent")
    assert per_index == pytest.approx([0.55, 0.85, 20 / 32 + 0.1 + 0.375])
    confidence = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.95, 0.1]])  # [exit, token]
    top1 = torch.tensor([[1, 2, 3], [1, 5, 3], [1, 5, 4]])  # [exit 8, exit 16, final] x token
    points = confidence_frontier.frontier(confidence, top1, top1[2], costs, [8, 16], 20, "frequent")
    at_half = next(p for p in points if p["threshold"] == 0.5)
    # Tokens leave at 8, 16, 8; the third disagrees with the final layer.
    assert at_half["fractions"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert at_half["agreement"] == pytest.approx(2 / 3)
    assert at_half["speedup"] == pytest.approx(1 / (2 / 3 * 0.55 + 1 / 3 * 0.85))
    # A layer over 2 positions costing 2 layers: token 2 carries token 1's position through layers 9-16.
    linear = dataclasses.replace(costs, layer_rows_s=(1 / 32, 2 / 32))
    points = confidence_frontier.frontier(confidence, top1, top1[2], linear, [8, 16], 20, "frequent")
    carried = next(p for p in points if p["threshold"] == 0.5)
    assert carried["speedup"] == pytest.approx(3 / (0.55 + 0.85 + 0.55 + 8 / 32))
    assert confidence_frontier.best_at(points, 1.0)["threshold"] > 0.5  # only stricter thresholds agree fully
    assert confidence_frontier.best_at(points, 1.01) is None
    # One threshold per exit: the same one everywhere is the global threshold's point; 1.0 shuts an exit.
    per_exit = {tuple(p["thresholds"]): p for p in
                confidence_frontier.per_exit_frontier(confidence, top1, costs, [8, 16], 20, "frequent")}
    assert per_exit[(0.5, 0.5)]["speedup"] == pytest.approx(at_half["speedup"])
    assert per_exit[(0.5, 0.5)]["agreement"] == pytest.approx(at_half["agreement"])
    # Exit 8 at 0.9 (token 1 only), exit 16 at 0.5 (token 2): all three agree, faster than full.
    assert per_exit[(0.9, 0.5)]["agreement"] == 1.0
    assert per_exit[(0.9, 0.5)]["speedup"] == pytest.approx(1 / ((0.55 + 0.85 + per_index[2]) / 3))
    # An exit at 1.0 is never checked, as in the engine: no check cost there; none checked is the full model.
    only_16 = costs.index_costs([16], 20, "frequent")
    assert only_16 == pytest.approx([0.8, 20 / 32 + 0.05 + 0.375])
    assert per_exit[(1.0, 0.5)]["speedup"] == pytest.approx(1 / ((only_16[1] + only_16[0] + only_16[1]) / 3))
    assert per_exit[(1.0, 1.0)]["speedup"] == 1.0


def test_confidence_frontier_what_if_is_the_oracle_of_exits_that_agree_that_often():
    # Exits at 8 and 16 of 20 layers (a layer 1/32 s, head 0.25 s, final head 0.375 s, modules free).
    rows = {tuple(r["agreement"]): r for r in confidence_frontier.what_if(COSTS, [8, 16], 20, tokens=4000)}
    full = COSTS.full_token(20)
    for agreement, row in rows.items():
        # Leaving at 8 costs 8 layers + a head, at 16 16 layers + a head; catch-up free (unmeasured rows).
        expected = agreement[0] * (0.25 + 0.25) + (agreement[1] - agreement[0]) * (0.5 + 0.25) + (1 - agreement[1]) * full
        assert row["oracle_without_catch_up"] == pytest.approx(full / expected, rel=0.03)
        assert row["oracle"] == pytest.approx(row["oracle_without_catch_up"])
    carried = confidence_frontier.what_if(dataclasses.replace(COSTS, layer_rows_s=(1 / 32, 2 / 32)), [8, 16], 20)
    assert all(r["oracle"] < r["oracle_without_catch_up"] for r in carried)


def _row(concurrency, mode, max_batch_size, tokens_per_s, p95):
    return {"concurrency": concurrency, "mode": mode, "max_batch_size": max_batch_size, "requests": 4, "errors": 0,
            "tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 64,
            "latency_s": {"p50": p95 / 2, "p95": p95}, "ttft_s": {"p50": 0.1, "p95": p95 / 4}}


def test_serve_load_defaults_and_the_decode_py_call():
    args = serve_load.parse_args(["--run-dir", "runs/x", "--dtype", "float32", "--out", "/tmp/out"])
    assert args.concurrency == [1, 2, 4, 8, 16]
    assert args.max_batch_sizes == [1, 8]
    assert args.modes == ["full", "early_exit", "self_speculative"]
    assert (args.requests, args.max_tokens, args.dtype) == (4, 64, "float32")
    args = serve_load.parse_args(["--concurrency", "2,1,2", "--max-batch-sizes", "8"])
    assert (args.concurrency, args.max_batch_sizes, args.modes) == ([2, 1], [8], ["full"])
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--modes", "early_exit"])  # needs --run-dir
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--concurrency", "0"])


def test_serve_load_ratios_against_the_one_at_a_time_server_and_full():
    cases = [
        _row(4, "full", 1, 20.0, 10.0),
        _row(4, "full", 8, 60.0, 4.0),
        _row(4, "early_exit", 1, 25.0, 8.0),
        _row(4, "early_exit", 8, 24.0, 8.0),
        _row(8, "full", 8, 80.0, 6.0),  # no max_batch_size=1 row at 8 clients
    ]
    serve_load.add_ratios(cases, 1)
    full1, full8, ee1, ee8, full8_alone = cases
    assert full8["vs_baseline_server"] == pytest.approx(
        {"max_batch_size": 1, "tokens_per_s": 3.0, "latency_p95": 0.4, "ttft_p95": 0.4})
    assert full1["vs_baseline_server"]["tokens_per_s"] == pytest.approx(1.0)
    assert ee8["vs_baseline_server"]["tokens_per_s"] == pytest.approx(24 / 25)
    assert ee1["vs_full_tokens_per_s"] == pytest.approx(1.25)
    assert ee8["vs_full_tokens_per_s"] == pytest.approx(0.4)
    assert full8["vs_full_tokens_per_s"] == pytest.approx(1.0)
    assert full8_alone["vs_baseline_server"]["tokens_per_s"] is None
    assert full8_alone["vs_baseline_server"]["latency_p95"] is None


def test_serve_load_plot_and_table(tmp_path):
    settings = {"concurrency": [1, 4], "max_batch_sizes": [1, 8], "modes": ["full", "early_exit"],
                "requests": 4, "max_tokens": 64, "dtype": "float32"}
    cases = [_row(c, m, b, 10.0 * c * (b > 1) + 5, 1.0 * c) for c in (1, 4) for m in ("full", "early_exit")
             for b in (1, 8)]
    cases[0]["latency_s"]["p95"] = None  # a round where every request failed still plots
    serve_load.add_ratios(cases, 1)
    png = serve_load.plot(cases, settings, tmp_path / "serve_load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for c in cases:
        c["server"] = {"decode_tokens_per_s_mean": None, "mean_layers_mean": None, "acceptance_rate_mean": None,
                       "queue_s": {"p50": None, "p95": None}}
    from rich.console import Console

    console = Console(record=True, width=250)
    serve_load.print_report(console, cases, settings, 30)
    text = console.export_text()
    assert "vs mbs1" in text and "3.00x" in text


def _tune_run(run_dir: Path, batch_size: int, evaluations: dict[int, float]) -> Path:
    """A run dir as tune leaves it: config.yaml and metrics.jsonl with held-out evaluations."""
    import json

    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"data:\n  batch_size: {batch_size}\n  seq_len: 256\noptim:\n  grad_accum: 2\n")
    lines = []
    for step, agreement in evaluations.items():
        lines.append({"step": step, "loss": 1.0})  # a training step: no held-out keys
        lines.append({"step": step, "heldout_agreement/exit_8": agreement, "heldout_ce/exit_8": 4.0 - agreement,
                      "heldout_agreement/exit_30": 1.0, "heldout_ce/exit_30": 1.7})
    lines.append({"step": max(evaluations), "heldout_agreement/exit_8": 0.5, "heldout_ce/exit_8": 3.5,
                  "heldout_agreement/exit_30": 1.0, "heldout_ce/exit_30": 1.7})  # the final record repeats the step
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_tuning_curves_puts_runs_on_tokens_seen_and_keeps_each_steps_last_evaluation(tmp_path):
    import json

    small = _tune_run(tmp_path / "small", 8, {0: 0.0, 50: 0.3, 100: 0.4})
    big = _tune_run(tmp_path / "big", 4, {0: 0.0, 100: 0.35})
    tuning_curves.main(["--run", f"small=x2={small}", "--run", f"big={big}", "--out", str(tmp_path / "out")])
    runs = json.loads((tmp_path / "out" / "tuning_curves.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["small=x2", "big"]  # a label may hold '='; the path follows the last
    assert [r["tokens_per_step"] for r in runs] == [8 * 256 * 2, 4 * 256 * 2]
    assert [(p["step"], p["tokens_seen"], p["agreement"]["8"]) for p in runs[0]["curve"]] == [
        (0, 0, 0.0), (50, 50 * 4096, 0.3), (100, 100 * 4096, 0.5)]
    table = (tmp_path / "out" / "tuning_curves.md").read_text()
    assert "| exit 8 |" in table and "exit 30" not in table  # the final layer is the reference, not a column
    assert "| big | 100 | 0.20M | 50.0% (3.50) |" in table
    assert (tmp_path / "out" / "tuning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        tuning_curves.main(["--run", str(big), "--out", str(tmp_path / "out")])  # no label


def test_prompt_diversity_sets_hold_equal_tokens_and_the_same_heldout_lines(tmp_path):
    """`many prompts` takes one answer per training prompt, `few prompts` every answer of as few
    prompts as give as many tokens; both files begin with the corpus's held-out lines in order."""
    import json

    from eetune.data.corpus import is_heldout
    from eetune.data.sources import Document, Message

    def record(prompt: str, sample: int, tokens: int) -> dict:
        return {"id": f"b0:p{prompt}:s{sample}", "tokens": tokens, "messages": [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": f"answer {sample}"}]}

    def held(prompt: str) -> bool:
        return is_heldout(Document("x", messages=(Message("user", prompt),)), 0.1)

    prompts = [f"Question number {n}?" for n in range(60)]
    # Prompt n has 1 + n % 4 answers of 10 tokens each, interleaved as a distill corpus is.
    records = [record(p, s, 10) for s in range(4) for n, p in enumerate(prompts) if s <= n % 4]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    heldout, by_prompt = prompt_diversity.split_records(corpus, 0.1)
    assert heldout and [json.loads(line)["messages"][0]["content"] for line in heldout] == [
        r["messages"][0]["content"] for r in records if held(r["messages"][0]["content"])]
    train_prompts = [p for p in prompts if not held(p)]
    assert list(by_prompt) == train_prompts

    many = prompt_diversity.many_prompts(by_prompt)
    few = prompt_diversity.few_prompts(by_prompt, sum(count for _, count in many))
    assert len(many) == len(train_prompts) == len(few)  # equal tokens: every answer has 10
    few_prompts = list(dict.fromkeys(json.loads(line)["messages"][0]["content"] for line, _ in few))
    unchosen = [p for p in train_prompts if p not in few_prompts]
    # the most-answered prompts first, each whole (but the last, which the budget may cut)
    assert min(len(by_prompt[p]) for p in few_prompts) >= max(len(by_prompt[p]) for p in unchosen)
    assert sum(len(by_prompt[p]) for p in few_prompts[:-1]) < len(few)
    assert len(few_prompts) < len(train_prompts) / 2
    summary = prompt_diversity.write_subset(tmp_path / "few.jsonl", heldout, few)
    assert summary["train_prompts"] == len(few_prompts) and summary["train_answer_tokens"] == 10 * len(few)
    lines = (tmp_path / "few.jsonl").read_text().splitlines()
    assert lines[: len(heldout)] == heldout and len(lines) == len(heldout) + len(few)
