"""A fix's edits travel inside nnsight traces (the shape a run on NDIF takes), with the numbers of the hooks backend."""

from __future__ import annotations

import pytest
import torch
from conftest import MINI_RECIPE
from test_attribute import _loaded
from test_steer import LOOSE, PLANT_MORE, planted_setup
from test_attribute import _planted_model
from tiny import tiny_model

from mechfix.engine.backends import nnsight as traces
from mechfix.engine.backends import use_backend
from mechfix.errors import BadInputError
from mechfix.measure.evaluate import neutral_kl, neutral_passages, neutral_set, score_requests
from mechfix.fixes.adapter import LoraWeights
from mechfix.fixes.fix import Fix, RowFixes, apply_fix, apply_row_fixes
from mechfix.engine.batches import final_hidden, pad_batch
from mechfix.stages.record import decision_requests
from mechfix.stages.steer import steer
from mechfix.stages.sweep import Budget
from mechfix.stages.verify import gates_for, verify

TOL = dict(atol=1e-4, rtol=1e-4)


def remote_shaped(lm):
    """``lm`` as ``--remote`` runs it, but here: traces only, every tail rerunning its prompt, edits inside the traces."""
    lm = use_backend(lm, "nnsight")
    lm.trace_prefixes, lm.edits_in_traces = False, True
    return lm


def _fixes(lm, seed: int = 0) -> dict[str, Fix]:
    g = torch.Generator().manual_seed(seed)
    dh, d = lm.head_dim, lm.hidden
    heads = dict(layers=[0, 2], heads=[1, 3], vectors=torch.randn(2, dh, generator=g), means=torch.randn(2, dh, generator=g))
    module = f"{lm.spec.layers}.1.{lm.spec.attn_out}"
    lora = LoraWeights(modules=[module], a=[0.3 * torch.randn(2, lm.n_heads * dh, generator=g)],
                       b=[0.3 * torch.randn(d, 2, generator=g)], heads=[None])
    return {
        "project": Fix(op="project", strength=1.5, model=lm.identity, **heads),
        "scale": Fix(op="scale", strength=0.7, model=lm.identity, **heads),
        "subtract": Fix(op="subtract", layers=[1], heads=[], vectors=torch.randn(1, d, generator=g),
                        means=torch.zeros(1, d), strength=0.8, model=lm.identity),
        "lora": Fix(op="lora", layers=[1], heads=[], vectors=torch.zeros(0), means=torch.zeros(0), strength=1.0,
                    model=lm.identity, lora=lora),
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("op", ["project", "scale", "subtract", "lora"])
def test_scores_with_a_fix_whose_edits_travel_in_the_traces_equal_the_hooks_scores(arch, op):
    hooks, remote = tiny_model(arch), remote_shaped(tiny_model(arch))
    reqs = {"x": decision_requests(hooks, _loaded(MINI_RECIPE).recipe, [0, 1, 2]).requests["pressure"]}
    fix = _fixes(hooks)[op]
    want = score_requests(hooks, reqs, fix, fix.strength, batch_size=2)["x"]
    got = score_requests(remote, reqs, fix, fix.strength, batch_size=2)["x"]
    assert not remote.edits  # every edit came off again
    torch.testing.assert_close(want, got, **TOL)
    assert not torch.allclose(want, score_requests(hooks, reqs, batch_size=2)["x"], atol=1e-3)  # the fix acted


def test_row_fixes_travel_in_the_traces_each_row_with_its_own_fix():
    hooks, remote = tiny_model("qwen2"), remote_shaped(tiny_model("qwen2"))
    by_cond = decision_requests(hooks, _loaded(MINI_RECIPE).recipe, [0, 1, 2]).requests
    reqs = {"x": by_cond["pressure"] + by_cond["clean"]}
    fixes = [_fixes(hooks, seed)["project"] for seed in range(3)]
    owner = [0, 1, 2, 1, 0, 2]
    out = []
    for lm in (hooks, remote):
        rows = RowFixes(fixes)
        with apply_row_fixes(lm, rows, 1.5):
            out.append(score_requests(lm, reqs, batch_size=4, on_rows=lambda idx: rows.select([owner[i] for i in idx]))["x"])
    torch.testing.assert_close(*out, **TOL)


@pytest.mark.parametrize("op", ["project", "subtract"])
def test_kl_on_neutral_text_computed_in_the_traces_equals_the_hooks_kl(op):
    hooks, remote = tiny_model("llama"), remote_shaped(tiny_model("llama"))
    fix = _fixes(hooks)[op]
    passages = neutral_passages()[:3]
    want = neutral_kl(hooks, fix, [0.5, 1.5], neutral_set(hooks, passages, stride=2))
    got = neutral_kl(remote, fix, [0.5, 1.5], neutral_set(remote, passages, stride=2))
    assert want[1] > want[0] > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-4)


def test_the_local_nnsight_backend_also_computes_kl_inside_its_traces_with_the_hooks_numbers(monkeypatch):
    hooks, local = tiny_model("llama"), use_backend(tiny_model("llama"), "nnsight")
    fix = _fixes(hooks)["scale"]
    passages = neutral_passages()[:3]
    want = neutral_kl(hooks, fix, [0.7], neutral_set(hooks, passages))
    calls = []
    real_fixed, real_base = traces.kl_fixed, traces.kl_base
    monkeypatch.setattr(traces, "kl_fixed", lambda *a: calls.append("fixed") or real_fixed(*a))
    monkeypatch.setattr(traces, "kl_base", lambda *a: calls.append("base") or real_base(*a))
    got = neutral_kl(local, fix, [0.7], neutral_set(local, passages))
    n = len(neutral_set(local, passages).batches)
    # One strength and no reuse: hooks compare full distributions, the traces the cached terms; the same KL.
    assert sorted(calls) == ["base"] * n + ["fixed"] * n and want[0] > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-6, rtol=1e-4)


