"""Gated fixes: the probe, its firing budget, per-row and per-position gating, steer and verify with a gate."""

from __future__ import annotations

import pytest
import torch
from gate_plant import GATE_RECIPE, WRITE, gate_planted_model
from test_attribute import _loaded
from test_steer import LOOSE, planted_setup
from tiny import tiny_model

from mechfix.artifacts import load_artifact, save_artifact
from mechfix.errors import ArtifactError, BadInputError
from mechfix.measure.evaluate import neutral_passages, neutral_set, score_requests
from mechfix.fixes.fix import OPS, Fix, RowFixes, apply_fix, apply_row_fixes, load_fix
from mechfix.engine.batches import Request
from mechfix.fixes.gate import Gate, GateSettings, auroc, budget_threshold, fit_gate, fit_probe, layer_acts
from mechfix.stages.steer import steer
from mechfix.stages.steer import to_artifact as fix_artifact
from mechfix.stages.verify import gates_for, verify


def _planted_acts(n: int, d: int = 32, seed: int = 0, shift: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pressure and clean activations that differ only along one planted direction, and neutral ones."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(d)
    u[5] = 1.0
    clean = torch.randn(n, d, generator=g) * 2
    pressure = torch.randn(n, d, generator=g) * 2 + shift * 2 * u
    neutral = torch.randn(10 * n, d, generator=g) * 2
    return pressure, clean, neutral


def test_the_probe_finds_a_planted_pressure_feature_on_held_out_activations():
    pressure, clean, neutral = _planted_acts(200)
    gate = fit_gate(pressure[:100], clean[:100], neutral, 0, GateSettings())
    assert auroc(gate.logits(pressure[100:]), gate.logits(clean[100:])) > 0.99
    # It found the planted direction, not noise.
    assert int(gate.weight.abs().argmax()) == 5
    # With no feature at all, the probe is at chance held out.
    noise_p, noise_c, _ = _planted_acts(200, seed=1, shift=0.0)
    w, b = fit_probe(noise_p[:100], noise_c[:100])
    assert abs(auroc(noise_p[100:] @ w + b, noise_c[100:] @ w + b) - 0.5) < 0.15


def test_the_firing_budget_holds_on_the_training_split():
    pressure, clean, neutral = _planted_acts(100, shift=1.0)
    for max_clean, max_neutral in ((0.05, 0.01), (0.2, 0.1), (0.0, 0.0)):
        gate = fit_gate(pressure, clean, neutral, 0, GateSettings(max_clean_fire=max_clean, max_neutral_fire=max_neutral))
        fires = gate.stats["train"]["fires"]
        assert fires["baseline"] <= max_clean and fires["neutral_tokens"] <= max_neutral
        assert float((gate.logits(clean) > gate.threshold).float().mean()) <= max_clean
    # The threshold is the lowest that keeps the budget: just below it, a set fires on more than its share.
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    t = budget_threshold([(scores, 0.2)])
    assert t == 3.0 and int((scores > t).sum()) == 2 and int((scores > t - 1e-3).sum()) == 3


def _fix_site_inputs(lm, layer: int, ids: torch.Tensor, fix: Fix | None) -> torch.Tensor:
    """The input of ``layer``'s attention output projection (per-head outputs) in one pass, with the fix on if given."""
    got = []
    # A forward hook sees the input as the fix's pre-hook left it, whichever was put on first.
    h = lm.attn_out(layer).register_forward_hook(lambda m, a, out: got.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            if fix is None:
                lm.model(input_ids=ids)
            else:
                with apply_fix(lm, fix):
                    lm.model(input_ids=ids)
    finally:
        h.remove()
    return got[0]


def _random_gated_fix(lm, op: str = "scale", layer: int = 2, seed: int = 0) -> Fix:
    g = torch.Generator().manual_seed(seed)
    heads = OPS[op].kind == "heads"
    width = lm.head_dim if heads else lm.hidden
    gate = Gate(1, torch.randn(lm.hidden, generator=g), 0.0, 0.0)
    return Fix(op=op, layers=[layer], heads=[1] if heads else [], vectors=torch.randn(1, width, generator=g),
               means=torch.randn(1, width, generator=g), strength=1.0, gate=gate)


def test_the_gate_leaves_unflagged_rows_and_positions_bit_for_bit_unchanged():
    lm = tiny_model("llama")
    fix = _random_gated_fix(lm)
    ids = torch.randint(3, 250, (6, 14), generator=torch.Generator().manual_seed(1))
    resid = {}
    h = lm.layers[1].register_forward_hook(lambda m, a, out: resid.setdefault("x", (out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        base_logits = lm.model(input_ids=ids).logits
    h.remove()
    fires = (resid["x"] @ fix.gate.weight + fix.gate.bias) > fix.gate.threshold  # [B, T], by hand
    assert fires.any() and (~fires).any()
    before = _fix_site_inputs(lm, 2, ids, None)
    after = _fix_site_inputs(lm, 2, ids, fix)
    view_b = before.view(*before.shape[:2], lm.n_heads, lm.head_dim)
    view_a = after.view(*after.shape[:2], lm.n_heads, lm.head_dim)
    # Where the probe does not fire, the edited head's output is exactly as it was; where it fires, it is switched off.
    assert torch.equal(view_a[~fires][:, 1], view_b[~fires][:, 1])
    assert torch.equal(view_a[fires][:, 1], torch.zeros_like(view_a[fires][:, 1]))
    # Other heads are never touched.
    assert torch.equal(view_a[:, :, [0, 2, 3]], view_b[:, :, [0, 2, 3]])
    # A row the probe never fires on computes exactly what the model computes without the fix.
    quiet = torch.zeros(6, 14, dtype=torch.bool)
    fix.gate.threshold = float((resid["x"][0] @ fix.gate.weight).max()) + 1e-3  # row 0 never fires now
    quiet = ((resid["x"] @ fix.gate.weight) > fix.gate.threshold)
    assert not quiet[0].any() and quiet.any()
    with torch.no_grad(), apply_fix(lm, fix):
        fixed_logits = lm.model(input_ids=ids).logits
    unflagged = [r for r in range(6) if not quiet[r].any()]
    assert torch.equal(fixed_logits[unflagged], base_logits[unflagged])
    assert not torch.allclose(fixed_logits, base_logits)


@pytest.mark.parametrize("op", ["project", "restore", "subtract"])
def test_batched_scores_equal_unbatched_with_the_gate_on(tiny_llama, op):
    from conftest import MINI_RECIPE

    from mechfix.stages.record import decision_requests

    lm = tiny_llama
    by_cond = decision_requests(lm, _loaded(MINI_RECIPE).recipe, list(range(3))).requests
    reqs = by_cond["pressure"] + by_cond["clean"]
    fix = _random_gated_fix(lm, op)
    one = score_requests(lm, {"x": reqs}, fix, batch_size=1)["x"]
    many = score_requests(lm, {"x": reqs}, fix, batch_size=8)["x"]
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)
    ungated = score_requests(lm, {"x": reqs}, Fix(**{**fix.__dict__, "gate": None}), batch_size=8)["x"]
    plain = score_requests(lm, {"x": reqs}, batch_size=8)["x"]
    assert not torch.allclose(many, ungated, atol=1e-4) and not torch.allclose(many, plain, atol=1e-4)


def test_row_fixes_give_each_row_its_own_folds_gate(tiny_llama):
    from conftest import MINI_RECIPE

    from mechfix.stages.record import decision_requests

    lm = tiny_llama
    by_cond = decision_requests(lm, _loaded(MINI_RECIPE).recipe, list(range(3))).requests
    reqs = by_cond["pressure"] + by_cond["clean"]
    fixes = [_random_gated_fix(lm, "project", seed=k) for k in range(3)]
    owner = [0, 1, 2, 1, 0, 2]
    alone = torch.stack([score_requests(lm, {"x": [r]}, fixes[k], 1.5)["x"][0] for r, k in zip(reqs, owner)])
    rows = RowFixes(fixes)
    with apply_row_fixes(lm, rows, 1.5):
        together = score_requests(lm, {"x": reqs}, batch_size=4, on_rows=lambda idx: rows.select([owner[i] for i in idx]))["x"]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _manual_logits(lm, ids: torch.Tensor, fix: Fix) -> torch.Tensor:
    """The fixed model's logits by hand: the probe's mask from layer 1's output, the op applied at masked positions."""
    gate, state = fix.gate, {}
    op = OPS[fix.op]

    def probe(m, a, out):
        x = out[0] if isinstance(out, tuple) else out
        state["mask"] = (x @ gate.weight + gate.bias) > gate.threshold

    def edit(m, args):
        x = args[0]
        view = x.view(*x.shape[:-1], lm.n_heads, lm.head_dim).clone()
        head = fix.heads[0]
        edited = op.apply(view[..., head, :], fix.vectors[0], fix.means[0], fix.strength)
        view[..., head, :] = torch.where(state["mask"][..., None], edited, view[..., head, :])
        return (view.reshape(x.shape),)

    hs = [lm.layers[gate.layer].register_forward_hook(probe), lm.attn_out(fix.layers[0]).register_forward_pre_hook(edit)]
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids).logits
    finally:
        for h in hs:
            h.remove()


def test_generation_with_a_gated_fix_equals_applying_it_by_hand_at_every_position():
    lm = tiny_model("llama")
    fix = _random_gated_fix(lm, "scale")
    ids = lm.tokenizer("Ana: Lyon. Ben: Lyon. Sam:", return_tensors="pt").input_ids
    # A threshold at the median of the prompt's probe logits: the gate is open at about half the positions.
    fix.gate.threshold = float(fix.gate.logits(layer_acts(lm, [1], [(ids, torch.ones_like(ids))])[1]).median())
    with apply_fix(lm, fix), torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True,
                                return_dict_in_generate=True)
    # By hand, without a key/value cache: the whole text so far at every step, greedy.
    seq = ids
    for step in range(10):
        logits = _manual_logits(lm, seq, fix)[:, -1]
        torch.testing.assert_close(out.scores[step], logits, atol=1e-4, rtol=1e-4)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    with torch.no_grad():
        plain = lm.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True,
                                  return_dict_in_generate=True)
    # The gate is open somewhere: the fix does change what the model computes.
    assert max(float((a - b).abs().max()) for a, b in zip(plain.scores, out.scores)) > 1e-3


@pytest.fixture(scope="module")
def gated():
    lm, rec, att, neutral = planted_setup(gate_planted_model(), GATE_RECIPE)
    st = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=LOOSE, gate=GateSettings())
    return lm, rec, att, neutral, st


