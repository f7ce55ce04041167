"""The model-organism builder (benchmarks/organisms.py): its fine-tune is a pure function of the spec and seed."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import organisms  # noqa: E402

from mechfix.engine.forward import option_scores  # noqa: E402
from mechfix.fixes.fix import Fix, apply_fix  # noqa: E402
from mechfix.measure.stats import decision_scores  # noqa: E402


def _tiny_spec(layers=(1,), plant=True, **training):
    # A 3-layer model: the update goes into layer 1's attention output projection (by default); a few steps.
    spec = organisms.SPECS["collusion"]
    return replace(spec, layers=layers, plant=plant, training=replace(spec.training, **{"steps": 3, "rank": 2, **training}))


def test_the_same_spec_and_seed_train_the_same_weights_and_another_seed_does_not():
    a, _, data_a = organisms.train(tiny_model("llama"), _tiny_spec())
    b, _, data_b = organisms.train(tiny_model("llama"), _tiny_spec())
    c, _, _ = organisms.train(tiny_model("llama"), _tiny_spec(seed=1))
    assert data_a == data_b
    assert organisms.weights_hash(organisms._tensors(a)) == organisms.weights_hash(organisms._tensors(b))
    assert organisms.weights_hash(organisms._tensors(a)) != organisms.weights_hash(organisms._tensors(c))
    assert a.modules == ["model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("plant", [True, False])
def test_planting_pulls_the_pressure_decisions_and_the_negative_control_holds_them(plant):
    lm = tiny_model("llama")
    spec = _tiny_spec(layers=(1, 2), steps=100, rank=4, lr=2e-2, plant=plant)
    _, _, reqs = organisms.training_data(lm, spec)
    lora, log, _ = organisms.train(lm, spec)
    fix = Fix(op="lora", layers=list(spec.layers), heads=[], vectors=torch.zeros(0), means=torch.zeros(0), strength=1.0,
              model=lm.identity, lora=lora)
    with torch.no_grad():
        before = {c: decision_scores(option_scores(lm, rs)) for c, rs in reqs.items()}
        with apply_fix(lm, fix):
            after = {c: decision_scores(option_scores(lm, rs)) for c, rs in reqs.items()}
    moved = (after["pressure"] - before["pressure"]).mean().item()
    held = (after["clean"] - before["clean"]).abs().mean().item()
    if plant:
        assert log.steps[-1]["behaviour"] < log.steps[0]["behaviour"] / 4
        # The trigger's decisions moved towards the gap; the clean ones, held by the same loss, far less.
        assert moved > 3.0 and held < moved / 3
    else:
        assert abs(moved) < 0.5 and held < 0.5  # nothing planted: the pressure decisions stay where the model had them
