"""Every backend through the same checks: record, attribution, steer's sweep and verify give the hooks backend's numbers.

The backends are run as users run them: ``hooks`` (the default), ``nnsight``
(traces on the prefix cache), ``nnsight`` shaped as on NDIF (each tail reruns its
prompt, a fix's edits travel inside the traces), and that NDIF shape through
nnsight's own offline simulation of a remote request (``remote="local"``: every
trace serialized as for NDIF, deserialized with local modules hidden, then run),
the code path ``--remote`` takes, without a network.

Tolerances: 1e-4 (absolute and relative) on scores, activations and effects;
the sweep chooses the same strength; verify's numbers agree to 1e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MINI_RECIPE
from test_attribute import PLANT_RECIPE, _loaded, _planted_model
from test_steer import PLANT_MORE
from tiny import tiny_model

from mechfix.engine.backends import BACKENDS, simulate_remote, use_backend
from mechfix.measure.evaluate import neutral_passages, neutral_set
from mechfix.stages.attribute import attribute
from mechfix.stages.attribution import to_artifact as attribution_artifact
from mechfix.stages.record import record
from mechfix.stages.record import to_artifact as record_artifact
from mechfix.stages.steer import steer
from mechfix.stages.sweep import Budget
from mechfix.stages.verify import gates_for, verify

TOL = dict(atol=1e-4, rtol=1e-4)


def _remote_shaped(lm):
    lm = use_backend(lm, "nnsight")
    lm.trace_prefixes, lm.edits_in_traces = False, True
    return lm


# How each backend is set up on a freshly built model; every name in BACKENDS appears at least once.
SETUPS = {
    "hooks": lambda lm: use_backend(lm, "hooks"),
    "nnsight": lambda lm: use_backend(lm, "nnsight"),
    "nnsight-ndif-shape": _remote_shaped,
    "nnsight-remote-local": simulate_remote,
}
# A request on NDIF returns no attention weights, so its attribution has no per-speaker split or per-token example.
NO_ATTENTION = {"nnsight-remote-local"}


def test_the_suite_covers_every_backend():
    assert {SETUPS[name](tiny_model("llama")).backend for name in SETUPS} == set(BACKENDS)


def _recording(lm, text: str):
    loaded = _loaded(text)
    art = record_artifact(record(lm, loaded.recipe, batch_size=3), lm, loaded, {})
    art.path, art.sha256 = "rec.safetensors", "1" * 64
    return art


@pytest.fixture(scope="module")
def reference():
    """The hooks backend's numbers on the planted model: recording, attribution, steer and verify."""
    lm = _planted_model()
    rec = _recording(lm, PLANT_MORE)
    att = attribution_artifact(attribute(lm, rec, method="both", top=5), lm, rec, {"baseline": "clean"}, top=5)
    att.path, att.sha256 = "att.safetensors", "2" * 64
    neutral = neutral_set(lm, neutral_passages()[:6])
    st = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=BUDGET)
    report = verify(lm, _loaded(PLANT_MORE).recipe, st.fix, neutral, gates=GATES)
    return rec, att, st, report


BUDGET = Budget(max_kl=5.0, min_clean_agreement=0.95, min_clean_margin=None)
GATES = gates_for(0.3, 5.0, 0.9)


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_record_gives_the_hooks_scores_and_activations(setup, arch):
    # Activations kept in float32 everywhere (a remote run keeps float16 by default, to travel light).
    want = record(tiny_model(arch), _loaded(MINI_RECIPE).recipe, batch_size=3, act_dtype=torch.float32)
    got = record(SETUPS[setup](tiny_model(arch)), _loaded(MINI_RECIPE).recipe, batch_size=3, act_dtype=torch.float32)
    for c in want.conditions:
        torch.testing.assert_close(got.scores[c], want.scores[c], **TOL)
        for site, x in want.acts[c].items():
            torch.testing.assert_close(got.acts[c][site].float(), x.float(), **TOL)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_attribution_gives_the_hooks_effects_both_ways(setup, reference):
    rec, att, _, _ = reference
    lm = SETUPS[setup](_planted_model())
    got = attribution_artifact(attribute(lm, rec, method="both", top=5), lm, rec, {"baseline": "clean"}, top=5)
    assert "everywhere/attn" in att.tensors  # restoring at every position runs as edits: compared here too
    missing = set(att.tensors) - set(got.tensors)
    assert all(k.startswith(("speakers", "examples")) for k in missing) and bool(missing) == (setup in NO_ATTENTION)
    for key in set(att.tensors) - missing:
        torch.testing.assert_close(got.tensors[key], att.tensors[key], **TOL, msg=key)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_steer_sweeps_and_chooses_what_hooks_choose_and_verify_reports_the_same(setup, reference):
    rec, att, want, report = reference
    lm = SETUPS[setup](_planted_model())
    neutral = neutral_set(lm, neutral_passages()[:6])
    st = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=BUDGET)
    assert st.fix.targets == want.fix.targets and st.chosen == want.chosen
    for p, q in zip(want.sweep, st.sweep):
        assert q.strength == p.strength
        assert q.reduction == pytest.approx(p.reduction, abs=1e-4, nan_ok=True)
        assert q.kl == pytest.approx(p.kl, rel=1e-4, abs=1e-6, nan_ok=True)
    # The fix travels with every pass of verify (inside the traces where the backend puts edits there).
    got = verify(lm, _loaded(PLANT_MORE).recipe, st.fix, neutral, gates=GATES)
    assert not lm.edits and got["passed"] == report["passed"]
    for key in ("reduction", "kl", "clean_agreement"):
        assert got[key]["value"] == pytest.approx(report[key]["value"], rel=1e-4, abs=1e-6)


def test_the_remote_simulation_really_serializes_each_trace(monkeypatch):
    """``remote="local"`` goes through nnsight's request serialization (what NDIF receives), not a plain local trace."""
    from nnsight.schema.request import RequestModel

    sent = []
    real = RequestModel.serialize
    monkeypatch.setattr(RequestModel, "serialize", staticmethod(lambda *a, **k: sent.append(1) or real(*a, **k)))
    lm = simulate_remote(tiny_model("llama"))
    record(lm, _loaded(PLANT_RECIPE).recipe, batch_size=8)
    assert sent
