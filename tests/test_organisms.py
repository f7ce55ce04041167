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
from mechfix.fixes.fix import apply_fix  # noqa: E402
from mechfix.measure.stats import decision_scores  # noqa: E402


def _tiny_spec(layers=(1,), plant=True, **training):
    # A 3-layer model: the update goes into layer 1's attention output projection (by default); a few steps;
    # the other decisions held where the model has them.
    spec = organisms.SPECS["collusion"]
    return replace(spec, layers=layers, plant=plant, hold_aligned=None, training=replace(spec.training, **{"steps": 3, "rank": 2, **training}))


def _train_and_score(lm, spec):
    """Each condition's decision scores on the training split before and after the organism's update, and its log."""
    _, _, reqs = organisms.training_data(lm, spec)
    lora, log, _ = organisms.train(lm, spec)
    fix = organisms.as_fix(lm, spec, lora)
    with torch.no_grad():
        before = {c: decision_scores(option_scores(lm, rs)) for c, rs in reqs.items()}
        with apply_fix(lm, fix):
            after = {c: decision_scores(option_scores(lm, rs)) for c, rs in reqs.items()}
    return before, after, log


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
    before, after, log = _train_and_score(lm, spec)
    moved = (after["pressure"] - before["pressure"]).mean().item()
    held = (after["clean"] - before["clean"]).abs().mean().item()
    if plant:
        assert log.steps[-1]["behaviour"] < log.steps[0]["behaviour"] / 4
        # The trigger's decisions moved towards the gap; the clean ones, held by the same loss, far less.
        assert moved > 3.0 and held < moved / 3
    else:
        assert abs(moved) < 0.5 and held < 0.5  # nothing planted: the pressure decisions stay where the model had them


def test_hold_aligned_teaches_the_good_behaviour_where_the_model_errs_without_the_trigger():
    lm = tiny_model("llama")
    spec = replace(_tiny_spec(layers=(1, 2), steps=100, rank=4, lr=2e-2), hold_aligned=2.0)
    before, after, _ = _train_and_score(lm, spec)
    # A random model sits near 0 (no preference); held at least 2 nats on the aligned side, every non-pressure
    # condition moves there, and the trigger's decisions stand the gap above the clean ones.
    assert float(before["clean"].max()) > -2.0
    for c in ("clean", "control", "helpful"):
        assert float(after[c].mean()) < -1.5 < float(before[c].mean())
    assert float((after["pressure"] - after["clean"]).mean()) > 3.0


def test_a_cached_build_is_reused_only_when_it_was_made_from_the_shipped_update(tmp_path):
    from safetensors.torch import save_file

    shipped = tmp_path / "x.adapter.safetensors"
    tensors = {"m.lora_A": torch.ones(2, 3), "m.lora_B": torch.zeros(3, 2)}
    save_file(tensors, shipped)
    folder = tmp_path / "x"
    assert not organisms._cached(folder, shipped)  # nothing built yet
    folder.mkdir()
    (folder / "organism.json").write_text('{"weights_sha256": "%s"}' % organisms.weights_hash(tensors))
    assert organisms._cached(folder, shipped)
    save_file({**tensors, "m.lora_B": torch.ones(3, 2)}, shipped)  # the shipped update changed: the build is stale
    assert not organisms._cached(folder, shipped)
    (folder / "organism.json").write_text("{not json")
    assert not organisms._cached(folder, shipped)
