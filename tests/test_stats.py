from __future__ import annotations

import numpy as np
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
