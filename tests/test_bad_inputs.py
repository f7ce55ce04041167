"""A corpus of malformed, hostile and unlucky inputs: each exits 2 with the problem named, no traceback, nothing changed.

Every case builds its inputs in a fresh folder from good originals (a recipe,
a transcript and its decision file, a recording, an attribution, a heads fix,
a LoRA fix folder and a tiny model folder, made once), breaks one thing, runs
the command and checks: exit code 2, the message names the problem, no
traceback, and every file in the folder is byte for byte as before, with
nothing added.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import MINI_RECIPE
from safetensors.torch import save_file
from test_paths import refused
from test_transcript import DECISION, QUESTIONS, _chat

from mechfix.artifacts import Artifact, artifact_file, load_artifact, new_manifest, save_artifact
from mechfix.cli import main

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("bcdefgh", "cdefghi"))


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_dir) -> Path:
    """Good originals every case copies from."""
    d = tmp_path_factory.mktemp("good")
    (d / "mini.yaml").write_text(MINI_RECIPE)
    convs = [_chat(q, w, c) for q, c, w in QUESTIONS]
    (d / "chats.json").write_text(json.dumps(convs))
    (d / "decision.yaml").write_text(DECISION + "".join(f"  - {{correct: {c}, wrong: {w}}}\n" for _, c, w in QUESTIONS))
    argv = sys.argv
    try:
        for args in (["record", str(d / "mini.yaml"), "--model", str(tiny_model_dir), "--out", str(d / "m.rec.safetensors")],
                     ["attribute", str(d / "m.rec.safetensors"), "--model", str(tiny_model_dir), "--method", "atp",
                      "--out", str(d / "m.attr.safetensors")]):
            sys.argv = ["mechfix", *args]
            with pytest.raises(SystemExit) as exc:
                main()
            assert exc.value.code == 0
    finally:
        sys.argv = argv
    rec = load_artifact(d / "m.rec.safetensors")
    shape = rec.manifest["shape"]
    fix = {"kind": "heads", "op": "project", "strength": 1.0}
    tensors = {"vectors": torch.ones(1, shape["head_dim"]), "means": torch.zeros(1, shape["head_dim"]),
               "layers": torch.tensor([1], dtype=torch.int32), "heads": torch.tensor([0], dtype=torch.int32)}
    save_artifact(d / "m.fix.safetensors", Artifact(kind="fix", manifest=new_manifest(
        "fix", model=rec.manifest["model"], fix=fix, shape=shape, recipe="mini"), tensors=tensors))
    _lora_folder(d / "m.lora", tiny_model_dir)
    shutil.copytree(tiny_model_dir, d / "model")
    return d


def _lora_folder(folder: Path, model_dir: Path) -> None:
    from mechfix.fixes.adapter import peft_config
    from mechfix.fixes.fix import Fix, fix_tensors, save_fix
    from mechfix.fixes.adapter import init_lora, lora_targets
    from mechfix.models import load_model

    lm = load_model(str(model_dir))
    targets = lora_targets(lm, [1], [0])
    lora = init_lora(targets, rank=2, head_dim=lm.head_dim, seed=0)
    fix = Fix(op="lora", layers=[1], heads=[], vectors=torch.zeros(0), means=torch.zeros(0), strength=1.0,
              model=lm.identity, lora=lora)
    manifest = new_manifest("fix", model=lm.identity, fix={
        "kind": "lora", "op": "lora", "strength": 1.0,
        "modules": [{"module": t.module, "layer": t.layer, "heads": t.heads} for t in targets]},
        adapter_config=peft_config(lora, None), shape={"layers": lm.n_layers, "heads": lm.n_heads,
                                                       "head_dim": lm.head_dim, "hidden": lm.hidden})
    save_fix(folder, Artifact(kind="fix", manifest=manifest, tensors=fix_tensors(fix)))


def _copy(good: Path, tmp: Path, *names: str) -> None:
    for n in names:
        (shutil.copytree if (good / n).is_dir() else shutil.copy)(good / n, tmp / n)


def _edit_manifest(path: Path, change: Callable[[dict], None], tensors: Callable[[dict], None] | None = None) -> None:
    """Rewrite an artifact with its manifest (and tensors) changed, as someone editing it by hand would."""
    art = load_artifact(path)
    change(art.manifest)
    if tensors:
        tensors(art.tensors)
    meta = {"format": "pt", "mechfix.kind": art.kind, "mechfix.schema": "1", "mechfix.manifest": json.dumps(art.manifest)}
    save_file({k: v.contiguous() for k, v in art.tensors.items()}, str(artifact_file(path)), metadata=meta)


def _recipe(text: str) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, tmp: Path) -> list[str]:
        (tmp / "r.yaml").write_text(text) if isinstance(text, str) else (tmp / "r.yaml").write_bytes(text)
        return ["record", str(tmp / "r.yaml"), "--out", str(tmp / "o.safetensors")]
    return setup


def _with(files: dict[str, str | bytes], then: Callable[[Path, Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    """Write extra files into the case's folder first."""
    def setup(good: Path, tmp: Path) -> list[str]:
        for name, content in files.items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return then(good, tmp)
    return setup


