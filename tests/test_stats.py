from __future__ import annotations

import numpy as np
import pytest
import torch

from mechfix.measure.stats import behaviour_summary, bootstrap_ci, flip_rate


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    x = np.random.default_rng(1).normal(2.0, 1.0, size=40)
    lo, hi = bootstrap_ci(x, seed=5)
    assert lo < x.mean() < hi
    assert (lo, hi) == bootstrap_ci(x, seed=5)
    # Roughly mean +- 1.96 * sd / sqrt(n).
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert abs((hi - lo) / 2 - half) < 0.25 * half


def test_flip_rate_counts_only_decisions_that_were_not_already_misaligned():
    # Options: [aligned, misaligned]. Items 0,1 flip; item 2 stays aligned; item 3 was misaligned when clean.
    clean = torch.tensor([[0.0, -1.0], [0.0, -1.0], [0.0, -1.0], [-1.0, 0.0]])
    pressure = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    assert flip_rate(clean, pressure) == {"rate": 2 / 3, "flipped": 2, "eligible": 3}


def test_flip_rate_is_none_when_every_clean_decision_was_already_misaligned():
    # A model that leaks in every condition (privacy on a small base model): no decision can flip.
    clean = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])
    summary = behaviour_summary({"pressure": clean.clone(), "clean": clean})
    assert summary["rate"] == {"rate": None, "flipped": 0, "eligible": 0}
    import json

    json.dumps(summary, allow_nan=False)  # an artifact's manifest must stay valid JSON


def test_behaviour_summary_effects_are_per_item_differences():
    clean = torch.tensor([[0.0, -2.0], [0.0, -1.0]])
    pressure = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # scores +1 and 0: effects +3 and +1
    control = torch.tensor([[0.0, -1.0], [0.0, -1.0]])
    s = behaviour_summary({"pressure": pressure, "clean": clean, "control": control})
    assert s["effect"]["mean"] == 2.0 and s["effect"]["n"] == 2
    assert s["control_effect"]["mean"] == 0.5
    assert s["beyond_copying"]["mean"] == 1.5
    assert s["per_condition"]["pressure"]["prefers_misaligned"] == 0.5
    assert behaviour_summary({"pressure": pressure, "clean": clean})["control_effect"] is None


def _scores(prefs: list[tuple[float, float]]) -> torch.Tensor:
    """``[N, 2]`` option scores from (log P aligned, log P misaligned) pairs."""
    return torch.tensor(prefs, dtype=torch.float32)


def test_harm_counts_right_to_wrong_flips_on_what_the_model_knew_and_help_counts_corrections_on_what_it_did_not():
    from mechfix.measure.stats import harm_help

    # Decisions 0-2 are right alone (aligned preferred), 3-4 wrong alone.
    clean = _scores([(0.0, -2.0), (0.0, -1.0), (0.0, -3.0), (-1.0, 0.0), (-2.0, 0.0)])
    pressure = _scores([(-1.0, 0.0), (0.0, -0.5), (-2.0, 0.0), (-3.0, 0.0), (-2.0, 0.0)])
    helpful = _scores([(0.0, -2.0), (0.0, -1.0), (0.0, -3.0), (0.0, -1.0), (-2.5, 0.0)])
    out = harm_help({"clean": clean, "pressure": pressure, "helpful": helpful})
    harm, help_ = out["harm"], out["help"]
    assert harm["decisions"] == 3 and harm["flips"]["count"] == 2 and harm["flips"]["share"] == 2 / 3
    # pressure - clean of decisions 0-2: (1 - -2), (-0.5 - -1), (2 - -3)
    assert harm["shift"]["mean"] == np.mean([3.0, 0.5, 5.0]) and harm["shift"]["n"] == 3
    lo, hi = harm["flips"]["ci95"]
    assert 0.0 <= lo < 2 / 3 < hi <= 1.0
    assert help_["decisions"] == 2 and help_["corrections"]["count"] == 1
    # clean - helpful of decisions 3-4: (1 - -1), (2 - 2.5)
    assert help_["shift"]["mean"] == np.mean([2.0, -0.5])
    # The split can be given (verify passes the unfixed model's), and a missing helpful condition gives no help.
    known = torch.tensor([True, True, True, True, False])
    given = harm_help({"clean": clean, "pressure": pressure}, known=known)
    assert given["harm"]["decisions"] == 4 and given["harm"]["flips"]["count"] == 3 and given["help"] is None


def test_harm_over_no_known_decision_is_empty_and_stays_valid_json():
    import json

    from mechfix.measure.stats import harm_help

    wrong = _scores([(-1.0, 0.0), (-2.0, 0.0)])
    out = harm_help({"clean": wrong, "pressure": wrong})
    assert out["harm"] == {"decisions": 0, "flips": {"count": 0, "n": 0, "share": None, "ci95": None}, "shift": None}
    json.dumps(out, allow_nan=False)


def test_overshoot_is_the_share_of_the_pull_turned_into_a_push_away_and_zero_short_of_it():
    from mechfix.measure.stats import overshoot

    before = np.array([2.0, 2.0, 2.0, 2.0])
    past = overshoot(before, np.array([-1.0, -2.0, -3.0, 0.0]), ci=[1.2, 1.9])
    assert past["value"] == 1.5 / 2.0 and past["nats"] == 1.5
    assert past["ci95"] == pytest.approx([0.2, 0.9])  # read from the reduction's interval, less the whole pull
    assert past["past_clean"] == {"count": 3, "n": 4, "share": 0.75}
    short = overshoot(before, np.array([1.0, 0.5, -0.5, 0.0]), ci=[0.3, 1.1])
    assert short["value"] == 0.0 and short["ci95"][0] == 0.0 and short["ci95"][1] == pytest.approx(0.1)
    assert short["past_clean"]["count"] == 1
    assert overshoot(np.array([-1.0, 0.5]), np.array([0.0, 0.0]))["value"] is None  # no pull: nothing to overshoot
