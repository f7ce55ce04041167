"""The CLI contract: --json on stdout, exit codes, nothing written on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mechfix.artifacts import load_artifact
from mechfix.cli import main


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mechfix", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_record_json_prints_one_object_with_the_promised_keys(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    out = tmp_path / "m.rec.safetensors"
    code, stdout, _ = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir),
                          "--out", str(out), "--json", "--batch-size", "3")
    assert code == 0
    obj = json.loads(stdout)
    for key in ("artifact", "model", "decisions", "effect", "rate", "control_effect"):
        assert key in obj
    assert obj["decisions"] == 15 and obj["artifact"] == str(out)
    assert set(obj["effect"]) == {"mean", "ci95", "n"} and len(obj["effect"]["ci95"]) == 2
    # Harm counts the decisions the model gets right alone; the recipe has no helpful condition, so no help.
    known = sum(1 for k in range(5) if load_artifact(out).tensors["scores/clean"][k].argmax() == 0)
    assert obj["harm"]["decisions"] == known and obj["harm"]["flips"]["n"] == known and obj["help"] is None
    assert out.is_file()

    code, stdout, _ = run(monkeypatch, capsys, "show", str(out), "--json")
    assert code == 0
    shown = json.loads(stdout)
    assert shown["kind"] == "record" and shown["tensors"]["acts/pressure/heads"]["shape"] == [5, 3, 4, 16]

    code, stdout, stderr = run(monkeypatch, capsys, "show", str(out))
    assert code == 0 and stdout == ""
    assert "record artifact" in stderr and "acts/pressure/heads" in stderr and "Ana: Lyon." in stderr


def test_record_human_output_goes_to_stderr(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    code, stdout, stderr = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir),
                               "--out", str(tmp_path / "x.safetensors"))
    assert code == 0 and stdout == ""
    assert "effect (pressure - clean)" in stderr and "control effect" in stderr


def test_a_malformed_recipe_exits_2_and_writes_nothing(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(mini_recipe_path.read_text().replace("family:", "familly:"))
    out = tmp_path / "o.safetensors"
    code, stdout, stderr = run(monkeypatch, capsys, "record", str(bad), "--model", str(tiny_model_dir), "--out", str(out))
    assert code == 2 and stdout == ""
    assert "unknown key 'familly'" in " ".join(stderr.split())
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "mini.yaml"]


def test_unknown_model_and_unwritable_output_exit_2_and_write_nothing(monkeypatch, capsys, tmp_path, mini_recipe_path):
    out = tmp_path / "o.safetensors"
    code, _, stderr = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tmp_path / "nope"),
                          "--out", str(out))
    assert code == 2 and "does not exist" in stderr and not out.exists()
    code, _, stderr = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--out", str(tmp_path / "no" / "o.st"))
    assert code == 2 and "does not exist" in " ".join(stderr.split())
    code, _, stderr = run(monkeypatch, capsys, "record", "no-such-recipe")
    assert code == 2 and "mechfix recipes" in " ".join(stderr.split())


def test_show_refuses_a_file_that_is_not_an_artifact(monkeypatch, capsys, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    code, _, stderr = run(monkeypatch, capsys, "show", str(junk))
    assert code == 2 and "corrupt" in stderr


def test_recipes_lists_the_builtins_as_json(monkeypatch, capsys):
    code, stdout, _ = run(monkeypatch, capsys, "recipes", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(stdout)["recipes"]}
    assert rows["conformity"]["rounds"] is None and rows["commons-live"]["rounds"] == 4


def test_usage_errors_exit_2_and_help_shows_examples(monkeypatch, capsys):
    code, _, _ = run(monkeypatch, capsys, "record")
    assert code == 2
    code, stdout, _ = run(monkeypatch, capsys, "record", "--help")
    assert code == 0 and "mechfix record recipes/conformity.yaml" in stdout
    for cmd in ("show", "recipes", "attribute"):
        code, stdout, _ = run(monkeypatch, capsys, cmd, "--help")
        assert code == 0 and f"mechfix {cmd}" in stdout


def test_the_installed_entry_point_maps_bad_input_to_exit_2(tmp_path):
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "mechfix.cli", "record", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "was not found" in p.stderr and p.stdout == ""


def test_an_interrupted_record_exits_130_and_leaves_no_artifact(monkeypatch, capsys, tmp_path, mini_recipe_path,
                                                                 tiny_model_dir):
    import mechfix.stages.record

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mechfix.stages.record, "record", interrupted)
    out = tmp_path / "o.safetensors"
    code, _, stderr = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir),
                          "--out", str(out))
    assert code == 130 and "interrupted" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini.yaml"]


@pytest.fixture()
def mini_recording(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    rec = tmp_path / "mini.rec.safetensors"
    code, _, _ = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir), "--out", str(rec))
    assert code == 0
    return rec


def test_attribute_json_has_the_promised_keys_and_writes_artifact_and_plot(monkeypatch, capsys, tmp_path, mini_recording):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run(monkeypatch, capsys, "attribute", str(mini_recording), "--top", "4", "--plot", "heat.png",
                          "--json")
    assert code == 0
    obj = json.loads(stdout)
    assert obj["artifact"] == "mini.attr.safetensors" and (tmp_path / "mini.attr.safetensors").is_file()
    assert obj["method"] == "both" and len(obj["top"]) == 4
    for entry in obj["top"]:
        assert {"component", "atp", "exact", "speakers"} <= set(entry)
        assert entry["component"].startswith("L")
    assert set(obj["agreement"]) >= {"spearman", "top5_overlap"}
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    code, _, stderr = run(monkeypatch, capsys, "show", "mini.attr.safetensors")
    flat = " ".join(stderr.split())  # a narrow console wraps the table's title, which names the model's long path
    assert code == 0 and "attribution artifact" in flat and "top components" in flat


def test_attribute_refuses_a_recording_of_another_model(monkeypatch, capsys, tmp_path, mini_recording):
    from tiny import tiny_model

    other = tmp_path / "other"
    lm = tiny_model("llama", seed=1)
    lm.model.save_pretrained(other)
    lm.tokenizer.save_pretrained(other)
    out = tmp_path / "a.attr.safetensors"
    code, stdout, stderr = run(monkeypatch, capsys, "attribute", str(mini_recording), "--model", str(other),
                               "--out", str(out))
    assert code == 2 and stdout == ""
    assert "record again with this model" in " ".join(stderr.split())
    assert not out.exists()


def test_attribute_rejects_bad_input_with_exit_2_and_writes_nothing(monkeypatch, capsys, tmp_path, mini_recording):
    out = tmp_path / "a.attr.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, says in (
        (["--method", "fast"], "--method must be one of"),
        (["--baseline", "calm"], "is not a condition"),
        (["--plot", str(tmp_path / "heat.jpg")], "needs a .png"),
    ):
        code, _, stderr = run(monkeypatch, capsys, "attribute", str(mini_recording), "--out", str(out), *args)
        assert code == 2 and says in " ".join(stderr.split())
    code, _, stderr = run(monkeypatch, capsys, "attribute", str(tmp_path / "missing.rec.safetensors"), "--out", str(out))
    assert code == 2 and "does not exist" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # An attribution is not a recording.
    code, _, _ = run(monkeypatch, capsys, "attribute", str(mini_recording), "--out", str(out), "--method", "atp")
    assert code == 0
    code, _, stderr = run(monkeypatch, capsys, "attribute", str(out), "--out", str(tmp_path / "b.safetensors"))
    assert code == 2 and "needs a record artifact" in " ".join(stderr.split())


def test_the_same_inputs_and_seed_give_byte_identical_artifacts(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    digests = []
    for run_dir in ("one", "two"):
        (tmp_path / run_dir).mkdir()
        monkeypatch.chdir(tmp_path / run_dir)
        rec = "m.rec.safetensors"
        assert run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir), "--out", rec)[0] == 0
        assert run(monkeypatch, capsys, "attribute", rec, "--model", str(tiny_model_dir), "--method", "atp")[0] == 0
        digests.append([hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in (rec, "m.attr.safetensors")])
    assert digests[0] == digests[1]
    code, stdout, _ = run(monkeypatch, capsys, "show", "m.rec.safetensors", "--json")
    assert json.loads(stdout)["manifest"]["created"] == "2026-01-01T00:00:00+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    code, _, err = run(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir), "--out", "x.safetensors")
    assert code == 2 and "SOURCE_DATE_EPOCH" in err and not Path("x.safetensors").exists()


def test_an_unexpected_failure_is_one_line_with_the_traceback_in_a_file(monkeypatch, capsys, tmp_path):
    import mechfix.scenario.recipe

    def broken():
        raise KeyError("boom")

    monkeypatch.setattr(mechfix.scenario.recipe, "builtin_recipes", broken)
    monkeypatch.setenv("MECHFIX_CACHE", str(tmp_path))
    monkeypatch.delenv("MECHFIX_DEBUG", raising=False)
    code, stdout, err = run(monkeypatch, capsys, "recipes")
    assert code == 3 and stdout == "" and "Traceback" not in err
    line = " ".join(err.split())
    assert "unexpected failure in `mechfix recipes`: KeyError: 'boom'" in line and "--debug" in line
    (saved,) = tmp_path.glob("mechfix-*.traceback.txt")
    assert saved.name in line.replace(" ", "") or str(saved) in line
    assert "Traceback" in saved.read_text() and "broken" in saved.read_text()
    code, _, err = run(monkeypatch, capsys, "--debug", "recipes")
    assert code == 3 and "Traceback" in err and "broken" in err