def _mini(old: str, new: str) -> str:
    assert old in MINI_RECIPE
    return MINI_RECIPE.replace(old, new, 1)


def _transcript(chats: str | bytes | None = None, decision: str | bytes | None = None, name: str = "chats.json"):
    def setup(good: Path, tmp: Path) -> list[str]:
        t, d = tmp / name, tmp / "decision.yaml"
        for path, content, original in ((t, chats, good / "chats.json"), (d, decision, good / "decision.yaml")):
            if content is None:
                shutil.copy(original, path)
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        return ["record", "--transcript", str(t), "--decision", str(d), "--out", str(tmp / "o.safetensors")]
    return setup


def _artifact_case(name: str, command: Callable[[Path], list[str]], change=None, tensors=None, raw: bytes | None = None):
    """A command on a copy of a good artifact, changed by hand first."""
    def setup(good: Path, tmp: Path) -> list[str]:
        _copy(good, tmp, name, "mini.yaml")
        if raw is not None:
            (tmp / name).write_bytes(raw)
        elif change or tensors:
            _edit_manifest(tmp / name, change or (lambda m: None), tensors)
        return command(tmp)
    return setup


def _attribute(tmp: Path) -> list[str]:
    return ["attribute", str(tmp / "m.rec.safetensors"), "--out", str(tmp / "o.attr.safetensors")]


