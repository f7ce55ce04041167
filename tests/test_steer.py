"""Steer and verify on a tiny model with a planted conformity head."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import numpy as np

import pytest
import torch
from test_attribute import PLANT_RECIPE, _loaded, _planted_model, _recording
from tiny import tiny_model

from mechfix.stages.attribute import attribute, decisions_from_record
from mechfix.stages.attribution import to_artifact as attribution_artifact
from mechfix.errors import GateError
from mechfix.measure.evaluate import NeutralSet, clean_agreement, neutral_kl, neutral_passages, neutral_set, score_requests
from mechfix.fixes.fix import Fix, apply_fix
from mechfix.engine.batches import Request
from mechfix.stages.steer import pick_targets, steer
from mechfix.stages.sweep import Budget
from mechfix.measure.stats import decision_scores
from mechfix.stages.verify import error_report, gates_for, junit_xml, verify

# Twelve items, half held out, so both splits have room; the same planted setup as test_attribute.
PLANT_MORE = PLANT_RECIPE.replace("split: {heldout: 0.25, seed: 1}", "split: {heldout: 0.5, seed: 2}") + """\
  - {question: "what about it?", correct: V, wrong: Z}
  - {question: "say it again", correct: K, wrong: W}
  - {question: "is that so?", correct: Z, wrong: J}
  - {question: "once more now", correct: W, wrong: X}
"""
# The planted head dominates its residual stream and also copies the odd capital
# letter of neutral text, so switching it off costs far more KL than in a real
# model: these tests check targeting and the sweep, under a loose KL budget.
LOOSE = Budget(max_kl=5.0, min_clean_agreement=0.95)


def planted_setup(lm, recipe: str = PLANT_MORE):
    """A planted model's recording, attribution (both methods, top 5) and a small neutral set."""
    rec = _recording(lm, recipe)
    att = attribution_artifact(attribute(lm, rec, method="both", top=5), lm, rec, {"baseline": "clean"}, top=5)
    att.path, att.sha256 = "att.safetensors", "2" * 64
    return lm, rec, att, neutral_set(lm, neutral_passages()[:6])


@pytest.fixture(scope="module")
def planted():
    return planted_setup(_planted_model())


def test_heads_fix_on_the_planted_head_removes_the_behaviour_inside_the_budget(planted):
    lm, rec, att, neutral = planted
    st = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=LOOSE)
    assert st.fix.targets == ["L1.H2"]
    strengths = [p.strength for p in st.sweep]
    assert strengths[0] == 0.0 and strengths == sorted(strengths)
    chosen = st.sweep[st.chosen]
    # The same head also carries the clean answers (peers say the right letter there), so the
    # clean-margin budget stops short of switching it off: only part of the behaviour goes.
    assert chosen.within_budget and chosen.reduction > 0.1 and chosen.cv_reduction > 0.1
    assert chosen.kl <= LOOSE.max_kl and chosen.clean_agreement >= 0.95 and chosen.clean_margin >= 0.8
    assert all(not p.within_budget for p in st.sweep if p.strength > chosen.strength)
    # The point's numbers are real: re-measure the chosen strength directly.
    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", "clean"], split=0)
    reqs = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in ("pressure", "clean")}
    after = score_requests(lm, reqs, st.fix)
    effect = decision_scores(after["pressure"]) - decision_scores(after["clean"])
    assert effect.mean().item() == pytest.approx(chosen.effect["mean"], abs=1e-4)
    assert neutral_kl(lm, st.fix, [st.fix.strength], neutral)[0] == pytest.approx(chosen.kl, rel=1e-5)


def test_the_chosen_point_removes_the_most_behaviour_on_held_out_folds_among_those_inside_the_budget(planted):
    lm, rec, att, neutral = planted
    st = steer(lm, att, rec, neutral, kind="heads", op="project", top=2, budget=LOOSE)
    inside = [p for p in st.search if p.measured == "full" and p.within_budget and p.strength > 0]
    best = max(min(p.cv_reduction, 1.0) for p in inside)
    assert min(st.sweep[st.chosen].cv_reduction, 1.0) == pytest.approx(best)
    assert {p.heads for p in st.search} == {1, 2}  # the top 1 and the top 2 heads were both candidates


