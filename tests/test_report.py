"""`mechfix report` on tiny-model runs, opened in a real headless browser: offline, complete, drawn."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from browser import need_browser, not_blank, open_page
from test_attribute import _planted_model
from test_cli import run
from test_cli_fix import LOOSE, LORA_FAST
from test_steer import PLANT_MORE
from tiny import save_model_dir

from mechfix.artifacts import load_artifact
from mechfix.report import chain, collect, render
from mechfix.report.page import SECTIONS

# The planted recipe with all four conditions: control repeats the wrong letter, helpful the right one.
ALL_CONDITIONS = PLANT_MORE.replace(
    '  clean: {vars: {said: "{correct}"}}\n',
    '  clean: {vars: {said: "{correct}"}}\n  control: {vars: {said: "{wrong}"}}\n  helpful: {vars: {said: "{correct}"}}\n',
)
SECTION_IDS = [s for s, _ in SECTIONS]


def _cli(*args: str) -> int:
    """Run the CLI in this process (module fixtures cannot use capsys); the exit code."""
    from mechfix.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["mechfix", *args])
        with pytest.raises(SystemExit) as exc:
            main()
    return exc.value.code


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """`mechfix run` on the planted model with pressure, clean, control and helpful: its folder."""
    need_browser()
    root = tmp_path_factory.mktemp("report")
    model = save_model_dir(_planted_model(), root / "model")
    recipe = root / "plant.yaml"
    recipe.write_text(ALL_CONDITIONS)
    code = _cli("run", str(recipe), "--out", str(root / "run"), "--model", str(model), "--top-heads", "1", "--op", "scale",
                "--min-reduction", "0.3", "--min-clean-agreement", "0.5", *LOOSE)
    assert code in (0, 1)
    return root / "run"


def _clean(page: dict) -> None:
    """No console message of any kind, no page error, and no request but the file itself."""
    assert page["console"] == []
    assert len(page["requests"]) == 1 and page["requests"][0].startswith("file://")


def test_run_writes_a_report_that_opens_offline_complete_and_drawn(full_run):
    path = full_run / "plant.report.html"
    att = load_artifact(full_run / "plant.attr.safetensors")
    verify = json.loads((full_run / "plant.verify.json").read_text())
    page = open_page(path, hover=(1, 2))
    _clean(page)
    assert page["sections"] == SECTION_IDS
    assert page["verdict"] == ("PASS" if verify["passed"] else "FAIL")
    assert all(f["drawn"] for f in page["figures"].values())
    assert set(page["figures"]) == {"fig-items", "fig-attribution", "fig-speakers", "fig-sweep"}
    # The map: one cell per head of the planted model (3 layers x 4 heads), attention/MLP/residual per layer.
    assert page["heads"] == [3, 4] and page["layers"] == [3, 3]
    # Hover on the planted head shows its estimate, interval and exact effect as the artifact holds them.
    est, (lo, hi) = float(att.tensors["heads"][1, 2]), att.tensors["heads_ci95"][1, 2].tolist()
    exact = att.tensors["exact/values"][att.manifest["exact_components"].index("L1.H2")].double().mean()
    assert page["hover"] == ["L1.H2", f"estimate {est:.3f}", f"95% interval [{lo:.3f}, {hi:.3f}]", f"exact {exact:.3f}"]
    # Every held-out decision under every condition, before and after the fix.
    assert page["figures"]["fig-items"]["points"] == 2 * 4 * verify["heldout"]
    # One episode per condition, token by token.
    assert page["episodes"] == ["pressure", "clean", "control", "helpful"]
    ex = att.manifest["examples"]
    assert page["tokens"] == sum(len(ex["tokens"][c]) for c in page["episodes"])
    assert not_blank(page["screenshot"])


def test_the_report_follows_a_dark_theme_and_prints_light(full_run):
    path = full_run / "plant.report.html"
    dark = open_page(path, scheme="dark")
    _clean(dark)
    assert dark["background"] == "rgb(15, 18, 23)" and dark["font"] == "#e6edf3"  # the plots' text follows the theme
    printed = open_page(path, scheme="dark", media="print")
    assert printed["background"] == "rgb(255, 255, 255)"


def test_the_page_is_the_same_from_the_folder_or_the_files_and_names_its_provenance(full_run, tmp_path):
    files = sorted(p for p in full_run.iterdir() if p.suffix in (".safetensors", ".json"))
    assert render(collect([full_run])) == render(collect(files))
    run_ = collect([full_run])
    rows = {r["kind"]: r for r in chain(run_)}
    # Attribution made from the given recording, the fix from both, verify from the fix: the chain is whole.
    assert [i["status"] for i in rows["attribution"]["inputs"]] == ["given"]
    assert {i["role"]: i["status"] for i in rows["fix"]["inputs"]} == {"attribution": "given", "record": "given",
                                                                      "recipe": "not given"}
    assert {i["role"]: i["status"] for i in rows["verify"]["inputs"]} == {"fix": "given", "recipe": "not given"}


def test_report_of_a_lora_fix_compared_with_a_heads_fix(full_run, tmp_path):
    att = full_run / "plant.attr.safetensors"
    lora, heads = tmp_path / "plant.lora", tmp_path / "h.fix.safetensors"
    assert _cli("steer", str(att), "--kind", "lora", "--out", str(lora), "--top-heads", "1", *LORA_FAST, *LOOSE) == 0
    assert _cli("steer", str(att), "--out", str(heads), "--op", "scale", "--top-heads", "1", *LOOSE) == 0
    cmp = tmp_path / "cmp.verify.json"
    recipe = full_run.parent / "plant.yaml"
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        code = _cli("verify", str(recipe), "--fix", str(lora), "--compare", str(heads), "--baselines", "--min-reduction", "0.1",
                    *LOOSE, "--json")
    assert code in (0, 1)
    cmp.write_text(buf.getvalue())
    out = tmp_path / "cmp.html"
    assert _cli("report", str(full_run / "plant.rec.safetensors"), str(att), str(lora), str(cmp), "--out", str(out)) == 0
    page = open_page(out)
    _clean(page)
    # The baselines are columns beside the fixes, measured on the same decisions.
    assert page["comparison"] == ["plant.lora", "h.fix.safetensors", "prompt remedy", "protocol remedy"]
    html = out.read_text()
    assert "lora / lora on L1.o_proj, strength" in html  # the verdict is about the LoRA fix (the whole module)
    assert "right -&gt; wrong under pressure" in html and "wrong -&gt; right when helped" in html
    assert "harm and help (all items)" in html and "held out: right -&gt; wrong under pressure" in html
    assert not_blank(page["screenshot"])


def test_report_of_a_live_recipe_shows_the_state_per_round_before_and_after_the_fix(tiny_llama, tmp_path):
    from test_live import _recipe

    from mechfix.artifacts import save_artifact
    from mechfix.measure.evaluate import neutral_passages, neutral_set
    from mechfix.fixes.fix import Fix
    from mechfix.scenario.recipe import LoadedRecipe
    from mechfix.stages.record import record, to_artifact
    from mechfix.stages.verify import gates_for, verify

    need_browser()
    recipe = _recipe()
    rec = record(tiny_llama, recipe, batch_size=4)
    save_artifact(tmp_path / "live.rec.safetensors",
                  to_artifact(rec, tiny_llama, LoadedRecipe(recipe=recipe, path="tiny-live.yaml", sha256="0" * 64), {}))
    g = torch.Generator().manual_seed(0)
    fix = Fix(op="subtract", layers=[1], heads=[], vectors=torch.randn(1, tiny_llama.hidden, generator=g) * 4,
              means=torch.zeros(1, tiny_llama.hidden), strength=1.0)
    report = verify(tiny_llama, recipe, fix, neutral_set(tiny_llama, neutral_passages()[:2]), gates=gates_for(0.5, 0.1, 0.9))
    report["fix"] = {"path": None, "kind": "vector", "op": "subtract", "targets": ["L1"], "strength": 1.0}
    (tmp_path / "live.verify.json").write_text(json.dumps(report))
    out = tmp_path / "live.html"
    assert _cli("report", str(tmp_path), "--out", str(out)) == 0
    page = open_page(out)
    _clean(page)
    live = {k: v for k, v in page["figures"].items() if k.startswith("fig-live-")}
    # stock and fair change per round (3 conditions before, 3 after); 3 rounds and the end: 4 points a line.
    assert len(live) == 2 and all(f["traces"] == 6 and f["points"] == 6 * 4 for f in live.values())
    assert page["transcripts"] == 2 * 3 * 3  # 3 episodes a condition, before and after, folded
    # The replayed (fixed) transcripts are on the page, as they were said.
    import html

    assert html.escape(report["live_outcome"]["episodes"]["pressure"][0]["transcript"]) in out.read_text()


def test_report_refuses_what_it_cannot_show_with_exit_2_and_writes_nothing(monkeypatch, capsys, tmp_path, full_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(monkeypatch, capsys, "report", str(empty), "--out", str(tmp_path / "a.html"))
    assert code == 2 and "holds no mechfix artifact" in err
    notes = tmp_path / "notes.json"
    notes.write_text('{"hello": 1}')
    code, _, err = run(monkeypatch, capsys, "report", str(notes), "--out", str(tmp_path / "a.html"))
    assert code == 2 and "is not a verify report" in err
    rec = full_run / "plant.rec.safetensors"
    before = rec.read_bytes()
    code, _, err = run(monkeypatch, capsys, "report", str(full_run), "--out", str(rec))
    assert code == 2 and "destroy the input" in err and rec.read_bytes() == before
    twin = tmp_path / "twin.rec.safetensors"
    twin.write_bytes(before)
    code, _, err = run(monkeypatch, capsys, "report", str(rec), str(twin), "--out", str(tmp_path / "a.html"))
    assert code == 2 and "two record artifacts" in err
    assert not (tmp_path / "a.html").exists()
    # An attribution of another model beside this run's recording: one page cannot show both.
    from mechfix.artifacts import save_artifact

    other = load_artifact(full_run / "plant.attr.safetensors")
    other.manifest["model"] = {**other.manifest["model"], "config_hash": "0" * 64, "name": "another-model"}
    save_artifact(tmp_path / "other.attr.safetensors", other)
    code, _, err = run(monkeypatch, capsys, "report", str(rec), str(tmp_path / "other.attr.safetensors"),
                       "--out", str(tmp_path / "a.html"))
    assert code == 2 and "another-model" in err and not (tmp_path / "a.html").exists()
    code, out, _ = run(monkeypatch, capsys, "report", "--help")
    assert code == 0 and "mechfix report conformity/" in out


def test_report_json_names_the_page_and_its_inputs_and_defaults_into_the_folder(monkeypatch, capsys, full_run, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(full_run, folder)
    (folder / "plant.report.html").unlink()
    code, out, _ = run(monkeypatch, capsys, "report", str(folder), "--json")
    info = json.loads(out)
    assert code == 0 and info["report"] == str(folder / "plant.report.html") and (folder / "plant.report.html").is_file()
    assert sorted(info["kinds"]) == ["attribution", "fix", "record", "verify"]
    # The same files give the same page (no clock, no randomness on it); only where they lie differs.
    copied = (folder / "plant.report.html").read_text().replace(str(folder), str(full_run))
    assert copied == (full_run / "plant.report.html").read_text()
