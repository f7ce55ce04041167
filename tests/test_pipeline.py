"""The pipeline from Python: each stage and the whole run make what the CLI makes, number for number."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run as cli
from test_cli_fix import LETTER_COPY, LOOSE, planted_dir  # noqa: F401 - `planted_dir`: the planted model's folder (a fixture)
from test_steer import PLANT_MORE

import mechfix
from mechfix.artifacts import load_artifact
from mechfix.defaults import MAX_HELPFUL_LOSS, MAX_OVERSHOOT
from mechfix.errors import GateError
from mechfix.stages.sweep import Budget
from mechfix.stages.verify import gates_for

# The CLI options below as Python values: LOOSE's budget with --min-clean-agreement 0.9, and the gates verify applies.
BUDGET = Budget(max_kl=5.0, min_clean_agreement=0.9, min_capability=0.0, max_helpful_loss=MAX_HELPFUL_LOSS, min_clean_margin=0.0)
GATES = gates_for(0.3, 5.0, 0.9, 0.0, MAX_HELPFUL_LOSS, 0.0, MAX_OVERSHOOT)
REPORT_NUMBERS = ("passed", "before", "after", "reduction", "kl", "clean_agreement", "clean_margin", "control_change", "gates")


@pytest.fixture()
def by_cli(monkeypatch, capsys, tmp_path, planted_dir):
    """``mechfix run`` on the planted model: its folder and its --json summary."""
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    out = tmp_path / "cli"
    code, stdout, _ = cli(monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--model", str(planted_dir),
                          "--portable", "--top-heads", "1", "--min-reduction", "0.3", "--min-clean-agreement", "0.9",
                          *LOOSE, "--json")
    summary = json.loads(stdout)
    assert code == (0 if summary["passed"] else 1)
    return recipe, out, summary


def _same_tensors(a, b) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=0, atol=0, msg=k)


def _same_report(a: dict, b: dict) -> None:
    assert {k: a[k] for k in REPORT_NUMBERS} == {k: b[k] for k in REPORT_NUMBERS}


def test_each_stage_from_python_makes_the_artifacts_and_report_of_the_cli_run(by_cli, planted_dir, tmp_path):
    recipe, out, summary = by_cli
    lm = mechfix.load_model(str(planted_dir))
    rec = mechfix.record(recipe, lm, out=tmp_path / "plant.rec.safetensors")
    _same_tensors(rec, load_artifact(out / "plant.rec.safetensors"))
    assert rec.manifest["summary"] == load_artifact(out / "plant.rec.safetensors").manifest["summary"]
    att = mechfix.attribute(rec, lm)
    _same_tensors(att, load_artifact(out / "plant.attr.safetensors"))
    fix = mechfix.steer(att, rec, lm, top_heads=1, portable=True, budget=BUDGET, capabilities=[LETTER_COPY],
                        out=tmp_path / "plant.fix.safetensors")
    _same_tensors(fix, load_artifact(out / "plant.fix.safetensors"))
    assert fix.manifest["fix"]["op"] == summary["fix"]["op"] and fix.manifest["fix"]["strength"] == summary["fix"]["strength"]
    report = mechfix.verify(recipe, tmp_path / "plant.fix.safetensors", lm, gates=GATES, capabilities=[LETTER_COPY])
    _same_report(report, json.loads((out / "plant.verify.json").read_text()))
    assert report["reduction"] == summary["verify"]["reduction"]


def test_the_whole_run_from_python_writes_the_folder_the_cli_writes(by_cli, planted_dir, tmp_path):
    recipe, out, summary = by_cli
    said = []
    result = mechfix.run(recipe, tmp_path / "py", str(planted_dir), top_heads=1, portable=True, budget=BUDGET, min_reduction=0.3,
                         capabilities=[LETTER_COPY], on_stage=lambda stage, made: said.append((stage, made is None)))
    assert said == [(s, start) for s in ("record", "attribute", "steer", "verify") for start in (True, False)]
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == sorted(p.name for p in out.iterdir())
    assert result.passed == summary["passed"] and result.steer_error is None
    _same_report(result.report, json.loads((out / "plant.verify.json").read_text()))
    for name in ("plant.rec.safetensors", "plant.attr.safetensors", "plant.fix.safetensors"):
        _same_tensors(load_artifact(tmp_path / "py" / name), load_artifact(out / name))


def test_a_run_whose_steer_finds_no_fix_returns_why_and_still_writes_the_page(planted_dir, tmp_path):
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    impossible = Budget(max_kl=0.0, min_clean_agreement=1.0, min_capability=None, max_helpful_loss=None, min_clean_margin=None)
    result = mechfix.run(recipe, tmp_path / "py", str(planted_dir), top_heads=1, op="scale", budget=impossible,
                         capabilities=[LETTER_COPY])
    assert isinstance(result.steer_error, GateError) and result.fix is None and result.report is None and not result.passed
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == [
        "plant-heads.png", "plant.attr.safetensors", "plant.rec.safetensors", "plant.report.html"]