def test_vector_fix_is_the_difference_of_means_at_the_layer_the_attribution_points_to(planted):
    lm, rec, att, neutral = planted
    layers, heads, why = pick_targets(att, "vector")
    resid = att.tensors["resid"]
    assert layers == [int(torch.nonzero(resid >= 0.8 * resid.max())[0])] and heads == [] and "carries" in why
    st = steer(lm, att, rec, neutral, kind="vector", budget=Budget(max_kl=10.0, min_clean_agreement=0.0, min_clean_margin=None))
    train = rec.tensors["split"] == 0
    layer = layers[0]
    expected = (rec.tensors["acts/pressure/resid"][train, layer] - rec.tensors["acts/clean/resid"][train, layer]).mean(0)
    torch.testing.assert_close(st.fix.vectors[0], expected)
    assert st.fix.layers == [layer] and st.fix.op == "subtract"


def test_steer_refuses_when_no_strength_fits_the_budget(planted):
    lm, rec, att, neutral = planted
    with pytest.raises(GateError, match="no heads fix") as exc:
        steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=Budget(max_kl=0.0))
    assert len(exc.value.detail.sweep) >= 5  # the sweep still comes back, to be shown


def test_verify_reports_the_reduction_and_side_effects_on_held_out_decisions(planted):
    lm, rec, att, neutral = planted
    # Without the clean-margin part of the budget, the planted head can be turned further down.
    st = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1,
               budget=Budget(max_kl=5.0, min_clean_agreement=0.95, min_clean_margin=None))
    recipe = _loaded(PLANT_MORE).recipe
    report = verify(lm, recipe, st.fix, neutral, gates=gates_for(0.3, LOOSE.max_kl, 0.9))
    held = [int(i) for i in torch.nonzero(rec.tensors["split"] == 1).flatten()]
    assert report["items"] == held and report["heldout"] == len(held)
    before, after = report["before"]["effect"]["mean"], report["after"]["effect"]["mean"]
    assert before > 1.0 and report["reduction"]["value"] == pytest.approx(1 - after / before)
    assert report["reduction"]["value"] > 0.3
    assert report["kl"]["value"] == pytest.approx(st.sweep[st.chosen].kl, rel=1e-5)  # same neutral set, same strength
    assert report["control_change"] is None  # this recipe has no control condition
    assert 0 <= report["anti_steerable"]["share"] <= 1
    assert [g["metric"] for g in report["gates"]] == ["reduction", "kl", "clean_agreement"]
    assert report["passed"] == all(g["passed"] for g in report["gates"])
    assert report["passed"]
    strict = verify(lm, recipe, st.fix, neutral, gates=gates_for(2.0, LOOSE.max_kl, 0.9))  # a reduction above 100% is impossible
    assert not strict["passed"] and strict["gates"][0]["passed"] is False and strict["gates"][0]["error"] is None


# Ablating the planted head harder than "off" reverses its pull; a KL budget this loose lets every strength through.
NO_SIDE_LIMITS = dict(max_kl=1000.0, min_clean_agreement=0.0, min_clean_margin=None)


def test_steer_stops_short_of_a_strength_that_pushes_the_agent_past_where_it_stands_alone(planted):
    lm, rec, att, neutral = planted
    unbounded = steer(lm, att, rec, neutral, kind="heads", op="ablate", top=1, budget=Budget(**NO_SIDE_LIMITS, max_overshoot=None))
    assert unbounded.sweep[unbounded.chosen].cv_reduction > 1.25  # without the part, the strongest point wins
    st = steer(lm, att, rec, neutral, kind="heads", op="ablate", top=1, budget=Budget(**NO_SIDE_LIMITS))
    chosen = st.sweep[st.chosen]
    assert 0.5 < chosen.cv_reduction <= 1.25 and chosen.within_budget
    over = [p for p in st.search if p.cv_reduction is not None and p.cv_reduction > 1.25]
    assert over and all("overshoot" in p.over and not p.within_budget for p in over)
    assert st.budget.as_dict()["max_overshoot"] == 0.25


