"""Every path a command reads or writes is checked before any work: exit 2, the problem named, nothing changed on disk."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from mechfix.cli import main
from mechfix.cli.checks import check_paths
from mechfix.errors import BadInputError


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mechfix", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, " ".join(captured.err.split())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def refused(monkeypatch, capsys, folder: Path, *args: str) -> str:
    """Run a command that must be refused: exit 2, no traceback, nothing under ``folder`` changed. Returns stderr."""
    before = snapshot(folder)
    code, stdout, stderr = run(monkeypatch, capsys, *args)
    assert code == 2, stderr
    # mechfix's own message, or the option parser's usage error for a value it refuses itself.
    assert stdout == "" and "Traceback" not in stderr and stderr.startswith(("error:", "Usage:"))
    assert snapshot(folder) == before
    return stderr


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "a.rec.safetensors").write_bytes(b"recording bytes")
    (tmp_path / "a.attr.safetensors").write_bytes(b"attribution bytes")
    (tmp_path / "a.fix.safetensors").write_bytes(b"fix bytes")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return tmp_path


def test_attribute_refuses_to_write_its_output_over_the_recording_it_reads(monkeypatch, capsys, files):
    rec = files / "a.rec.safetensors"
    err = refused(monkeypatch, capsys, files, "attribute", str(rec), "--out", str(rec))
    assert "--out" in err and "same file as RECORDING" in err


def test_the_same_file_reached_through_a_symlink_or_dots_is_still_the_input(monkeypatch, capsys, files):
    rec = files / "a.rec.safetensors"
    (files / "link.safetensors").symlink_to(rec)
    err = refused(monkeypatch, capsys, files, "attribute", str(rec), "--out", str(files / "link.safetensors"))
    assert "same file as RECORDING" in err
    (files / "sub").mkdir()
    err = refused(monkeypatch, capsys, files, "attribute", str(rec), "--out", str(files / "sub" / ".." / rec.name))
    assert "same file as RECORDING" in err


def test_record_refuses_to_write_over_its_recipe(monkeypatch, capsys, tmp_path, mini_recipe_path):
    err = refused(monkeypatch, capsys, tmp_path, "record", str(mini_recipe_path), "--out", str(mini_recipe_path))
    assert "same file as RECIPE" in err


def test_two_outputs_of_one_command_may_not_be_the_same_file(monkeypatch, capsys, files):
    out = files / "heads.png"
    err = refused(monkeypatch, capsys, files, "attribute", str(files / "a.rec.safetensors"), "--out", str(out),
                  "--plot", str(out))
    assert "--plot and --out name the same file" in err


def test_verify_refuses_a_junit_report_written_over_the_fix(monkeypatch, capsys, files, mini_recipe_path):
    fix = files / "a.fix.safetensors"
    err = refused(monkeypatch, capsys, files, "verify", str(mini_recipe_path), "--fix", str(fix), "--junit", str(fix))
    assert "--junit" in err and "same file as --fix" in err


def test_a_lora_fix_folder_that_would_replace_the_attribution_it_reads_is_refused(monkeypatch, capsys, files):
    folder = files / "inside"
    folder.mkdir()
    att = folder / "a.attr.safetensors"
    att.write_bytes(b"attribution bytes")
    err = refused(monkeypatch, capsys, files, "steer", str(att), "--kind", "lora", "--out", str(folder))
    assert "replaced whole" in err


def test_an_output_inside_a_folder_the_command_reads_is_refused(monkeypatch, capsys, files, mini_recipe_path):
    lora = files / "x.lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    err = refused(monkeypatch, capsys, files, "verify", str(mini_recipe_path), "--fix", str(lora),
                  "--junit", str(lora / "report.xml"))
    assert "lies inside --fix" in err


def test_a_missing_input_is_named_before_anything_else_happens(monkeypatch, capsys, files):
    err = refused(monkeypatch, capsys, files, "steer", str(files / "a.attr.safetensors"), "--record",
                  str(files / "nope.rec.safetensors"))
    assert "--record" in err and "does not exist" in err


def test_an_output_name_longer_than_the_file_system_allows_is_refused(monkeypatch, capsys, files):
    long = files / ("x" * 300 + ".attr.safetensors")
    err = refused(monkeypatch, capsys, files, "attribute", str(files / "a.rec.safetensors"), "--out", str(long))
    assert "longer than the file system allows" in err


def test_an_empty_output_name_is_refused(monkeypatch, capsys, files):
    # The option parser reads "" as the current folder.
    err = refused(monkeypatch, capsys, files, "attribute", str(files / "a.rec.safetensors"), "--out", "")
    assert "--out '.' is a folder" in err
    with pytest.raises(BadInputError, match="--out is empty"):
        check_paths({}, {"--out": ""})


def test_an_output_under_a_file_is_refused(monkeypatch, capsys, files, mini_recipe_path):
    err = refused(monkeypatch, capsys, files, "run", str(mini_recipe_path), "--out", str(files / "notes.txt" / "sub"))
    assert "is a file, not a folder" in err


def test_run_under_a_folder_it_cannot_write_is_refused_and_creates_nothing(monkeypatch, capsys, files, mini_recipe_path):
    locked = files / "locked"
    locked.mkdir()
    real = os.access
    # Root may write anywhere, so the permission is taken away where the check asks.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked and mode & os.W_OK else real(p, mode))
    err = refused(monkeypatch, capsys, files, "run", str(mini_recipe_path), "--out", str(locked / "new" / "deeper"))
    assert "is not writable" in err


def test_run_refused_after_the_checks_leaves_no_empty_output_folder(monkeypatch, capsys, files, mini_recipe_path):
    out = files / "fresh"
    err = refused(monkeypatch, capsys, files, "run", str(mini_recipe_path), "--out", str(out), "--model",
                  str(files / "no-such-model"))
    assert not out.exists() and "no-such-model" in err


def test_check_paths_accepts_a_fresh_output_in_a_folder_still_to_be_made(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    check_paths({"IN": tmp_path / "in.txt"}, {"--out": tmp_path / "a" / "b" / "out.safetensors"}, {"--lora": tmp_path / "c.lora"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    with pytest.raises(BadInputError, match="is a folder"):
        check_paths({}, {"--out": tmp_path})
