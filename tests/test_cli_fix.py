"""The CLI of steer, verify, run and export on a tiny planted model: JSON keys, exit codes, files."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import gguf
import pytest
from test_attribute import _planted_model
from test_cli import run
from tiny import save_model_dir
from test_steer import PLANT_MORE

# The planted head is far cruder than a real one (see test_steer): it is the model's only way to copy a letter,
# so any fix on it costs KL, clean margin and the one capability it has (copying a letter, tests/data).
LETTER_COPY = str(Path(__file__).parent / "data" / "letter-copy.jsonl")
LOOSE = ("--max-kl", "5", "--min-clean-margin", "0", "--min-capability", "0", "--capabilities", LETTER_COPY)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    return save_model_dir(_planted_model(), tmp_path_factory.mktemp("planted-model"))


@pytest.fixture()
def pipeline(monkeypatch, capsys, tmp_path, planted_dir):
    """A recipe, recording and attribution of the planted model, made through the CLI."""
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    rec, att = tmp_path / "plant.rec.safetensors", tmp_path / "plant.attr.safetensors"
    assert run(monkeypatch, capsys, "record", str(recipe), "--model", str(planted_dir), "--out", str(rec))[0] == 0
    assert run(monkeypatch, capsys, "attribute", str(rec), "--out", str(att), "--method", "atp")[0] == 0
    return recipe, rec, att


def test_steer_then_verify_print_the_promised_json_and_junit(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    fix = tmp_path / "plant.fix.safetensors"
    code, stdout, _ = run(monkeypatch, capsys, "steer", str(att), "--out", str(fix), "--op", "scale", "--top-heads", "1",
                          *LOOSE, "--json")
    assert code == 0
    obj = json.loads(stdout)
    assert obj["kind"] == "heads" and obj["op"] == "scale" and obj["targets"] == ["L1.H2"]
    assert obj["sweep"][0]["strength"] == 0 and obj["chosen"]["strength"] == obj["strength"] > 0
    assert obj["artifact"] == str(fix) and fix.is_file()

    code, stdout, stderr = run(monkeypatch, capsys, "show", str(fix))
    assert code == 0 and "fix artifact" in stderr and "input attribution" in stderr

    junit = tmp_path / "verify.xml"
    code, stdout, _ = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--min-reduction", "0.3",
                          "--min-clean-agreement", "0.9", *LOOSE, "--junit", str(junit), "--json")
    report = json.loads(stdout)
    for key in ("passed", "before", "after", "reduction", "kl", "clean_agreement", "control_change", "anti_steerable", "gates"):
        assert key in report
    assert code == (0 if report["passed"] else 1)
    assert report["recipe"]["same_as_training"] is True
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == str(len(report["gates"])) and int(suite.get("failures")) == sum(not g["passed"] for g in report["gates"])
    # No helpful condition in this recipe: that gate is left out, and the report says why.
    assert [g["metric"] for g in report["gates"]] == ["reduction", "kl", "clean_agreement", "capability_kept", "clean_margin_kept", "overshoot"]
    assert any("helpful condition" in w for w in report["warnings"])
    assert report["capabilities"]["tasks"]["letter-copy"]["measurable"]

    code, stdout, stderr = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--min-reduction", "2",
                               *LOOSE, "--junit", str(junit))
    assert code == 1 and stdout == "" and "FAILED" in stderr
    assert ET.parse(junit).getroot().get("failures") != "0"


def test_verify_against_another_model_reports_the_mismatch_and_exits_2(monkeypatch, capsys, tmp_path, pipeline, tiny_model_dir):
    recipe, rec, att = pipeline
    fix = tmp_path / "f.fix.safetensors"
    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(fix), "--top-heads", "1", *LOOSE)[0] == 0
    junit = tmp_path / "v.xml"
    code, stdout, stderr = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--model", str(tiny_model_dir),
                               "--junit", str(junit), "--json")
    assert code == 2
    assert "was made with model" in " ".join(stderr.split())
    report = json.loads(stdout)
    assert report["passed"] is False and report["error"].startswith("model mismatch")
    assert ET.parse(junit).getroot().get("errors") == "7"  # every gate, the helpful one included: nothing was measured


def test_steer_refuses_bad_input_and_an_impossible_budget_writing_nothing(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    out = tmp_path / "x.fix.safetensors"
    code, _, stderr = run(monkeypatch, capsys, "steer", str(rec), "--out", str(out))
    assert code == 2 and "needs an attribution artifact" in " ".join(stderr.split())
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(out), "--op", "subtract")
    assert code == 2 and "does not fit a heads fix" in stderr
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(out), "--strengths", "a,b")
    assert code == 2 and "comma-separated numbers" in stderr
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(out), "--record", str(att))
    assert code == 2
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(out), "--max-kl", "0")
    assert code == 1 and "every point measured" in stderr and "no heads fix" in " ".join(stderr.split())
    assert not out.exists()
    # With --json the same refusal is one object on stdout: no fix, the reason, every point measured.
    code, stdout, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(out), "--max-kl", "0", "--json")
    summary = json.loads(stdout)
    assert code == 1 and summary["fix"] is None and summary["artifact"] is None and not out.exists()
    assert summary["why"].startswith("no heads fix") and summary["budget"]["max_kl"] == 0
    assert summary["sweep"] and all(p["kl"] is None or p["kl"] > 0 or p["strength"] == 0 for p in summary["sweep"])


def test_export_writes_a_vector_fix_and_refuses_a_heads_fix(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    vec, heads = tmp_path / "v.fix.safetensors", tmp_path / "h.fix.safetensors"
    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(vec), "--kind", "vector", "--max-kl", "50",
               "--min-clean-agreement", "0")[0] == 0
    code, stdout, _ = run(monkeypatch, capsys, "export", str(vec), "--out", str(tmp_path / "cv.gguf"), "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["model_hint"] == "llama"
    reader = gguf.GGUFReader(str(tmp_path / "cv.gguf"))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(heads), "--top-heads", "1", *LOOSE)[0] == 0
    code, _, stderr = run(monkeypatch, capsys, "export", str(heads), "--out", str(tmp_path / "h.gguf"))
    assert code == 2 and "only vector fixes export" in stderr and not (tmp_path / "h.gguf").exists()
    for fmt in ("peft", "hf"):
        code, _, stderr = run(monkeypatch, capsys, "export", str(vec), "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 2 and "residual stream" in stderr and "--format gguf" in stderr and not (tmp_path / fmt).exists()
    code, _, stderr = run(monkeypatch, capsys, "export", str(vec), "--out", str(tmp_path / "x.gguf"), "--format", "onnx")
    assert code == 2 and "--format" in stderr


def test_run_chains_every_stage_into_one_folder(monkeypatch, capsys, tmp_path, planted_dir):
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    out = tmp_path / "runs" / "a"
    code, stdout, stderr = run(monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--model", str(planted_dir),
                               "--portable", "--top-heads", "1", "--min-reduction", "0.3", "--min-clean-agreement", "0.9",
                               *LOOSE, "--json")
    summary = json.loads(stdout)
    assert code == (0 if summary["passed"] else 1)
    assert summary["fix"]["op"] in ("ablate", "scale")  # --portable: only operations that export as weights
    names = sorted(p.name for p in out.iterdir())
    assert names == ["plant-heads.png", "plant.attr.safetensors", "plant.fix.safetensors", "plant.rec.safetensors",
                     "plant.report.html", "plant.verify.json"]
    assert summary["top_components"][0] == "L1.H2" and summary["fix"]["targets"] == ["L1.H2"]
    saved = json.loads((out / "plant.verify.json").read_text())
    assert saved["reduction"] == summary["verify"]["reduction"]
    assert "1/4 record" in stderr and "4/4 verify" in stderr


def test_steer_portable_makes_a_fix_that_exports_as_an_adapter_and_a_checkpoint_verify_and_peft_read(
    monkeypatch, capsys, tmp_path, pipeline, planted_dir
):
    from transformers import AutoModelForCausalLM

    recipe, rec, att = pipeline
    fix = tmp_path / "p.fix.safetensors"
    code, stdout, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(fix), "--portable", "--top-heads", "1",
                               *LOOSE, "--json")
    assert code == 0
    obj = json.loads(stdout)
    assert obj["op"] in ("ablate", "scale")
    assert {c["op"] for c in obj["selection"]["candidates"]} == {"ablate", "scale"}
    note = next(n for n in obj["selection"]["notes"] if n.startswith("--portable"))
    assert "project (rectified)" in note and "steer (" in note and "restore (" in note

    adapter = tmp_path / "p-adapter"
    code, stdout, _ = run(monkeypatch, capsys, "export", str(fix), "--format", "peft", "--out", str(adapter), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["modules"] == ["model.layers.1.self_attn.o_proj"]
    assert info["fix_effect"] > 0.01 and info["max_abs_diff"] < 1e-5
    assert run(monkeypatch, capsys, "show", str(adapter))[0] == 0
    # verify reads the adapter as a LoRA fix and finds what it finds for the heads fix.
    args = ("--min-reduction", "0.3", "--min-clean-agreement", "0.9", *LOOSE, "--json")
    heads_code, heads_out, _ = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), *args)
    code, stdout, _ = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(adapter), "--model", str(planted_dir), *args)
    heads_report, lora_report = json.loads(heads_out), json.loads(stdout)
    assert lora_report["fix"]["kind"] == "lora" and code == heads_code
    for key in ("reduction", "kl", "clean_agreement"):
        assert lora_report[key]["value"] == pytest.approx(heads_report[key]["value"], abs=1e-4)

    merged = tmp_path / "p-hf"
    code, stdout, _ = run(monkeypatch, capsys, "export", str(fix), "--format", "hf", "--out", str(merged), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["max_abs_diff"] < 1e-5 and info["config_changed"] == {}
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"
    # Writing again replaces an earlier export; a folder holding something else is refused, untouched.
    assert run(monkeypatch, capsys, "export", str(fix), "--format", "hf", "--out", str(merged))[0] == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    code, _, stderr = run(monkeypatch, capsys, "export", str(fix), "--format", "hf", "--out", str(other))
    assert code == 2 and "did not write as a merged checkpoint (notes.txt)" in stderr and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_portable_refusals_and_exports_that_could_not_be_exact_exit_2_writing_nothing(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    for extra, words in [(("--op", "project"), "does not export exactly"), (("--gate", "probe"), "--gate"),
                         (("--kind", "vector"), "vector fix cannot")]:
        out = tmp_path / "x.fix.safetensors"
        code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(out), "--portable", *extra)
        assert code == 2 and words in " ".join(stderr.split()) and not out.exists()
    code, _, stderr = run(monkeypatch, capsys, "run", str(recipe), "--out", str(tmp_path / "r"), "--portable", "--gate", "probe")
    assert code == 2 and not (tmp_path / "r").exists()
    project = tmp_path / "proj.fix.safetensors"
    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(project), "--op", "project", "--top-heads", "1", *LOOSE)[0] == 0
    for fmt in ("peft", "hf"):
        code, _, stderr = run(monkeypatch, capsys, "export", str(project), "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 2 and "rectified" in stderr and "--portable" in " ".join(stderr.split())
        assert not (tmp_path / fmt).exists()


def test_run_on_a_recipe_without_behaviour_stops_at_steer_and_still_prints_its_json(monkeypatch, capsys, tmp_path, planted_dir):
    """Peers who say the right answer under pressure too: nothing to fix, so no fix, no verify, and the reason."""
    recipe = tmp_path / "same.yaml"
    recipe.write_text(PLANT_MORE.replace('pressure: {vars: {said: "{wrong}"}}', 'pressure: {vars: {said: "{correct}"}}'))
    out = tmp_path / "runs" / "same"
    code, stdout, stderr = run(monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--model", str(planted_dir),
                               *LOOSE, "--json")
    summary = json.loads(stdout)
    assert code == 1 and summary["passed"] is False and summary["fix"] is None and summary["verify"] is None
    assert summary["why"].startswith("steer: the training split shows no behaviour to fix")
    # The page still shows the diagnosis, and says there is no fix.
    assert sorted(p.name for p in out.iterdir()) == ["plant-heads.png", "plant.attr.safetensors", "plant.rec.safetensors",
                                                     "plant.report.html"]
    page = (out / "plant.report.html").read_text()
    assert "No fix was given" in page and 'id="verdict">not verified' in page
    assert set(summary["artifacts"]) == {"record", "attribution", "plot", "report"}
    assert "no behaviour to fix" in " ".join(stderr.split())


LORA_FAST = ("--rank", "2", "--steps", "12", "--lr", "0.02", "--kl-weight", "1")


def test_steer_lora_writes_an_adapter_folder_that_show_verify_and_compare_read(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    folder, heads = tmp_path / "plant.lora", tmp_path / "h.fix.safetensors"
    code, stdout, stderr = run(monkeypatch, capsys, "steer", str(att), "--kind", "lora", "--out", str(folder), "--top-heads", "1",
                               *LORA_FAST, *LOOSE, "--json")
    assert code == 0, stderr
    obj = json.loads(stdout)
    assert obj["kind"] == "lora" and obj["targets"] == ["L1.o_proj[H2]"] and obj["strength"] == 1.0
    assert obj["training"]["steps"] == 12 and obj["training"]["folded_strength"] == obj["chosen"]["strength"]
    # One rank-2 update reading head 2's 16 columns of a 64-wide projection: 2*16 + 64*2 numbers.
    assert obj["parameters"] == 2 * 16 + 64 * 2
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    code, _, stderr = run(monkeypatch, capsys, "show", str(folder))
    assert code == 0 and "lora / lora on L1.o_proj[H2]" in stderr and "training: 12 steps" in stderr

    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(heads), "--op", "scale", "--top-heads", "1", *LOOSE)[0] == 0
    code, stdout, stderr = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(folder), "--compare", str(heads),
                               "--min-reduction", "0.1", "--min-clean-agreement", "0.5", *LOOSE, "--json")
    report = json.loads(stdout)
    assert code == (0 if report["passed"] else 1)
    rows = report["comparison"]
    assert [r["kind"] for r in rows] == ["lora", "heads"] and len(report["compare"]) == 1
    assert rows[0]["parameters"] == obj["parameters"] and rows[1]["parameters"] == 0  # scale reads no stored numbers
    assert rows[0]["reduction"] == report["reduction"]["value"]
    assert rows[1]["reduction"] == report["compare"][0]["reduction"]["value"]
    # The fixes were measured on the same decisions, against the same unfixed model.
    assert report["compare"][0]["before"] == report["before"]

    code, _, stderr = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(folder), "--compare", str(heads),
                          "--min-reduction", "0.1", "--min-clean-agreement", "0.5", *LOOSE)
    assert "side by side" in stderr and "lora / lora" in stderr and "heads / scale" in stderr

    code, _, stderr = run(monkeypatch, capsys, "export", str(folder), "--out", str(tmp_path / "l.gguf"))
    assert code == 2 and "PEFT adapter" in " ".join(stderr.split()) and not (tmp_path / "l.gguf").exists()


def test_steer_lora_refuses_bad_output_and_settings_writing_nothing(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    a_file = tmp_path / "taken.lora"
    a_file.write_text("x")
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--kind", "lora", "--out", str(a_file))
    assert code == 2 and "is a file" in stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--kind", "lora", "--out", str(mine))
    assert code == 2 and "will not replace" in " ".join(stderr.split())
    out = tmp_path / "new.lora"
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--kind", "lora", "--out", str(out), "--lora-scope", "all")
    assert code == 2 and "--lora-scope" in stderr
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--kind", "lora", "--out", str(out), "--op", "scale")
    assert code == 2 and "does not fit a lora fix" in stderr
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--kind", "lora", "--out", str(out), *LORA_FAST, "--max-kl", "0")
    assert code == 1 and "no lora fix" in " ".join(stderr.split())
    assert not out.exists() and (mine / "notes.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_with_a_lora_fix_writes_the_adapter_folder(monkeypatch, capsys, tmp_path, planted_dir):
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    out = tmp_path / "runs"
    code, stdout, stderr = run(monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--model", str(planted_dir),
                               "--kind", "lora", "--top-heads", "1", *LORA_FAST, "--min-reduction", "0.1",
                               "--min-clean-agreement", "0.5", *LOOSE, "--json")
    assert stdout, stderr
    summary = json.loads(stdout)
    assert code == (0 if summary["passed"] else 1), stderr
    assert (out / "plant.lora" / "adapter_config.json").is_file() and not (out / "plant.fix.safetensors").exists()
    # run attributes with exact patching, and the recipe is token-aligned: the module that carries the behaviour
    # when restored at every position, adapted whole (rank 2, 64 wide: 2*64 + 64*2 numbers).
    assert summary["fix"]["kind"] == "lora" and summary["fix"]["targets"] == ["L1.o_proj"]
    assert summary["fix"]["parameters"] == 2 * 64 + 64 * 2


def test_a_bad_capability_task_is_refused_before_any_work_and_nothing_is_written(monkeypatch, capsys, tmp_path, pipeline):
    recipe, rec, att = pipeline
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the code is J. the code is ", "answer": "J"}\n')
    out = tmp_path / "never"
    code, _, stderr = run(monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--capabilities", str(bad))
    assert code == 2 and "line 1: the item has no distractors" in " ".join(stderr.split()) and not out.exists()
    code, _, stderr = run(monkeypatch, capsys, "steer", str(att), "--out", str(tmp_path / "f.fix.safetensors"),
                          "--capabilities", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "does not exist" in stderr and not (tmp_path / "f.fix.safetensors").exists()


def test_the_command_line_defaults_of_every_gate_are_the_ones_steer_and_verify_use():
    """steer, verify and run show and use the thresholds of mechfix.defaults, which steer's Budget also holds."""
    import inspect

    from mechfix import defaults
    from mechfix.cli.run import run as run_cmd
    from mechfix.cli.steer import steer as steer_cmd
    from mechfix.cli.verify import verify as verify_cmd
    from mechfix.stages.sweep import Budget

    expected = {"max_kl": defaults.MAX_KL, "min_clean_agreement": defaults.MIN_CLEAN_AGREEMENT,
                "min_capability": defaults.MIN_CAPABILITY, "max_helpful_loss": defaults.MAX_HELPFUL_LOSS,
                "min_clean_margin": defaults.MIN_CLEAN_MARGIN}
    assert {k: getattr(Budget(), k) for k in expected} == expected
    for cmd in (steer_cmd, verify_cmd, run_cmd):
        params = inspect.signature(cmd).parameters
        assert {k: params[k].default for k in expected} == expected, cmd.__name__
    for cmd in (verify_cmd, run_cmd):
        assert inspect.signature(cmd).parameters["min_reduction"].default == defaults.MIN_REDUCTION