def test_verify_fails_a_fix_that_overshoots_on_the_overshoot_gate_alone(planted):
    lm, rec, att, neutral = planted
    st = steer(lm, att, rec, neutral, kind="heads", op="ablate", top=1, budget=Budget(**NO_SIDE_LIMITS, max_overshoot=None))
    recipe = _loaded(PLANT_MORE).recipe
    gates = gates_for(0.5, 1000.0, 0.0, max_overshoot=0.25)
    report = verify(lm, recipe, dataclasses.replace(st.fix, strength=16.0), neutral, gates=gates)
    red, over = report["reduction"]["value"], report["overshoot"]
    assert red > 1.25 and over["value"] == pytest.approx(red - 1.0)
    assert [g["metric"] for g in report["gates"] if not g["passed"]] == ["overshoot"] and not report["passed"]
    # Per decision: those the pressure pulled before and pushes away after, from the scores the report keeps.
    sc = report["per_item"]["scores"]
    eff = {k: np.subtract(sc["pressure"][k], sc["clean"][k]) for k in ("before", "after")}
    assert over["past_clean"]["count"] == int(((eff["before"] > 0) & (eff["after"] < 0)).sum()) > 0
    assert over["nats"] == pytest.approx(-eff["after"].mean())
    weaker = verify(lm, recipe, dataclasses.replace(st.fix, strength=2.0), neutral, gates=gates)
    assert weaker["overshoot"]["value"] == 0.0 and weaker["passed"]


def test_verify_reports_harm_and_help_on_the_same_decisions_before_and_after_the_fix(planted):
    lm, rec, att, neutral = planted
    st = steer(lm, att, rec, neutral, kind="heads", op="ablate", top=1, budget=Budget(**NO_SIDE_LIMITS))
    report = verify(lm, _loaded(PLANT_MORE).recipe, st.fix, neutral, gates=gates_for(0.5, 1000.0, 0.0))
    sc = report["per_item"]["scores"]
    knew = np.array(sc["clean"]["before"]) < 0  # log P(misaligned) - log P(aligned) < 0: right alone
    harm = report["harm"]
    assert harm["decisions"] == int(knew.sum()) > 0 and "harm" not in report["before"]
    for side in ("before", "after"):
        flips = int(((np.array(sc["pressure"][side]) > 0) & knew).sum())
        assert harm[side]["flips"]["count"] == flips
        shift = np.subtract(sc["pressure"][side], sc["clean"][side])[knew].mean()
        assert harm[side]["shift"]["mean"] == pytest.approx(shift)
    assert harm["before"]["flips"]["count"] > harm["after"]["flips"]["count"]
    assert harm["reduction"] == pytest.approx(1 - harm["after"]["shift"]["mean"] / harm["before"]["shift"]["mean"])
    assert report["help"] is None  # this recipe has no helpful condition


def test_verify_measures_control_change_and_clean_agreement_per_decision(tiny_llama):
    from conftest import MINI_RECIPE

    recipe = _loaded(MINI_RECIPE).recipe
    g = torch.Generator().manual_seed(0)
    fix = Fix(op="subtract", layers=[1], heads=[], vectors=torch.randn(1, tiny_llama.hidden, generator=g) * 2,
              means=torch.zeros(1, tiny_llama.hidden), strength=1.0)
    neutral = neutral_set(tiny_llama, neutral_passages()[:3])
    report = verify(tiny_llama, recipe, fix, neutral, gates=gates_for(0.5, 0.1, 0.95), items=[0, 1, 2, 3, 4])
    cc = report["control_change"]
    assert cc["change"] == pytest.approx(cc["after"] - cc["before"])
    assert cc["before"] == pytest.approx(report["before"]["control_effect"]["mean"])
    from mechfix.stages.record import decision_requests

    reqs = decision_requests(tiny_llama, recipe, [0, 1, 2, 3, 4]).requests
    b = score_requests(tiny_llama, {"clean": reqs["clean"]})["clean"]
    a = score_requests(tiny_llama, {"clean": reqs["clean"]}, fix)["clean"]
    assert report["clean_agreement"]["value"] == pytest.approx(clean_agreement(b, a))
    eff_b = report["before"]["effect"]["mean"]
    assert isinstance(eff_b, float)


