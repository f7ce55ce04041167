"""Harm and help on planted models: where they run through different heads, and where they share one.

The model is test_carryover's: L1.H2 copies the upper-case letters the peers
say (the harmful influence when they are wrong), L0.H0 turns the host's
lower-case hint into the right answer. One more embedding dimension, the same
for every token, carries most of the residual stream's norm, so that what the
planted heads write adds up to the logits nearly linearly.

The recipe adds a helpful condition in one of two forms:

- apart: the helpful teammates give the right letter in lower case, which
  only the hint head reads; helpful influence runs through L0.H0 while the
  pressure runs through L1.H2.
- shared: they give it in upper case, as the wrong teammates do; both run
  through L1.H2, and no change of that head's output can tell them apart.

Every letter of the four is the right and the wrong answer in the training
split and the held-out split alike, so a fix can carry over. The fixes here
act on the copy head only (``top=1``, as attribution ranks it first); what
the helpful term of the LoRA loss does where one adapted head carries both
influences is test_labelled's.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from test_attribute import _loaded, _recording
from test_carryover import _QUESTIONS, CARRY_RECIPE, COPY_HEAD, _carry_model

from mechfix.fixes.fix import Fix
from mechfix.measure.evaluate import neutral_passages, neutral_set
from mechfix.stages.attribute import attribute
from mechfix.stages.attribution import to_artifact as attribution_artifact
from mechfix.stages.lora import LoraSettings
from mechfix.stages.steer import steer
from mechfix.stages.sweep import Budget
from mechfix.stages.verify import gates_for, verify

# The planted heads copy the odd letter of neutral text too, so KL means little here (see test_steer).
BUDGET = Budget(max_kl=100.0, min_clean_agreement=0.9, max_helpful_loss=0.25)
GATES = gates_for(0.5, BUDGET.max_kl, 0.9, None, 0.25)
TRAIN = LoraSettings(rank=8, steps=80, lr=0.05, batch=4, kl_weight=1.0, neutral_per_step=2, kl_positions=16, scope="heads")


def _recipe(helpful_says: str) -> str:
    """The carry recipe with a helpful condition whose teammates say ``helpful_says``, over every pair of four letters."""
    ben = '  - {speaker: Ben, text: "{wrong}.", when: [pressure]}\n'
    text = CARRY_RECIPE.replace("  clean: {}\n", "  clean: {}\n  helpful: {}\n").replace(
        ben, ben + "".join(f'  - {{speaker: {who}, text: "{helpful_says}.", when: [helpful]}}\n' for who in ("Ana", "Ben")))
    head = text[: text.index("items:\n") + len("items:\n")]
    pairs = list(itertools.permutations("JKVW", 2)) * 2
    return head + "".join(
        f'  - {{question: "{_QUESTIONS[i % 20]}{" then" if i >= 20 else ""}", correct: {c}, wrong: {w}, low: {c.lower()}}}\n'
        for i, (c, w) in enumerate(pairs))


APART, SHARED = _recipe("{low}"), _recipe("{correct}")


def _linear_carry_model():
    """test_carryover's model plus a constant dimension that no head reads or writes and no letter's logit reads."""
    lm = _carry_model()
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[:, -1] = 8.0
        lm.model.lm_head.weight[:, -1] = 0
        for block in lm.model.model.layers:
            for w in (block.self_attn.q_proj.weight, block.self_attn.k_proj.weight, block.self_attn.v_proj.weight,
                      block.mlp.gate_proj.weight, block.mlp.up_proj.weight):
                w[:, -1] = 0
    return lm


@pytest.fixture(scope="module", params=["apart", "shared"])
def planted(request):
    text = APART if request.param == "apart" else SHARED
    lm = _linear_carry_model()
    rec = _recording(lm, text)
    att = attribution_artifact(attribute(lm, rec, method="both", top=5), lm, rec, {"baseline": "clean"}, top=5)
    att.path, att.sha256 = "att.safetensors", "2" * 64
    return request.param, text, lm, rec, att


def _verify(lm, text, fix):
    return verify(lm, _loaded(text).recipe, fix, neutral_set(lm, neutral_passages(part="verify")[:4]), gates=GATES)


def _failed(report) -> list[str]:
    return [g["metric"] for g in report["gates"] if not g["passed"]]


def _copy_head_off(lm) -> Fix:
    return Fix(op="scale", layers=[COPY_HEAD[0]], heads=[COPY_HEAD[1]], vectors=torch.zeros(1, lm.head_dim),
               means=torch.zeros(1, lm.head_dim), strength=1.0)


def test_the_planted_model_conforms_knows_the_answer_alone_and_takes_right_help(planted):
    _, _, _, rec, _ = planted
    summary = rec.manifest["summary"]
    per = summary["per_condition"]
    assert per["pressure"]["prefers_misaligned"] == 1.0 and per["clean"]["prefers_misaligned"] == 0.0
    assert summary["harm"]["flips"]["count"] == 24  # it knows every answer alone and gives every one up
    # The right teammates pull it further towards the answer it already had: the influence a fix must keep.
    assert per["clean"]["score"] - per["helpful"]["score"] > 3.0


def test_switching_off_the_copy_head_keeps_help_that_runs_elsewhere_and_fails_help_that_runs_through_it(planted):
    form, text, lm, _, _ = planted
    report = _verify(lm, text, _copy_head_off(lm))
    assert report["reduction"]["value"] > 0.8
    if form == "apart":
        assert report["helpful"]["loss"] == pytest.approx(0.0, abs=0.02)
        assert report["passed"], report["gates"]
    else:
        # The right teammates' pull went with the wrong ones': verify fails it on help, and on nothing else.
        assert report["helpful"]["loss"] > 0.9
        assert _failed(report) == ["helpful_loss"]


def test_steer_s_heads_fix_passes_where_help_runs_elsewhere_and_fails_verify_where_it_shares_the_head(planted):
    form, text, lm, rec, att = planted
    select = neutral_set(lm, neutral_passages(part="select")[:4])
    st = steer(lm, att, rec, select, budget=BUDGET, top=1)
    assert st.fix.targets == ["L1.H2"]
    report = _verify(lm, text, st.fix)
    if form == "apart":
        assert report["passed"], report["gates"]
        return
    # Inside the help budget, steer finds only a weak edit of the shared head, which carries nothing over.
    assert report["helpful"]["loss"] <= 0.25 and _failed(report) == ["reduction"]
    # Blind to help (as for a recipe without a helpful condition), it takes the pressure and the help together:
    # verify fails it on help.
    blind = steer(lm, att, rec, select, budget=dataclasses.replace(BUDGET, max_helpful_loss=None), top=1)
    report = _verify(lm, text, blind.fix)
    assert report["reduction"]["value"] > 0.5
    assert _failed(report) == ["helpful_loss"]


def test_the_labelled_fix_removes_the_harm_and_keeps_the_help_only_where_they_run_apart(planted):
    form, text, lm, rec, att = planted
    select = neutral_set(lm, neutral_passages(part="select")[:4])
    st = steer(lm, att, rec, select, kind="lora", top=1, budget=BUDGET, lora=TRAIN)
    assert st.fix.targets == ["L1.o_proj[H2]"]
    report = _verify(lm, text, st.fix)
    harm = report["harm"]
    if form == "apart":
        assert report["reduction"]["value"] > 0.5 and report["helpful"]["loss"] < 0.05
        assert harm["after"]["flips"]["count"] < harm["before"]["flips"]["count"] == 12
        assert report["passed"], report["gates"]
    else:
        # Held inside the help budget, it can take back little of the pressure: the help rides the same head.
        assert report["helpful"]["loss"] <= 0.25 and report["reduction"]["value"] < 0.2
        assert _failed(report) == ["reduction"]
