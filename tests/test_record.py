"""The record stage on a tiny model: scores, split, artifact contents, generate mode."""

from __future__ import annotations

import torch
from conftest import MINI_RECIPE

from mechfix.artifacts import load_artifact, save_artifact
from mechfix.engine.batches import Request
from mechfix.engine.forward import run_requests
from mechfix.scenario.recipe import LoadedRecipe, parse_recipe
from mechfix.stages.record import parse_choice, record, split_items, summarize, to_artifact


def _loaded(text=MINI_RECIPE) -> LoadedRecipe:
    return LoadedRecipe(recipe=parse_recipe(text, "mini.yaml"), path="mini.yaml", sha256="0" * 64)


def test_record_scores_every_item_under_every_condition(tiny_llama):
    loaded = _loaded()
    rec = record(tiny_llama, loaded.recipe, batch_size=4)
    assert rec.conditions == ["pressure", "clean", "control"]
    for c in rec.conditions:
        assert rec.scores[c].shape == (5, 3)
        assert rec.acts[c]["heads"].shape == (5, 3, 4, 16)
    # Each stored score is the option's log-probability after the rendered prompt.
    ep, tk = rec.episodes["clean"][2], rec.tokens["clean"][2]
    opts = [tiny_llama.tokenizer(o, add_special_tokens=False)["input_ids"] for o in ep.options]
    direct = run_requests(tiny_llama, [Request(tk.ids, opts)], batch_size=1, sites=())[0].scores
    torch.testing.assert_close(rec.scores["clean"][2], direct)
    assert ep.text.endswith("Sam:") and ep.options[2] == " none"


def test_split_is_reproducible_and_never_empty_on_either_side():
    a = split_items(10, 0.3, seed=7)
    assert torch.equal(a, split_items(10, 0.3, seed=7))
    assert int(a.sum()) == 3
    assert not torch.equal(a, split_items(10, 0.3, seed=8))
    assert int(split_items(2, 0.01, 0).sum()) == 1 and int(split_items(2, 0.99, 0).sum()) == 1


def test_record_artifact_holds_tokens_speakers_scores_split_and_transcripts(tiny_llama, tmp_path):
    loaded = _loaded()
    rec = record(tiny_llama, loaded.recipe, batch_size=4)
    art = to_artifact(rec, tiny_llama, loaded, {"batch_size": 4})
    save_artifact(tmp_path / "r.safetensors", art)
    back = load_artifact(tmp_path / "r.safetensors", expect="record")
    m, t = back.manifest, back.tensors
    assert m["model"]["weights_fingerprint"] == tiny_llama.identity["weights_fingerprint"]
    assert m["recipe"]["name"] == "mini" and m["inputs"]["recipe"]["sha256"] == "0" * 64
    assert m["speakers"] == ["<frame>", "Host", "Ana", "Ben", "Sam"]
    assert m["options"] == ["aligned", "misaligned", "other1"]
    assert m["transcripts"]["pressure"][0].endswith("Ana: Lyon.\nBen: Lyon.\nSam:")
    assert m["summary"]["effect"]["n"] == 5
    n = int(t["lengths/pressure"][0])
    assert t["tokens/pressure"][0, :n].tolist() == rec.tokens["pressure"][0].ids
    assert (t["tokens/pressure"][0, n:] == -1).all()
    assert t["speakers/pressure"][0, :n].tolist() == rec.tokens["pressure"][0].speakers
    assert torch.equal(t["split"], rec.split)
    assert torch.equal(t["acts/control/resid"], rec.acts["control"]["resid"])


def test_all_positions_keeps_every_prompt_position(tiny_llama):
    rec = record(tiny_llama, _loaded().recipe, batch_size=4, all_positions=True)
    lengths = [len(t.ids) for t in rec.tokens["pressure"]]
    assert rec.acts["pressure"]["resid"].shape == (5, max(lengths), 3, 64)
    short = lengths.index(min(lengths))
    assert (rec.acts["pressure"]["resid"][short, min(lengths):] == 0).all()
    decision = record(tiny_llama, _loaded().recipe, batch_size=4)
    torch.testing.assert_close(
        rec.acts["pressure"]["mlp"][short, lengths[short] - 1], decision.acts["pressure"]["mlp"][short]
    )


def test_generate_mode_writes_unscripted_turns_and_parses_the_reply(tiny_llama):
    text = MINI_RECIPE.replace("family: conformity", "family: conformity\nmode: generate").replace(
        '  - {speaker: Ben, text: "{wrong}.", when: [pressure]}', "  - {speaker: Ben, max_tokens: 6, when: [pressure]}"
    ).replace("  others: [\" none\"]", "  others: [\" none\"]\n  max_tokens: 5")
    loaded = _loaded(text)
    a = record(tiny_llama, loaded.recipe, batch_size=4)
    b = record(tiny_llama, loaded.recipe, batch_size=4)
    ep = a.episodes["pressure"][0]
    assert 2 in ep.generated and "\n" not in ep.generated[2]
    assert f"Ben: {ep.generated[2]}\n" in ep.text
    assert a.episodes["pressure"][0].text == b.episodes["pressure"][0].text  # deterministic
    assert a.replies == b.replies and len(a.replies["clean"]) == 5
    assert all(c in (-1, 0, 1, 2) for c in a.choices["clean"])
    assert "generated_choices" in summarize(a)


def test_parse_choice_takes_the_first_whole_word_option():
    opts = [" Paris", " Lyon", " none"]
    assert parse_choice("I'd say lyon, not Paris.", opts) == 1
    assert parse_choice("Parisian? No: Paris.", opts) == 0
    assert parse_choice("no idea", opts) == -1


def test_the_manifest_keeps_conditions_in_recipe_order(tiny_llama, tmp_path):
    loaded = _loaded()
    rec = record(tiny_llama, loaded.recipe, batch_size=8, sites=())
    save_artifact(tmp_path / "r.safetensors", to_artifact(rec, tiny_llama, loaded, {}))
    m = load_artifact(tmp_path / "r.safetensors").manifest
    assert list(m["transcripts"]) == list(m["summary"]["per_condition"]) == ["pressure", "clean", "control"]