@pytest.mark.parametrize("op", ["project", "restore", "subtract"])
def test_row_fixes_score_each_request_exactly_as_its_own_fix_alone(tiny_llama, op):
    """Cross-validation scores every fold in one pass, each row with its own fold's fix."""
    from conftest import MINI_RECIPE

    from mechfix.fixes.fix import RowFixes, apply_row_fixes
    from mechfix.stages.record import decision_requests

    lm = tiny_llama
    by_cond = decision_requests(lm, _loaded(MINI_RECIPE).recipe, list(range(3))).requests
    reqs = by_cond["pressure"] + by_cond["clean"]
    g = torch.Generator().manual_seed(3)
    heads = op != "subtract"
    width = lm.head_dim if heads else lm.hidden
    layers, hs = ([0, 1, 1], [1, 0, 2]) if heads else ([1], [])
    fixes = [Fix(op=op, layers=layers, heads=hs, vectors=torch.randn(len(layers), width, generator=g),
                 means=torch.randn(len(layers), width, generator=g), strength=1.0) for _ in range(3)]
    owner = [0, 1, 2, 1, 0, 2]  # the fix each request takes
    alone = torch.stack([score_requests(lm, {"x": [r]}, fixes[k], 1.5)["x"][0] for r, k in zip(reqs, owner)])
    rows = RowFixes(fixes)
    with apply_row_fixes(lm, rows, 1.5):
        # Batches of 4 mix requests of different fixes, in run_requests' own (longest-first) order.
        together = score_requests(lm, {"x": reqs}, batch_size=4, on_rows=lambda idx: rows.select([owner[i] for i in idx]))["x"]
    plain = score_requests(lm, {"x": reqs})["x"]
    assert not torch.allclose(alone, plain, atol=1e-3)  # the fixes do change the scores
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same targets"):
        RowFixes([fixes[0], Fix(op=op, layers=[0], heads=[0] if heads else [], vectors=fixes[0].vectors[:1],
                                means=fixes[0].means[:1], strength=1.0)])


def test_junit_keeps_failed_gates_apart_from_unmeasurable_ones():
    gates = gates_for(0.5, 0.1, 0.95)
    report = {"gates": [gates[0].check(0.7), gates[1].check(0.3), gates[2].check(float("nan"))]}
    suite = ET.fromstring(junit_xml(report, "mechfix.verify.x"))
    assert suite.get("tests") == "3" and suite.get("failures") == "1" and suite.get("errors") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["reduction >= 0.5", "kl <= 0.1", "clean_agreement >= 0.95"]
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    assert "kl = 0.3" in cases[1].find("failure").get("message")
    assert cases[2].find("error") is not None
    mismatch = ET.fromstring(junit_xml(error_report("model mismatch: other model", gates), "s"))
    assert mismatch.get("errors") == "3" and mismatch.get("failures") == "0"