def test_steer_and_verify_with_edits_in_the_traces_choose_and_report_what_hooks_do():
    lm, rec, att, neutral = planted_setup(_planted_model())
    remote = remote_shaped(_planted_model())
    budget = Budget(max_kl=5.0, min_clean_agreement=0.95, min_clean_margin=None)
    a = steer(lm, att, rec, neutral, kind="heads", op="scale", top=1, budget=budget)
    b = steer(remote, att, rec, neutral_set(remote, neutral_passages()[:6]), kind="heads", op="scale", top=1, budget=budget)
    assert b.fix.targets == a.fix.targets == ["L1.H2"] and b.chosen == a.chosen
    for p, q in zip(a.sweep, b.sweep):
        assert p.strength == q.strength
        # A point measured only as far as the choice needed has NaN for what was not measured, in both.
        assert q.reduction == pytest.approx(p.reduction, abs=1e-4, nan_ok=True)
        assert q.kl == pytest.approx(p.kl, rel=1e-4, abs=1e-6, nan_ok=True)
    recipe = _loaded(PLANT_MORE).recipe
    gates = gates_for(0.3, LOOSE.max_kl, 0.9)
    ra = verify(lm, recipe, a.fix, neutral, gates=gates)
    rb = verify(remote, recipe, b.fix, neutral_set(remote, neutral_passages()[:6]), gates=gates)
    assert rb["passed"] == ra["passed"]
    for key in ("reduction", "kl", "clean_agreement"):
        assert rb[key]["value"] == pytest.approx(ra[key]["value"], rel=1e-4, abs=1e-6)


def test_a_plain_forward_pass_refuses_to_run_while_edits_wait_for_a_trace():
    remote = remote_shaped(tiny_model("llama"))
    ids, mask = pad_batch(remote, [[1, 5, 6, 7]])
    final_hidden(remote, ids, mask)  # nothing pending: fine locally
    with apply_fix(remote, _fixes(remote)["project"]):
        with pytest.raises(BadInputError, match="outside an nnsight trace"):
            final_hidden(remote, ids, mask)
    remote.remote = True
    with pytest.raises(BadInputError, match="outside an nnsight trace"):
        final_hidden(remote, ids, mask)


def test_steer_and_verify_on_the_cli_with_remote_run_every_pass_as_a_trace(monkeypatch, capsys, tmp_path):
    """The whole --remote path of the CLI, with the one network step (reaching NDIF) replaced by a local model."""
    import json

    import mechfix.models
    from test_traces import _run_cli
    from tiny import save_model_dir

    folder = save_model_dir(_planted_model(), tmp_path / "planted")
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    rec, att = tmp_path / "p.rec.safetensors", tmp_path / "p.attr.safetensors"
    assert _run_cli(monkeypatch, capsys, "record", str(recipe), "--model", str(folder), "--out", str(rec))[0] == 0
    assert _run_cli(monkeypatch, capsys, "attribute", str(rec), "--out", str(att), "--top", "5")[0] == 0
    loads = []

    def fake_remote(spec, **kwargs):
        loads.append(spec)
        return remote_shaped(mechfix.models.load_model(str(folder)))

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setattr(mechfix.models, "load_remote", fake_remote)
    out = {}
    for name, extra in (("hooks", []), ("remote", ["--remote", "--model", "someone/planted"])):
        fix = tmp_path / f"{name}.fix.safetensors"
        budget = ["--max-kl", "5", "--min-clean-margin", "0", "--capabilities", str(tmp_path / "none.jsonl")]
        (tmp_path / "none.jsonl").write_text("".join(
            f'{{"prompt": "count {k} {k + 1}", "answer": " {k + 2}", "distractors": [" {k + 5}"]}}\n' for k in range(6)))
        code, stdout, err = _run_cli(monkeypatch, capsys, "steer", str(att), "--out", str(fix), "--op", "scale",
                                     "--top-heads", "1", "--json", *budget, *extra)
        assert code == 0, err
        steered = json.loads(stdout)
        code, stdout, err = _run_cli(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--json",
                                     "--max-kl", "5", "--min-reduction", "0.3", "--capabilities", str(tmp_path / "none.jsonl"),
                                     *extra)
        assert code in (0, 1), err
        out[name] = (steered, json.loads(stdout))
    assert loads == ["someone/planted", "someone/planted"]
    (sh, vh), (sr, vr) = out["hooks"], out["remote"]
    assert sr["targets"] == sh["targets"] == ["L1.H2"] and sr["strength"] == sh["strength"]
    assert [p["strength"] for p in sr["sweep"]] == [p["strength"] for p in sh["sweep"]]
    assert vr["passed"] == vh["passed"]
    for key in ("reduction", "kl", "clean_agreement"):
        assert vr[key]["value"] == pytest.approx(vh[key]["value"], rel=1e-4, abs=1e-6)