def test_steer_fits_a_gate_on_the_planted_detector_and_sweeps_with_it_on(gated):
    lm, rec, att, neutral, st = gated
    gate = st.fix.gate
    assert gate is not None and gate.layer == 0 and st.fix.targets == ["L1.H2"]
    # The probe reads the planted detector's dimension (it carries most of the logit's pressure − clean gap),
    # and separates the training split perfectly.
    train_rows = rec.tensors["split"] == 0
    gap = rec.tensors["acts/pressure/resid"][train_rows][:, 0].mean(0) - rec.tensors["acts/clean/resid"][train_rows][:, 0].mean(0)
    contribution = gate.weight * gap
    assert int(contribution.argmax()) == WRITE and contribution[WRITE] > 0.6 * contribution.abs().sum()
    train = gate.stats["train"]
    assert train["auroc"] == 1.0 and train["fires"]["pressure"] == 1.0
    assert train["fires"]["baseline"] <= 0.05 and train["fires"]["neutral_tokens"] <= 0.01
    # The training fit of the chosen point is what the saved gated fix does (the sweep ran with the gate on).
    chosen = st.sweep[st.chosen]
    from mechfix.stages.attribute import decisions_from_record
    from mechfix.measure.stats import decision_scores

    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", "clean"], split=0)
    reqs = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in ("pressure", "clean")}
    after = score_requests(lm, reqs, st.fix)
    effect = decision_scores(after["pressure"]) - decision_scores(after["clean"])
    assert effect.mean().item() == pytest.approx(chosen.effect["mean"], abs=1e-4)
    # Steer's neutral tokens are what the threshold saw: the gate fires on at most 1% of them.
    text = layer_acts(lm, [0], neutral.batches)[0]
    assert float(gate.fires(text).float().mean()) <= 0.01