def _verify_fix(fix: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["verify", str(tmp / "mini.yaml"), "--fix", str(tmp / fix), "--junit", str(tmp / "o.xml")]


def _lora(edit: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, tmp: Path) -> list[str]:
        _copy(good, tmp, "m.lora", "mini.yaml", "model")
        edit(tmp / "m.lora")
        return ["verify", str(tmp / "mini.yaml"), "--fix", str(tmp / "m.lora"), "--model", str(tmp / "model")]
    return setup


def _config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        edit(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return change


def _model(edit: Callable[[Path], str]) -> Callable[[Path, Path], list[str]]:
    def setup(good: Path, tmp: Path) -> list[str]:
        _copy(good, tmp, "mini.yaml")
        return ["record", str(tmp / "mini.yaml"), "--model", edit(tmp), "--out", str(tmp / "o.safetensors")]
    return setup


def _model_folder(edit: Callable[[Path], None]) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        shutil.copytree(Path(_GOOD["dir"]) / "model", tmp / "model")
        edit(tmp / "model")
        return str(tmp / "model")
    return make


def _cli(*args: str, files: tuple[str, ...] = ("mini.yaml", "m.rec.safetensors", "m.attr.safetensors", "m.fix.safetensors")):
    """A command with an option the user got wrong; ``{t}`` in an argument is the case's folder."""
    def setup(good: Path, tmp: Path) -> list[str]:
        _copy(good, tmp, *files)
        return [a.replace("{t}", str(tmp)) for a in args]
    return setup


def _sparse(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes that takes no room on disk."""
    with path.open("wb") as f:
        f.truncate(size)


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def _json_cfg(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "config.json").write_text(text)


def _auto_map(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))


_GOOD: dict[str, str] = {}
_CHAT_OK = json.dumps([_chat(q, w, c) for q, c, w in QUESTIONS])
_DEEP_JSON = "[" * 100_000 + "]" * 100_000

CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    # Recipes.
    "recipe with an unknown key": (_recipe(_mini("family:", "familly:")), "unknown key 'familly'"),
    "recipe that is not YAML": (_recipe(_mini("agents:", "agents: [")), "not valid YAML"),
    "recipe with exponential aliases": (_recipe(BILLION_LAUGHS), "aliases (*name) are not allowed"),
    "recipe nested 200 levels deep": (_recipe("a: " + "[" * 200 + "]" * 200 + "\n"), "nested more than 64 levels"),
    "recipe in Latin-1": (_recipe(_mini("A quiz.", "Un quiz \u00e9t\u00e9.").encode("latin-1")), "not UTF-8 text"),
    "recipe that is empty": (_recipe(""), "a recipe is a YAML mapping"),
    "recipe that is a list": (_recipe("- a\n- b\n"), "a recipe is a YAML mapping"),
    "recipe without items": (_recipe(MINI_RECIPE.split("items:")[0]), "'items' is required but missing"),
    "recipe with a key twice": (_recipe(_mini("family: conformity", "family: conformity\nfamily: conformity")), "appears twice"),
    "recipe with an unknown placeholder": (_recipe(_mini("{question}", "{quest}")), "placeholder '{quest}' is not set"),
    "recipe whose decision agent is not an agent": (_recipe(_mini("agent: Sam", "agent: Zed")), "decision agent 'Zed' is not among the agents"),
    "recipe with a missing items file": (_recipe(MINI_RECIPE.split("items:")[0] + "items: {file: nope.jsonl}\n"), "was not found"),
    "recipe with an items file in Latin-1": (
        _with({"items.jsonl": '{"question": "caf\u00e9"}\n'.encode("latin-1")},
              _recipe(MINI_RECIPE.split("items:")[0] + "items: {file: items.jsonl}\n")), "not UTF-8 text"),
    "recipe with an items file of bad JSON": (
        _with({"items.jsonl": '{"question": "a"}\n{oops\n'},
              _recipe(MINI_RECIPE.split("items:")[0] + "items: {file: items.jsonl}\n")), "line 2: not valid JSON"),
    "recipe with an items file of aliases": (
        _with({"items.yaml": BILLION_LAUGHS}, _recipe(MINI_RECIPE.split("items:")[0] + "items: {file: items.yaml}\n")),
        "aliases"),
    "recipe larger than mechfix reads": (
        lambda good, tmp: _sparse(tmp / "big.yaml", 65 * 2**20)
        or ["record", str(tmp / "big.yaml"), "--out", str(tmp / "o.safetensors")], "more than mechfix reads"),
    "recipe that is a folder": (lambda good, tmp: (tmp / "r.yaml").mkdir() or ["record", str(tmp / "r.yaml")], "is a folder; give a recipe .yaml file"),
    "recipe name that is not built in": (_cli("record", "no-such-recipe", "--out", "{t}/o.safetensors", files=()), "recipe 'no-such-recipe' was not found"),
    "recipe run in an unknown mode": (_cli("record", "{t}/mini.yaml", "--mode", "sing", "--out", "{t}/o.safetensors"), "--mode"),
    # Transcripts and decision files.
    "transcript that does not exist": (
        lambda good, tmp: _transcript()(good, tmp) and ["record", "--transcript", str(tmp / "nope.json"), "--decision",
                                                        str(tmp / "decision.yaml")], "does not exist"),
    "decision file that does not exist": (
        lambda good, tmp: _transcript()(good, tmp) and ["record", "--transcript", str(tmp / "chats.json"), "--decision",
                                                        str(tmp / "nope.yaml")], "does not exist"),
    "transcript in Latin-1": (_transcript(chats=_CHAT_OK.replace("Paris", "P\u00e0ris").encode("latin-1")), "not UTF-8 text"),
    "transcript that is not JSON": (_transcript(chats="[{oops"), "line 1, column 3: not valid JSON"),
    "transcript nested 100,000 levels deep": (_transcript(chats=_DEEP_JSON), "nested more deeply"),
    "transcript JSONL with a bad line": (_transcript(chats=json.dumps({"messages": _chat(*QUESTIONS[0])}) + "\n{oops\n",
                                                          name="chats.jsonl"), "line 2"),
    "Inspect log larger than mechfix reads": (
        lambda good, tmp: _sparse(tmp / "big.eval", 2**30 + 1) or _transcript()(good, tmp)[:1]
        + ["--transcript", str(tmp / "big.eval"), "--decision", str(tmp / "decision.yaml")], "more than mechfix reads"),
    "transcript JSONL with no conversations": (_transcript(chats="\n\n", name="chats.jsonl"), "holds no conversations"),
    "transcript message without content": (_transcript(chats=json.dumps([[{"role": "user"}]])), "message 0: 'content' is missing"),
    "decision file with aliases": (_transcript(decision=BILLION_LAUGHS), "aliases"),
    "decision file with an unknown key": (_transcript(decision=DECISION.replace("target:", "targt:") + "  - {correct: a, wrong: b}\n"),
                                          "targt"),
    "decision file in Latin-1": (_transcript(decision=(DECISION + "  - {correct: caf\u00e9, wrong: b}\n").encode("latin-1")),
                                 "not UTF-8 text"),
    "transcript without a decision file": (
        lambda good, tmp: _transcript()(good, tmp)[:3], "--decision"),
    "recipe and transcript together": (
        lambda good, tmp: _transcript()(good, tmp) + [str(good / "mini.yaml")], "not both"),
    # Artifacts.
    "recording that is an empty file": (_artifact_case("m.rec.safetensors", _attribute, raw=b""), "not a readable safetensors"),
    "recording of random bytes": (_artifact_case("m.rec.safetensors", _attribute, raw=b"\x00\xff" * 500), "not a readable safetensors"),
    "recording cut in half": (
        lambda good, tmp: _with({"m.rec.safetensors": (good / "m.rec.safetensors").read_bytes()[:5000]},
                                lambda g, t: _attribute(t))(good, tmp), "truncated or corrupt"),
    "plain safetensors file, not mechfix's": (
        lambda good, tmp: save_file({"x": torch.zeros(2)}, str(tmp / "m.rec.safetensors")) or _attribute(tmp),
        "not a mechfix artifact"),
    "attribution given where a recording is needed": (
        _artifact_case("m.attr.safetensors", lambda t: ["attribute", str(t / "m.attr.safetensors"), "--out", str(t / "o.safetensors")]),
        "needs a record artifact"),
    "recording whose manifest was emptied": (_artifact_case("m.rec.safetensors", _attribute, change=lambda m: m.clear()),
                                             "manifest key 'model' is missing"),
    "recording with a tensor missing": (_artifact_case("m.rec.safetensors", _attribute, tensors=lambda t: t.pop("scores/clean")),
                                        "tensor 'scores/clean' is missing"),
    "recording whose shapes disagree with its manifest": (
        _artifact_case("m.rec.safetensors", _attribute, change=lambda m: m["shape"].update(heads=7)), "disagrees with the manifest"),
    "recording with NaN scores": (
        _artifact_case("m.rec.safetensors", _attribute, tensors=lambda t: t["scores/pressure"].fill_(float("nan"))), "non-finite"),
    "recording from a future schema": (
        lambda good, tmp: save_file({"x": torch.zeros(1)}, str(tmp / "m.rec.safetensors"), metadata={
            "mechfix.kind": "record", "mechfix.schema": "9", "mechfix.manifest": "{}"}) or _attribute(tmp), "schema 9"),
    "attribution baseline that is not a condition": (
        _cli("attribute", "{t}/m.rec.safetensors", "--baseline", "calm", "--out", "{t}/o.safetensors"), "--baseline 'calm'"),
    "recording given to steer": (_cli("steer", "{t}/m.rec.safetensors", "--out", "{t}/o.fix.safetensors"), "needs an attribution artifact"),
    "steer with another recording than the attribution's": (
        lambda good, tmp: _copy(good, tmp, "m.attr.safetensors", "m.rec.safetensors")
        or _edit_manifest(tmp / "m.rec.safetensors", lambda m: m.update(seed=99))
        or ["steer", str(tmp / "m.attr.safetensors"), "--record", str(tmp / "m.rec.safetensors"), "--out", str(tmp / "o.fix.safetensors")],
        "sha256 differs"),
    "recording given as the fix": (_artifact_case("m.rec.safetensors", _verify_fix("m.rec.safetensors")), "needs a fix artifact"),
    "fix with vectors for other targets": (
        _artifact_case("m.fix.safetensors", _verify_fix("m.fix.safetensors"), tensors=lambda t: t.update(vectors=torch.ones(2, 16))),
        "tensor 'vectors' has shape [2, 16]"),
    "heads fix exported as a control vector": (_cli("export", "{t}/m.fix.safetensors", "--out", "{t}/o.gguf"), "only vector fixes export"),
    "artifact to show that does not exist": (_cli("show", "{t}/nope.safetensors", files=()), "does not exist"),
    # Adapter folders.
    "adapter folder without its config": (_lora(lambda f: (f / "adapter_config.json").unlink()), "has no adapter_config.json"),
    "adapter config that is not JSON": (_lora(lambda f: (f / "adapter_config.json").write_text("{oops")), "not valid JSON"),
    "adapter config in Latin-1": (_lora(lambda f: (f / "adapter_config.json").write_bytes(b'{"r": "\xe9"}')), "not UTF-8 text"),
    "adapter config of another PEFT method": (_lora(_config(lambda c: c.update(peft_type="IA3"))), "not a LoRA config"),
    "adapter config for another base model": (
        lambda good, tmp: _lora(_config(lambda c: c.update(base_model_name_or_path="org/other")))(good, tmp)
        and _edit_manifest(tmp / "m.lora", lambda m: m["model"].update(source="org/model"))
        or ["verify", str(tmp / "mini.yaml"), "--fix", str(tmp / "m.lora"), "--model", str(tmp / "model")],
        "names the base model 'org/other'"),
    "adapter folder without weights": (_lora(lambda f: (f / "adapter_model.safetensors").unlink()), "not a LoRA fix"),
    "adapter rank that does not fit its weights": (_lora(_config(lambda c: c.update(r=5))), "do not fit rank 5"),
    # Model folders.
    "model folder without config.json": (_model(_model_folder(lambda f: (f / "config.json").unlink())), "no config.json"),
    "model file that is not GGUF": (_model(lambda tmp: _write(tmp / "m.gguf", b"PK\x03\x04" + b"\0" * 64)), "not a GGUF model file"),
    "model file that is GGUF in name and magic only": (
        _model(lambda tmp: _write(tmp / "m.gguf", b"GGUF" + b"\0" * 64)), "could not be read as a GGUF"),
    "model that needs its own code": (_model(_model_folder(_auto_map)), "--trust-remote-code"),
    "model config that is not JSON": (_model(_model_folder(_json_cfg("{oops"))), "not a readable JSON model config"),
    "model path that does not exist": (_model(lambda tmp: str(tmp / "no" / "model")), "does not exist"),
    # Options.
    "a batch size of 0": (_cli("record", "{t}/mini.yaml", "--batch-size", "0", "--out", "{t}/o.safetensors"), "batch-size"),
    "an unknown attribution method": (_cli("attribute", "{t}/m.rec.safetensors", "--method", "guess", "--out", "{t}/o.safetensors"),
                                      "--method must be one of"),
    "no components to list": (_cli("attribute", "{t}/m.rec.safetensors", "--top", "0", "--out", "{t}/o.safetensors"), "--top"),
    "an unknown fix kind": (_cli("steer", "{t}/m.attr.safetensors", "--kind", "magic", "--out", "{t}/o.safetensors"), "--kind must be"),
    "an operation of another kind": (_cli("steer", "{t}/m.attr.safetensors", "--kind", "vector", "--op", "scale",
                                          "--out", "{t}/o.safetensors"), "does not fit a vector fix"),
    "layers that are not numbers": (_cli("steer", "{t}/m.attr.safetensors", "--layers", "a,b", "--out", "{t}/o.safetensors"), "--layers takes comma-separated"),
    "strengths that are not numbers": (_cli("steer", "{t}/m.attr.safetensors", "--strengths", "x", "--out", "{t}/o.safetensors"),
                                       "--strengths"),
    "strengths that are empty": (_cli("steer", "{t}/m.attr.safetensors", "--strengths", ",", "--out", "{t}/o.safetensors"),
                                 "--strengths"),
    "a negative KL budget": (_cli("steer", "{t}/m.attr.safetensors", "--max-kl", "-1", "--out", "{t}/o.safetensors"), "--max-kl"),
    "an unknown replay": (_cli("verify", "{t}/mini.yaml", "--fix", "{t}/m.fix.safetensors", "--replay", "twice"), "--replay must be one of"),
    "verify without a fix": (_cli("verify", "{t}/mini.yaml"), "--fix is required"),
    "an unknown export format": (_cli("export", "{t}/m.fix.safetensors", "--format", "onnx", "--out", "{t}/o.onnx"), "--format"),
    "a recipe argument that is empty": (_cli("record", "", "--out", "{t}/o.safetensors", files=()), "the recipe is empty"),
    "neutral text that is a folder": (_cli("steer", "{t}/m.attr.safetensors", "--neutral", "{t}", "--out", "{t}/o.safetensors"),
                                      "is a folder; give a file"),
    "capabilities that do not exist": (_cli("steer", "{t}/m.attr.safetensors", "--capabilities", "{t}/none.jsonl",
                                            "--out", "{t}/o.safetensors"), "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_exits_2_naming_the_problem_and_changes_nothing(case, good, tmp_path, monkeypatch, capsys):
    _GOOD["dir"] = str(good)
    setup, named = CASES[case]
    args = setup(good, tmp_path)
    monkeypatch.chdir(tmp_path)  # a default output name lands here, where the snapshot sees it
    err = refused(monkeypatch, capsys, tmp_path, *args)
    assert named in err, err


def test_the_corpus_covers_every_kind_of_input_with_at_least_60_cases():
    assert len(CASES) >= 60