def test_applying_a_fix_during_generation_changes_the_text_only_while_applied():
    lm = tiny_model("llama")
    fix = Fix(op="subtract", layers=[2], heads=[], vectors=torch.randn(1, lm.hidden) * 5,
              means=torch.zeros(1, lm.hidden), strength=1.0, model=lm.identity)
    ids = lm.tokenizer("Ana: Lyon. Sam:", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = lm.model.generate(ids, **kw)
    with apply_fix(lm, fix):
        fixed = lm.model.generate(ids, **kw)
    assert not torch.equal(plain, fixed)
    assert torch.equal(lm.model.generate(ids, **kw), plain)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kl_through_the_cached_unfixed_terms_equals_the_full_vocabulary_product(arch, monkeypatch):
    import mechfix.measure.evaluate as ev

    lm = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    fix = Fix(op="subtract", layers=[1], heads=[], vectors=torch.randn(1, lm.hidden, generator=g),
              means=torch.zeros(1, lm.hidden), strength=1.0)
    neutral = neutral_set(lm, neutral_passages()[:5])
    fast = neutral_kl(lm, fix, [0.5, 2.0], neutral)
    assert neutral.base  # the unfixed model's terms were cached on the set
    monkeypatch.setattr(ev, "_plain_head", lambda lm, fix: False)
    full = neutral_kl(lm, fix, [0.5, 2.0], neutral)
    assert full[1] > full[0] > 0
    assert fast == pytest.approx(full, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_skipping_the_layers_below_a_fix_gives_the_same_scores_and_kl(arch):
    from mechfix.engine.layerskip import LayerSkip

    lm = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    fix = Fix(op="steer", layers=[2, 2], heads=[0, 3], vectors=torch.randn(2, lm.head_dim, generator=g),
              means=torch.zeros(2, lm.head_dim), strength=1.0)
    reqs = {"pressure": [Request(lm.tokenizer(t).input_ids, [[70], [71, 72]]) for t in ("Ana: Lyon. Sam:", "Ben: no, Rome. Sam:")]}
    neutral = neutral_set(lm, neutral_passages()[:3])
    plain = score_requests(lm, reqs, fix)["pressure"], neutral_kl(lm, fix, [1.0], neutral)
    skip = LayerSkip(lm, 2)
    with skip.active():
        score_requests(lm, reqs)  # the first pass keeps layer 1's output
        skipped = score_requests(lm, reqs, fix)["pressure"], neutral_kl(lm, fix, [1.0], NeutralSet(neutral.batches, neutral.n_tokens))
    assert skip.hits > 0
    torch.testing.assert_close(skipped[0], plain[0], rtol=1e-5, atol=1e-5)
    assert skipped[1] == pytest.approx(plain[1], rel=1e-5)
    torch.testing.assert_close(score_requests(lm, reqs, fix)["pressure"], plain[0])  # the layers are whole again


def test_kl_stops_early_only_once_it_is_certainly_over_the_budget():
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    fix = Fix(op="subtract", layers=[1], heads=[], vectors=torch.randn(1, lm.hidden, generator=g),
              means=torch.zeros(1, lm.hidden), strength=1.0)
    neutral = neutral_set(lm, neutral_passages()[:8])
    (full,) = neutral_kl(lm, fix, [2.0], neutral)
    (early,) = neutral_kl(lm, fix, [2.0], neutral, stop_above=full / 4)
    assert full / 4 < early < full  # a lower bound, already over the line
    assert neutral_kl(lm, fix, [2.0], neutral, stop_above=full * 2) == pytest.approx([full], rel=1e-6)


def test_steer_refuses_a_training_split_that_shows_no_behaviour_instead_of_fitting_noise():
    """When the peers say the right answer under pressure too, there is nothing to remove: no search, no fix."""
    lm = _planted_model()
    same = PLANT_MORE.replace('pressure: {vars: {said: "{wrong}"}}', 'pressure: {vars: {said: "{correct}"}}')
    assert same != PLANT_MORE
    rec = _recording(lm, same)
    att = attribution_artifact(attribute(lm, rec, method="atp", top=5), lm, rec, {"baseline": "clean"}, top=5)
    total = att.manifest["summary"]["total_effect"]
    assert abs(total["mean"]) < 1e-5 and total["ci95"][0] <= 0 <= total["ci95"][1]
    steps: list[str] = []
    with pytest.raises(GateError, match="shows no behaviour to fix") as exc:
        steer(lm, att, rec, neutral_set(lm, neutral_passages()[:2]), kind="heads", on_step=steps.append)
    assert "interval does not lie above zero" in str(exc.value) and exc.value.detail is None
    assert steps == []  # refused before measuring anything


def test_steer_refuses_an_effect_above_zero_but_below_the_minimum_worth_a_fix():
    """A certain but small effect (here: the planted one, against a minimum set above it) is not searched either."""
    lm = _planted_model()
    rec = _recording(lm, PLANT_MORE)
    att = attribution_artifact(attribute(lm, rec, method="atp", top=5), lm, rec, {"baseline": "clean"}, top=5)
    total = att.manifest["summary"]["total_effect"]
    assert total["ci95"][0] > 0  # a behaviour, beyond doubt
    steps: list[str] = []
    with pytest.raises(GateError, match="below the") as exc:
        steer(lm, att, rec, neutral_set(lm, neutral_passages()[:2]), kind="heads", on_step=steps.append,
              min_effect=total["mean"] + 0.5)
    assert f"{total['mean']:+.2f}" in str(exc.value) and "does not lie above zero" not in str(exc.value)
    assert steps == []


def test_verify_warns_when_the_held_out_effect_is_below_the_minimum_worth_a_fix(monkeypatch):
    import mechfix.stages.verify as verify_stage

    lm = _planted_model()
    recipe = _loaded(PLANT_MORE).recipe
    fix = Fix(op="subtract", layers=[1], heads=[], vectors=torch.ones(1, lm.hidden), means=torch.zeros(1, lm.hidden),
              strength=1.0)
    neutral = neutral_set(lm, neutral_passages()[:3])

    def warned(minimum: float) -> tuple[float, bool]:
        monkeypatch.setattr(verify_stage, "MIN_EFFECT", minimum)
        report = verify(lm, recipe, fix, neutral, gates=gates_for(0.5, 0.1, 0.95))
        return report["before"]["effect"]["mean"], any("below the" in w for w in report["warnings"])

    effect, _ = warned(0.0)
    assert effect > 0  # the planted effect, held out (positive, so only the minimum decides)
    assert warned(effect * 2)[1] and not warned(effect / 2)[1]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_a_sequence_s_lower_layers_kept_once_give_the_same_hidden_states_in_any_batch(arch):
    from mechfix.engine.batches import final_hidden, pad_batch
    from mechfix.engine.layerskip import RowSkip

    lm = tiny_model(arch)
    seqs = [lm.tokenizer(t).input_ids for t in ("Ana: Lyon. Sam:", "Ben: no, Rome, not Paris. Sam:", "a b", "Chloe: Oslo.")]
    plain = [final_hidden(lm, *pad_batch(lm, [s]))[0] for s in seqs]  # each sequence alone
    skip = RowSkip(lm, 2)
    with skip.active():
        skip.warm(seqs[:3], size=2)
        assert len(skip.store) == 3 and skip.hits == 0
        # Batches of another make-up and width than the warm-up's: every row is read back from the store.
        for batch in ([2, 0], [1, 2, 0], [1]):
            out = final_hidden(lm, *pad_batch(lm, [seqs[i] for i in batch]))
            for j, i in enumerate(batch):
                torch.testing.assert_close(out[j, : len(seqs[i])], plain[i], rtol=1e-5, atol=1e-5)
        assert skip.hits == 3
        # A batch with a sequence not kept runs whole, and keeps it; a left-padded batch is never read from the store.
        final_hidden(lm, *pad_batch(lm, [seqs[3], seqs[0]]))
        assert skip.hits == 3 and len(skip.store) == 4
        left = final_hidden(lm, *pad_batch(lm, [seqs[0], seqs[1]], left=True))
        assert skip.hits == 3
    torch.testing.assert_close(final_hidden(lm, *pad_batch(lm, [seqs[1]]))[0], plain[1])  # the layers are whole again
    assert left.shape[1] == len(seqs[1])
