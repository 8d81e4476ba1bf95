"""The adaptive draft schedule: its cost model's choices, its fall-back to full-model steps and
probes, and self-speculative decoding with it staying lossless."""

from __future__ import annotations

import pytest

from eetune.infer import DecodeSettings, Engine
from eetune.infer.draft_schedule import PROBE_EVERY, DraftCosts, DraftSchedule, best_length, expected_tokens
from tests.infer.test_engine import _prompt, ee, ee_shallow_agrees  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

# SmolLM2-135M drafting at exit 8 of 30 with an mlp exit and a 4096-token FR-Spec head, in
# millions of parameters: layers of 3.54M, the exit's MLP 2.66M, head rows of 576.
M = 1e6
SMOLLM2_AT_8 = DraftCosts(below=8 * 3.54 * M, exit=2.66 * M, draft_head=4096 * 576, above=22 * 3.54 * M,
                          head=49152 * 576)


def test_expected_tokens_is_the_accepted_prefix_plus_one() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_best_length_by_hand_on_smollm2_costs() -> None:
    """work(k) = 134.5M + 49.2M k here: at alpha 0.5 tokens/work is 1/134.5, 1.5/183.7, 1.75/233.0
    (k = 0, 1, 2): one draft pays; at 0.8 two (2.44/233.0 beats 1.8/183.7 and 2.95/282.2); at
    0.2 none (1.2/183.7 < 1/134.5)."""
    assert SMOLLM2_AT_8.work(0) == pytest.approx(134.5 * M, rel=1e-3)
    assert SMOLLM2_AT_8.work(1) - SMOLLM2_AT_8.work(0) == pytest.approx(49.25 * M, rel=2e-3)
    assert best_length(0.2, 4, SMOLLM2_AT_8) == 0
    assert best_length(0.5, 4, SMOLLM2_AT_8) == 1
    assert best_length(0.8, 4, SMOLLM2_AT_8) == 2
    assert best_length(0.99, 4, SMOLLM2_AT_8) == 4
    lengths = [best_length(a / 100, 8, SMOLLM2_AT_8) for a in range(101)]
    assert lengths == sorted(lengths)  # more acceptance never drafts less


def test_constant_schedule_drafts_draft_len_within_the_limit() -> None:
    schedule = DraftSchedule("constant", 4)
    schedule.record(4, 0)
    assert [schedule.next_length(limit) for limit in (10, 4, 2, 0, -1)] == [4, 4, 2, 0, 0]


def test_adaptive_schedule_falls_back_to_full_steps_probes_and_recovers() -> None:
    schedule = DraftSchedule("adaptive", 4, SMOLLM2_AT_8)
    assert schedule.alpha == 0.5 and schedule.next_length(100) == 1  # the prior: one draft pays
    for _ in range(10):  # every draft rejected
        schedule.record(1, 0)
    assert schedule.alpha < 0.2
    lengths = [schedule.next_length(100) for _ in range(2 * PROBE_EVERY)]
    # Full-model steps, and a one-token probe every PROBE_EVERY of them.
    assert lengths == ([0] * (PROBE_EVERY - 1) + [1]) * 2
    for _ in range(30):  # then every draft accepted
        k = schedule.next_length(100)
        schedule.record(k, k)
    assert schedule.alpha > 0.9 and schedule.next_length(100) == 4
    assert schedule.next_length(3) == 3  # never past the row's budget
    with pytest.raises(ValueError, match="needs the round's costs"):
        DraftSchedule("adaptive", 4)


def test_adaptive_schedule_counts_the_first_rejection_only() -> None:
    """3 of 4 accepted: 4 drafts judged (the 4th rejected); 4 of 4: 4 judged, all accepted; a
    round cut short by the estimator after 2 accepted drafts: 2 judged."""
    schedule = DraftSchedule("adaptive", 4, SMOLLM2_AT_8)
    schedule.record(4, 3)
    assert (schedule.accepted, schedule.trials) == (3, 4)
    schedule.record(2, 2)
    assert (schedule.accepted, schedule.trials) == pytest.approx((0.9 * 3 + 2, 0.9 * 4 + 2))
    schedule.record(0, 0)  # a full-model step judges nothing
    assert (schedule.accepted, schedule.trials) == pytest.approx((0.9 * 3 + 2, 0.9 * 4 + 2))


@pytest.mark.parametrize("model", ["ee", "ee_shallow_agrees"])
def test_adaptive_self_speculative_is_lossless_and_adapts(
    model: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Greedy adaptive self-speculative decoding equals the full model token for token, drafting
    with ee's random layer exit at 1 (rarely accepted: mostly full-model steps and probes) and with
    a norm exit that agrees with the final layer (drafts of several tokens); sampled with a seed it
    repeats exactly."""
    lengths: list[int] = []
    next_length = DraftSchedule.next_length

    def spy(self: DraftSchedule, limit: int) -> int:
        lengths.append(next_length(self, limit))
        return lengths[-1]

    monkeypatch.setattr(DraftSchedule, "next_length", spy)
    early_exit_model = request.getfixturevalue(model)
    engine = Engine(early_exit_model)
    draft_exit = 1
    adaptive = dict(mode="self_speculative", draft_exit=draft_exit, draft_len=4, draft_schedule="adaptive")
    drafted = accepted = 0
    for seed in range(6):
        prompt = _prompt(200 + seed)
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=24)).tokens
        result = engine.generate(prompt, DecodeSettings(**adaptive, max_new_tokens=24))
        assert result.tokens == full, seed
        assert result.exit_layers.count(draft_exit) == result.accepted_tokens
        drafted, accepted = drafted + result.draft_tokens, accepted + result.accepted_tokens
    assert 0 < accepted < drafted  # drafts were both kept and rejected
    sampled = [engine.generate(_prompt(300), DecodeSettings(**adaptive, max_new_tokens=24, temperature=1.0, seed=5))
               for _ in range(2)]
    assert sampled[0].tokens == sampled[1].tokens
    if model == "ee":
        assert lengths.count(0) > lengths.count(1) > 0 and max(lengths) <= 1
    else:
        assert max(lengths) == 4 and min(lengths) < 4
