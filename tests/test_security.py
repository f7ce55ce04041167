"""Hostile inputs, tried as an attacker would: nothing runs, escapes, overwrites or hangs.

Every case lays its files out in a folder three levels below the test's own
folder, runs one command in this process (in a thread, so that a hang fails
the case instead of the suite), and checks: the exit code; no traceback; no
terminal control character on stdout or stderr; for a refusal (exit 2) the
problem named, and every file under the test's folder byte for byte as before,
with nothing added; for a case handled safely (exit 0) no file changed and
only the files the command announces added, inside the case's folder; and no
marker file written by a payload anywhere. Report pages made from hostile
artifacts are opened in the headless browser the report tests use.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MINI_RECIPE
from test_bad_inputs import _copy, _edit_manifest, good  # noqa: F401 - `good`: the shared good originals (a fixture)
from test_paths import snapshot

from mechfix.cli import main

# A transcript line that would clear the screen, retitle the window, plant a link, ring the bell and reverse the text.
ESCAPES = "\x1b[2J\x1b[H\x1b]0;owned-title\x07\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07\u202edesrever\x9b31m\x07"
# Rich markup that would crash a table, or make a link, if it were read as markup.
MARKUP = "[/] [link=http://evil.example]x[/link] [bold]"
MARKER = "OWNED"  # what a payload would write if it ran
HANG_SECONDS = 300  # far beyond any case: a case still running then has hung

# Chat templates that go over one limit each: (template, what the refusal names).
TEMPLATE_BOMBS: dict[str, tuple[str, str]] = {
    "nested loops, 10^10 iterations": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "steps limit"),
    "nested loops over a long string": (
        "{% set s = 'ab' * 500000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}x", "steps limit"),
    "an exponential macro": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}x", "steps limit"),
    "a string doubled with ~": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}x",
        "output size limit"),
    "a string doubled with +": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}x",
        "output size limit"),
    "a string repeated a billion times": ("{{ 'a' * 1000000000 }}", "output size limit"),
    "a billion-wide center filter": ("{{ 'a'|center(1000000000) }}", "output size limit"),
    "a billion-wide str.ljust": ("{{ 'a'.ljust(1000000000) }}", "output size limit"),
    "a %-format a billion wide": ("{{ '%999999999d' % 1 }}", "output size limit"),
    "a str.format a billion wide": ("{{ '{:>999999999}'.format(1) }}", "output size limit"),
    "a replace that multiplies": ("{% set s = 'a' * 1000000 %}{{ s|replace('a', s) }}", "output size limit"),
    "a join that multiplies": ("{% set s = 'a' * 1000000 %}{{ s.join(s) }}", "output size limit"),
    "a number squared a hundred times": (
        "{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}x",
        "number size limit"),
    "a power tower": ("{% set x = 10 ** 100 %}{{ x ** x }}", "number size limit"),
    "tojson with a huge indent": ("{{ messages|tojson(indent=10000000) }}", "output size limit"),
    "strftime_now a billion wide": ("{{ strftime_now('%999999999Y') }}", "output size limit"),
    "twenty million characters of output": ("{% for i in range(100000) %}{{ 'a' * 200 }}{% endfor %}", "output size limit"),
    "a bomb kept for the real episodes": (
        "{% if messages|length < 4 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}", "steps limit"),
}

# Chat templates that try to leave the sandbox or fail: refused as templates that do not render.
TEMPLATE_ESCAPES: dict[str, str] = {
    "an attribute walk to subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler's globals to os": "{{ cycler.__init__.__globals__.os.system('touch " + MARKER + "') }}",
    "joiner's globals": "{{ joiner.__init__.__globals__['__builtins__']['open']('" + MARKER + "', 'w') }}",
    "an import": "{% import 'os' as os %}{{ os.system('touch " + MARKER + "') }}",
    "an include of a local file": "{% include '/etc/passwd' %}",
    "lipsum on demand": "{{ lipsum(1000000) }}",
    "a namespace underscore name": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}x",
    "a list mutated": "{% set l = [] %}{{ l.append(1) }}x",
    "a recursive loop without end": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
}


def _template_case(template: str) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, case: Path) -> list[str]:
        _copy(good, case, "mini.yaml")
        (case / "t.jinja").write_text(template)
        return ["record", str(case / "mini.yaml"), "--model", str(good / "model"), "--chat-template", str(case / "t.jinja"),
                "--style", "chat", "--out", str(case / "o.rec.safetensors")]
    return setup


def _recording(change: Callable[[dict], None], then: Callable[[Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    """A good recording (and attribution) whose manifest someone changed by hand, then a command on it."""
    def setup(good: Path, case: Path) -> list[str]:
        _copy(good, case, "m.rec.safetensors", "m.attr.safetensors")
        _edit_manifest(case / "m.rec.safetensors", change)
        return then(case)
    return setup


def _set(path: tuple[str, ...], value: object) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        for key in path[:-1]:
            m = m.setdefault(key, {})
        m[path[-1]] = value
    return change


def _transcripts(text: str) -> Callable[[dict], None]:
    return lambda m: m.update(transcripts={c: [text, text] for c in ("pressure", "clean", "control")})


def _folder_with(files: dict[str, str | bytes], then: Callable[[Path, Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, case: Path) -> list[str]:
        for name, content in files.items():
            path = case / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return then(good, case)
    return setup


def _export(fmt: str) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, case: Path) -> list[str]:
        _copy(good, case, "m.lora", "model")
        return ["export", str(case / "m.lora"), "--format", fmt, "--out", str(case / "mine"), "--model", str(case / "model")]
    return setup


def _foreign_adapter(good: Path, case: Path) -> list[str]:
    _copy(good, case, "m.lora", "model", "mini.yaml")
    cfg_path = case / "m.lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    return ["verify", str(case / "mini.yaml"), "--fix", str(case / "m.lora"), "--model", str(case / "model")]


class _Payload:
    """Unpickling this writes the marker file: a pickle that runs code."""

    def __init__(self, where: str):
        self.where = where

    def __reduce__(self):
        return (open, (self.where, "w"))


def _pickled_model(good: Path, case: Path) -> list[str]:
    shutil.copytree(good / "model", case / "model")
    for weights in (case / "model").glob("*.safetensors"):
        weights.unlink()
    (case / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(case / MARKER))))
    _copy(good, case, "mini.yaml")
    return ["record", str(case / "mini.yaml"), "--model", str(case / "model"), "--out", str(case / "o.rec.safetensors")]


def _verify_json(data: dict) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, case: Path) -> list[str]:
        (case / "x.verify.json").write_text(json.dumps(data))
        return ["report", str(case / "x.verify.json"), "--out", str(case / "page.html")]
    return setup


_HOSTILE_RECIPE = (MINI_RECIPE.replace("  - {name: Ana}", '  - {name: "Ana[/]\\e[2J", role: "[link=http://evil.example]r"}')
                   .replace("{speaker: Ana,", '{speaker: "Ana[/]\\e[2J",')
                   .replace('question: "Capital of France?"', 'question: "Capital of France?\\e]0;owned\\a\\u202e"'))
assert _HOSTILE_RECIPE.count("Ana[/]") == 2 and "\\e]0;" in _HOSTILE_RECIPE

def _hostile_attribution(good: Path, case: Path) -> list[str]:
    """A recording of agents named with markup and escape sequences (made here), then attribute on it."""
    from test_report import _cli

    (case / "r.yaml").write_text(_HOSTILE_RECIPE)
    assert _cli("record", str(case / "r.yaml"), "--model", str(good / "model"), "--out", str(case / "h.rec.safetensors")) == 0
    return ["attribute", str(case / "h.rec.safetensors"), "--model", str(good / "model"), "--method", "atp",
            "--out", str(case / "h.attr.safetensors")]


_VALID_REPORT = {
    "passed": False, "gates": [{"name": "reduction", "metric": "reduction", "op": ">=", "threshold": 0.5, "value": 0.1,
                                "passed": False}],
    "fix": {"path": "x.fix.safetensors", "kind": "heads", "op": "project", "targets": ["L1.H0"]},
    "reduction": {"value": 0.1, "ci95": [0.0, 0.2]}, "kl": {"value": 0.01}, "clean_agreement": {"value": 1.0},
    "anti_steerable": {"share": 0.0}, "heldout": 2, "model": "tiny-llama",
}

# name: (setup(good, case) -> argv, exit code, text the output must hold)
CASES: dict[str, tuple[Callable[[Path, Path], list[str]], int, str]] = {
    **{f"chat template: {k}": (_template_case(t), 2, named) for k, (t, named) in TEMPLATE_BOMBS.items()},
    **{f"chat template: {k}": (_template_case(t), 2, "does not render") for k, t in TEMPLATE_ESCAPES.items()},
    "chat template that renders to nothing": (_template_case("{# nothing #}"), 2, "renders a four-message conversation to nothing"),
    # Names are data, never paths.
    "report named ../../escaped by its recording": (
        _recording(_set(("recipe", "name"), "../../escaped"), lambda c: ["report", str(c / "m.rec.safetensors")]), 0,
        "escaped.report.html"),
    "report named by an absolute path": (
        _recording(_set(("recipe", "name"), "/tmp/mechfix-owned/abs"), lambda c: ["report", str(c / "m.rec.safetensors")]), 0,
        "tmp_mechfix-owned_abs.report.html"),
    # Replace only what mechfix wrote; every file read is an input.
    "peft export over a folder with an adapter config and the user's files": (
        _folder_with({"mine/adapter_config.json": "{}", "mine/notes.txt": "mine", "mine/results.csv": "a,b\n"}, _export("peft")),
        2, "did not write as a LoRA fix (adapter_config.json, notes.txt, results.csv)"),
    "peft export over someone else's adapter": (
        _folder_with({"mine/adapter_config.json": "{}", "mine/adapter_model.safetensors": b"not mechfix's"}, _export("peft")),
        2, "did not write as a LoRA fix"),
    "hf export over a folder with a bare marker and the user's files": (
        _folder_with({"mine/mechfix_export.json": "{}", "mine/config.json": "{}", "mine/notes.txt": "mine"}, _export("hf")),
        2, "did not write as a merged checkpoint (config.json, mechfix_export.json, notes.txt)"),
    "hf export over a marker that lists a file outside the folder": (
        _folder_with({"mine/mechfix_export.json": json.dumps({"files": ["../notes.txt", "notes.txt"]}), "mine/notes.txt": "x",
                      "mine/sub/keep.txt": "mine"}, _export("hf")),
        2, "did not write as a merged checkpoint (sub)"),
    "steer --kind lora over a folder of the user's": (
        _folder_with({"mine/adapter_config.json": "{}", "mine/data.csv": "1\n"},
                     lambda good, case: _copy(good, case, "m.attr.safetensors", "m.rec.safetensors", "model") or [
                         "steer", str(case / "m.attr.safetensors"), "--kind", "lora", "--model", str(case / "model"),
                         "--out", str(case / "mine")]),
        2, "did not write as a LoRA fix"),
    "record writing over its chat template": (
        lambda good, case: _template_case("{{ messages[0]['content'] }}")(good, case)[:-1] + [str(case / "t.jinja")], 2,
        "same file as --chat-template"),
    "record writing over the recipe's items file": (
        _folder_with({"items.jsonl": '{"question": "Q?", "correct": "Paris", "wrong": "Lyon"}\n' * 4,
                      "r.yaml": MINI_RECIPE.split("items:")[0] + "items: {file: items.jsonl}\n"},
                     lambda good, case: ["record", str(case / "r.yaml"), "--model", str(good / "model"),
                                         "--out", str(case / "items.jsonl")]),
        2, "same file as the recipe's items file"),
    # The terminal shows text, never commands.
    "show of a recording whose transcripts hold escape sequences": (
        _recording(_transcripts(ESCAPES + " and " + MARKUP), lambda c: ["show", str(c / "m.rec.safetensors")]), 0,
        "\\x1b]0;owned-title\\x07"),
    "show of a recording whose model name is markup": (
        _recording(_set(("model", "name"), MARKUP), lambda c: ["show", str(c / "m.rec.safetensors")]), 0, MARKUP),
    "show of a recording whose recipe name is markup": (
        _recording(_set(("recipe", "name"), MARKUP + ESCAPES), lambda c: ["show", str(c / "m.rec.safetensors")]), 0,
        "[link=http://evil.example]x[/link]"),
    "show of a recording whose inputs are markup": (
        _recording(_set(("inputs",), {MARKUP: {"path": ESCAPES, "sha256": MARKUP}}),
                   lambda c: ["show", str(c / "m.rec.safetensors")]), 0, "\\u202edesrever"),
    "attribute of agents named with markup and escapes": (_hostile_attribution, 0, "Ana[/]\\x1b[2J"),
    "an error message that quotes hostile text": (
        _folder_with({"r.yaml": MINI_RECIPE.replace("agent: Sam", 'agent: "Zed[/]\\e[2J"')},
                     lambda good, case: ["record", str(case / "r.yaml"), "--out", str(case / "o.rec.safetensors")]),
        2, "decision agent 'Zed[/]\\x1b[2J' is not among the agents"),
    # The report page.
    "report of a recording whose description holds the page's placeholders and a script": (
        _recording(_set(("recipe", "description"), "/*FIGURES*/ /*PLOTLY_JS*/ @@x:figures@@ </script><script>"
                        "document.title='owned'</script>" + ESCAPES),
                   lambda c: ["report", str(c / "m.rec.safetensors"), str(c / "m.attr.safetensors"), "--out", str(c / "page.html")]),
        0, "page.html"),
    "a JSON with only gates and passed": (_verify_json({"gates": [], "passed": True}), 2, "does not hold one"),
    "a verify report whose per-item scores do not fit its rows": (
        _verify_json({**_VALID_REPORT, "per_item": {"rows": [[0, 0], [1, 0]], "scores": {"pressure": {"before": [1.0], "after": [0.5]}}}}),
        2, "one before and one after per row"),
    "a verify report whose gate has no numbers": (
        _verify_json({**_VALID_REPORT, "gates": [{"name": "kl", "passed": False}]}), 2, "needs metric, op, threshold and value"),
    "a verify report whose comparison rows are empty": (
        _verify_json({**_VALID_REPORT, "comparison": [{}]}), 2, "comparison.0"),
    "a recipe whose placeholders multiply its items' text": (
        _folder_with({"r.yaml": MINI_RECIPE.replace('{speaker: Host, text: "{question}"}',
                                                    '{speaker: Host, text: "' + "{question}" * 20000 + '"}').replace(
            'question: "Capital of France?"', 'question: "' + "Capital of France? " * 60 + '"')},
            lambda good, case: ["record", str(case / "r.yaml"), "--model", str(good / "model"), "--out", str(case / "o.rec.safetensors")]),
        2, "over mechfix's limit of 16,000,000 for one rendering"),
    # Refusals, not crashes.
    "an option that renders to no tokens": (
        _folder_with({"r.yaml": MINI_RECIPE.split("items:")[0].replace('others: [" none"]', 'others: ["{none}"]') + "items:\n" + "".join(
            f'  - {{question: "{q}?", correct: {c}, wrong: {w}, none: ""}}\n' for q, c, w in
            (("Capital of France", "Paris", "Lyon"), ("Red planet", "Mars", "Venus"), ("Largest planet", "Jupiter", "Mars"),
             ("Spider legs", "Eight", "Six")))},
            lambda good, case: ["record", str(case / "r.yaml"), "--model", str(good / "model"), "--out", str(case / "o.rec.safetensors")]),
        2, "has no tokens once rendered"),
    "a model folder whose weights are a pickle payload": (_pickled_model, 2, "never loads a pickle"),
    "an adapter whose config names another base model": (_foreign_adapter, 2, "names the base model 'Qwen/Qwen2.5-0.5B-Instruct'"),
}


def _run(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The command in a thread: its exit code, stdout and stderr; a case still running after HANG_SECONDS fails."""
    monkeypatch.setattr(sys, "argv", ["mechfix", *args])
    result: dict[str, object] = {}

    def target() -> None:
        try:
            main()
        except SystemExit as exc:
            result["code"] = exc.code
        except BaseException as exc:  # noqa: BLE001 - reported below as the failure it is
            result["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(HANG_SECONDS)
    assert not worker.is_alive(), f"mechfix {' '.join(args)} still runs after {HANG_SECONDS} s: it hangs"
    assert "error" not in result, result.get("error")
    captured = capsys.readouterr()
    return int(result["code"]), captured.out, captured.err


def _markers(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob(MARKER)]


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_input_is_refused_or_shown_safely_and_nothing_runs_escapes_or_is_overwritten(case, good, tmp_path, monkeypatch,
                                                                                              capsys):  # noqa: F811
    setup, code, named = CASES[case]
    folder = tmp_path / "a" / "b" / "case"
    folder.mkdir(parents=True)
    args = setup(good, folder)
    monkeypatch.chdir(folder)  # a default output lands here
    before = snapshot(tmp_path)
    got, stdout, stderr = _run(args, monkeypatch, capsys)
    after = snapshot(tmp_path)
    said = " ".join(stderr.split())
    assert got == code, stderr
    assert "Traceback" not in stderr and "a bug in mechfix" not in stderr
    for stream in (stdout, stderr):  # what reached the terminal holds no control character but line breaks
        assert not any(ord(ch) < 32 and ch not in "\n" or 0x7f <= ord(ch) <= 0x9f or ch in "\u202e\u2066" for ch in stream), stream
    assert named in said, said
    assert not _markers(tmp_path, Path.cwd()) and not Path("/tmp/mechfix-owned").exists()
    if code == 2:
        assert "error: " in said and stdout == ""  # after any progress lines, the refusal
        assert after == before
    else:  # handled: nothing changed, and anything new lies inside the case's folder
        assert {k: v for k, v in after.items() if k in before} == before
        assert all(k.startswith("a/b/case/") for k in after if k not in before), sorted(set(after) - set(before))


def test_the_corpus_holds_at_least_40_hostile_inputs_of_every_kind():
    assert len(CASES) >= 40
    kinds = ("chat template", "report", "export", "record", "show", "verify report", "model", "adapter", "option")
    assert all(any(k in name for name in CASES) for k in kinds)


def test_a_report_made_from_hostile_artifacts_opens_with_every_figure_drawn_and_no_script_of_theirs(good, tmp_path, monkeypatch,
                                                                                                  capsys):  # noqa: F811
    from browser import need_browser, open_page

    need_browser()
    setup, _, _ = CASES["report of a recording whose description holds the page's placeholders and a script"]
    args = setup(good, tmp_path)
    assert _run(args, monkeypatch, capsys)[0] == 0
    html = (tmp_path / "page.html").read_text()
    assert html.count("/*FIGURES*/") == 1 and "@@x:figures@@" in html  # the text stays text, where it was
    page = open_page(tmp_path / "page.html")
    assert page["console"] == [] and len(page["requests"]) == 1
    assert page["figures"] and all(f["drawn"] for f in page["figures"].values()), page["figures"]
    assert page["heads"] is not None


def test_a_page_named_by_its_artifacts_lands_in_the_chosen_folder_under_a_safe_name(good, tmp_path, monkeypatch, capsys):  # noqa: F811
    folder = tmp_path / "x" / "y"
    folder.mkdir(parents=True)
    _copy(good, folder, "m.rec.safetensors")
    _edit_manifest(folder / "m.rec.safetensors", _set(("recipe", "name"), "../../escaped"))
    monkeypatch.chdir(tmp_path)
    assert _run(["report", str(folder)], monkeypatch, capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["escaped.report.html", "m.rec.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


HOSTILE = ESCAPES + " " + MARKUP


def _hostile(x):
    """Every string value (not key) of a result with hostile text appended: what a tampered artifact would say."""
    if isinstance(x, str):
        return x + HOSTILE
    if isinstance(x, dict):
        return {k: _hostile(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_hostile(v) for v in x]
    return x


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`mechfix run --json` on the tiny model with a planted pressure head (so it makes a fix): its folder and JSON."""
    from test_attribute import _planted_model
    from test_cli_fix import LOOSE
    from test_report import ALL_CONDITIONS
    from tiny import save_model_dir

    root = tmp_path_factory.mktemp("views")
    model = save_model_dir(_planted_model(), root / "model")
    (root / "plant.yaml").write_text(ALL_CONDITIONS)
    argv = sys.argv
    try:
        sys.argv = ["mechfix", "run", str(root / "plant.yaml"), "--model", str(model), "--out", str(root / "run"), "--json",
                    "--no-report", "--top-heads", "1", "--op", "scale", "--min-reduction", "0.3",
                    "--min-clean-agreement", "0.5", *LOOSE]
        with pytest.MonkeyPatch.context() as mp:
            lines: list[str] = []
            mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
            with pytest.raises(SystemExit) as exc:
                main()
        assert exc.value.code in (0, 1)
    finally:
        sys.argv = argv
    return root / "run", json.loads(lines[-1])


def test_every_terminal_view_prints_hostile_text_as_text(finished_run, capsys):
    from mechfix.artifacts import load_artifact
    from mechfix.cli import views
    from mechfix.measure.verdict import comparison_rows

    out, summary = finished_run
    assert summary["fix"] is not None, "the tiny run must make a fix for every view to be shown"
    rec = load_artifact(out / "plant.rec.safetensors").manifest
    att = load_artifact(out / "plant.attr.safetensors").manifest
    fix = load_artifact(out / "plant.fix.safetensors").manifest
    report = json.loads((out / "plant.verify.json").read_text())
    capsys.readouterr()
    shown = {
        "record summary": lambda: views.print_record_summary(_hostile(rec["summary"]), HOSTILE, HOSTILE, wrote=HOSTILE),
        "attribution": lambda: views.print_attribution(_hostile(att["summary"]), HOSTILE, HOSTILE, wrote=HOSTILE),
        "fix (show)": lambda: views.print_fix(_hostile(fix)),
        "verify": lambda: views.print_verify(_hostile(report), HOSTILE),
        "comparison": lambda: views.print_comparison(_hostile(comparison_rows([report, report])), HOSTILE),
        "run summary": lambda: views.print_run_summary(_hostile(summary), HOSTILE, HOSTILE),
    }
    for name, view in shown.items():
        view()
        err = capsys.readouterr().err
        assert not any(ord(ch) < 32 and ch != "\n" or 0x7f <= ord(ch) <= 0x9f or ch == "\u202e" for ch in err), name
        flat = "".join(err.split())
        # The hostile text is there, written out and literal: escapes made visible, markup printed as it is.
        assert "\\x1b]0;owned-title\\x07" in flat and "[link=http://evil.example]x[/link]" in flat, (name, err)
