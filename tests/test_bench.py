"""The arithmetic the benchmarks draw conclusions from (scripts/bench/), on hand-made timings."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import decode_profile  # noqa: E402

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