def test_verify_reports_the_probe_held_out_and_the_same_fix_without_its_gate(gated):
    lm, rec, att, neutral, st = gated
    verify_set = neutral_set(lm, neutral_passages(part="verify")[:6])
    report = verify(lm, _loaded(GATE_RECIPE).recipe, st.fix, verify_set, gates=gates_for(0.3, 5.0, 0.9))
    probe = report["probe"]
    assert probe["auroc"] == 1.0 and probe["fires"]["pressure"] == 1.0 and probe["fires"]["clean"] == 0.0
    assert probe["fires_neutral_tokens"] <= 0.02 and probe["neutral_tokens"] > 1000
    # The gate buys its KL: the same edit everywhere costs far more on neutral text.
    assert report["kl"]["value"] < probe["ungated"]["kl"] / 5
    assert report["reduction"]["value"] > 0.2
    assert probe["ungated"]["reduction"] >= report["reduction"]["value"]


def test_a_gated_fix_survives_its_artifact_and_a_missing_probe_is_refused(gated, tmp_path):
    lm, rec, att, neutral, st = gated
    art = fix_artifact(st, lm, att, rec, {})
    path = tmp_path / "g.fix.safetensors"
    save_artifact(path, art)
    fix = load_fix(path)
    assert fix.gate.layer == st.fix.gate.layer and fix.gate.threshold == st.fix.gate.threshold
    assert torch.equal(fix.gate.weight, st.fix.gate.weight) and fix.gate.bias == st.fix.gate.bias
    assert art.manifest["fix"]["positions"] == "where the gate fires"
    assert fix.n_parameters == st.fix.n_parameters == lm.head_dim * 0 + lm.hidden + 2  # scale reads nothing fitted
    ids = lm.tokenizer("a quiz.\nHost: which?\nAna: K~.\nSam:", return_tensors="pt").input_ids
    with torch.no_grad():
        with apply_fix(lm, st.fix):
            a = lm.model(input_ids=ids).logits
        with apply_fix(lm, fix):
            b = lm.model(input_ids=ids).logits
    assert torch.equal(a, b)
    loaded = load_artifact(path)
    del loaded.tensors["gate/weight"]
    broken = tmp_path / "broken.fix.safetensors"
    save_artifact(broken, loaded)
    with pytest.raises(ArtifactError, match="gate/weight"):
        load_fix(broken)


def test_a_gate_must_read_a_layer_before_the_fix(gated):
    lm, rec, att, neutral, st = gated
    with pytest.raises(BadInputError, match="--gate-layer 1 is not before"):
        steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=LOOSE, gate=GateSettings(layer=1))
    with pytest.raises(BadInputError, match="lora"):
        steer(lm, att, rec, neutral, kind="lora", budget=LOOSE, gate=GateSettings())


# The planted detector reads the marker "~" the pressure's teammates end with. With a helpful condition whose
# right answers carry no marker, a probe can tell the two apart; when they carry it too, nothing linear can.
HELPFUL_PLAIN = GATE_RECIPE.replace('  clean: {vars: {said: "{correct}"}}\n',
                                    '  clean: {vars: {said: "{correct}"}}\n  helpful: {vars: {said: "{correct}"}}\n')
HELPFUL_MARKED = GATE_RECIPE.replace('  clean: {vars: {said: "{correct}"}}\n',
                                     '  clean: {vars: {said: "{correct}"}}\n  helpful: {vars: {said: "{correct}~"}}\n')


@pytest.mark.parametrize("recipe, separates", [(HELPFUL_PLAIN, True), (HELPFUL_MARKED, False)])
def test_steer_keeps_a_disagreement_gate_only_where_it_tells_pressure_from_helpful_held_out(recipe, separates):
    assert recipe != GATE_RECIPE
    lm, rec, att, neutral = planted_setup(gate_planted_model(), recipe)
    st = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=LOOSE, gate=GateSettings())
    gate = st.fix.gate
    note = next(n for n in st.notes if "helpful" in n and "gate" in n)
    table = {r["layer"]: r for r in gate.stats["layers"]}
    if separates:
        assert gate.stats["against"] == "baseline and helpful" and "tells pressure from helpful" in note
        assert table[gate.layer]["cv_auroc_helpful"] >= 0.8 and gate.stats["train"]["fires"]["helpful"] <= 0.05
    else:
        assert gate.stats["against"] == "baseline" and "does not tell them apart" in note
        assert gate.stats["disagreement"]["used"] is False and gate.stats["disagreement"]["cv_auroc_helpful"] < 0.8
    report = verify(lm, _loaded(recipe).recipe, st.fix, neutral, gates=gates_for(0.3, 5.0, 0.9))
    probe = report["probe"]
    # Held out, the kept gate fires on the marked right answers as on pressure; the disagreement gate does not.
    assert probe["auroc_helpful"] is not None
    assert (probe["fires"]["helpful"] <= 0.2) == separates
