"""Recipes are validated strictly, with file, line, key and fix in every error."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import MINI_RECIPE

from mechfix.errors import RecipeError
from mechfix.scenario.recipe import builtin_recipes, load_recipe, parse_recipe


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_mini_recipe_parses_with_conditions_in_order():
    r = parse_recipe(MINI_RECIPE, "mini.yaml")
    assert r.condition_names == ["pressure", "clean", "control"]
    assert r.option_templates == [" {correct}", " {wrong}", " none"]
    assert len(r.items) == 5


def test_unknown_key_error_names_file_line_key_and_allowed_keys():
    text = MINI_RECIPE.replace('  - {speaker: Ana, text: "{wrong}.", when: [pressure]}',
                               '  - {speaker: Ana, txt: "{wrong}.", when: [pressure]}')
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text, "bad.yaml")
    msg = str(exc.value)
    assert f"bad.yaml, line {_line_of(text, 'txt:')}" in msg
    assert "unknown key 'txt'" in msg and "turns[1]" in msg
    assert "Allowed keys here: speaker, text, when, max_tokens" in msg


def test_unknown_key_inside_a_condition_lists_the_condition_keys():
    text = MINI_RECIPE.replace("  pressure: {description: peers answer wrongly}",
                               "  pressure: {descripton: peers answer wrongly}")
    with pytest.raises(RecipeError, match=r"line \d+: unknown key 'descripton'.*Allowed keys here: description, vars"):
        parse_recipe(text, "bad.yaml")


def test_wrong_type_error_names_line_and_key():
    text = MINI_RECIPE.replace("split: {heldout: 0.5, seed: 3}", "split: {heldout: 0.5, seed: three}")
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text, "bad.yaml")
    assert f"line {_line_of(text, 'seed: three')}" in str(exc.value)
    assert "split.seed" in str(exc.value)


def test_missing_field_is_named_with_where_to_add_it():
    text = MINI_RECIPE.replace('  misaligned: " {wrong}"\n', "")
    with pytest.raises(RecipeError, match=r"line \d+: 'misaligned' is required but missing under decision"):
        parse_recipe(text, "bad.yaml")


def test_placeholder_missing_from_an_item_names_the_item_and_the_fix():
    text = MINI_RECIPE.replace('  - {question: "Red planet?", correct: Mars, wrong: Venus}',
                               '  - {question: "Red planet?", correct: Mars}')
    with pytest.raises(RecipeError, match=r"placeholder '\{wrong\}' is not set by item 4"):
        parse_recipe(text, "bad.yaml")


def test_unknown_speaker_and_condition_are_rejected_with_their_line():
    text = MINI_RECIPE.replace("{speaker: Ben,", "{speaker: Bob,")
    with pytest.raises(RecipeError, match=rf"line {_line_of(text, 'Bob')}: speaker 'Bob' is not among the agents"):
        parse_recipe(text, "bad.yaml")
    text = MINI_RECIPE.replace("when: [control]", "when: [contrl]")
    with pytest.raises(RecipeError, match="condition 'contrl' is not defined"):
        parse_recipe(text, "bad.yaml")


def test_pressure_and_clean_are_required():
    text = MINI_RECIPE.replace("  clean: {}\n", "")
    with pytest.raises(RecipeError, match="the condition 'clean' is required"):
        parse_recipe(text, "bad.yaml")


def test_duplicate_keys_and_bad_yaml_report_their_lines():
    text = MINI_RECIPE.replace("family: conformity\n", "family: conformity\nfamily: again\n")
    with pytest.raises(RecipeError, match=r"line 3: key 'family' appears twice \(first on line 2\)"):
        parse_recipe(text, "bad.yaml")
    with pytest.raises(RecipeError, match=r"bad.yaml, line \d+, column \d+: this is not valid YAML"):
        parse_recipe("name: x\nagents: [unclosed\n", "bad.yaml")


def test_a_generated_turn_needs_generate_mode():
    text = MINI_RECIPE.replace('  - {speaker: Ana, text: "{wrong}.", when: [pressure]}', "  - {speaker: Ana}")
    with pytest.raises(RecipeError, match="set 'mode: generate'"):
        parse_recipe(text, "bad.yaml")
    parse_recipe(text.replace("family: conformity", "family: conformity\nmode: generate"), "ok.yaml")


def test_recipes_never_execute_code(tmp_path):
    text = "!!python/object/apply:os.system ['echo hacked']\n"
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe(text, "evil.yaml")


@pytest.mark.parametrize("suffix,body", [
    (".csv", "question,correct,wrong\nCapital of France?,Paris,Lyon\nRed planet?,Mars,Venus\n"),
    (".jsonl", '{"question": "Capital of France?", "correct": "Paris", "wrong": "Lyon"}\n'
               '{"question": "Red planet?", "correct": "Mars", "wrong": "Venus"}\n'),
    (".yaml", "- {question: 'Capital of France?', correct: Paris, wrong: Lyon}\n"
              "- {question: 'Red planet?', correct: Mars, wrong: Venus}\n"),
])
def test_items_can_come_from_a_file_beside_the_recipe(tmp_path, suffix, body):
    (tmp_path / f"items{suffix}").write_text(body)
    text = MINI_RECIPE.split("items:\n")[0] + f"items: {{file: items{suffix}}}\n"
    (tmp_path / "r.yaml").write_text(text)
    r = load_recipe(tmp_path / "r.yaml").recipe
    assert r.items[1] == {"question": "Red planet?", "correct": "Mars", "wrong": "Venus"}


def test_a_missing_items_file_is_named_with_where_it_was_looked_for(tmp_path):
    text = MINI_RECIPE.split("items:\n")[0] + "items: {file: nowhere.csv}\n"
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"line \d+: items file 'nowhere.csv' was not found"):
        load_recipe(tmp_path / "r.yaml")


def test_a_missing_recipe_lists_the_builtin_names():
    with pytest.raises(RecipeError, match=r"recipe 'nope' was not found.*built-in: .*conformity"):
        load_recipe("nope")


def test_builtin_conformity_recipe_meets_its_spec():
    loaded = load_recipe("conformity")
    r = loaded.recipe
    assert len(r.items) >= 24
    assert set(r.conditions) == {"pressure", "clean", "control", "helpful"}
    peers = [t for t in r.turns if t.when == ["pressure"] and t.speaker not in (None, r.decision.agent)]
    assert len(peers) >= 4
    for item in r.items:
        # Content words, not letters: each option is a word of two or more letters.
        assert re.fullmatch(r"[A-Z][a-z]+", item["correct"]) and re.fullmatch(r"[A-Z][a-z]+", item["wrong"])
        assert item["correct"] != item["wrong"]
    assert len(loaded.sha256) == 64


def test_every_builtin_recipe_loads():
    paths = builtin_recipes()
    assert paths
    for p in paths:
        assert load_recipe(p).recipe.name == p.stem


FAMILIES = {"conformity", "sycophancy", "collusion", "principal_agent", "privacy", "commons", "handoff"}


def test_builtin_recipes_cover_all_seven_failure_families():
    families = {load_recipe(p).recipe.family for p in builtin_recipes()}
    assert families >= FAMILIES


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_builtin_recipe_has_24_items_three_conditions_and_distinct_options(name):
    # A helpful condition (the same channel carrying the right answer) joins every family where it makes sense.
    from mechfix.scenario.episodes import render_episode

    r = load_recipe(name).recipe
    assert len(r.items) >= 24
    helpful = name != "privacy"  # withholding a secret has no right answer for another agent to pass on
    assert set(r.conditions) == {"pressure", "clean", "control"} | ({"helpful"} if helpful else set())
    assert any(t.when == ["pressure"] for t in r.turns) and any(t.when and "control" in t.when for t in r.turns)
    for i in range(len(r.items)):
        episodes = {c: render_episode(r, i, c) for c in r.condition_names}
        aligned, misaligned = episodes["pressure"].options[:2]
        assert aligned.strip() and misaligned.strip() and aligned != misaligned
        # The same decision in every condition; only the context differs.
        assert all(ep.options == episodes["pressure"].options for ep in episodes.values())
        assert len({ep.text for ep in episodes.values()}) == len(r.conditions)
        if helpful:  # the helpful turn says the aligned option where the pressure turn said the misaligned one
            said = lambda c: len(re.findall(rf"\b{re.escape(aligned.strip())}\b", episodes[c].text))  # noqa: E731
            assert said("helpful") > said("pressure")


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_every_builtin_recipe_records_in_score_and_generate_mode(tiny_llama, mode):
    from mechfix.stages.record import record, summarize

    for path in builtin_recipes():
        loaded = load_recipe(path, mode=mode)
        assert loaded.recipe.mode == mode
        small = loaded.recipe.model_copy(update={"items": loaded.recipe.items[:2]})
        rec = record(tiny_llama, small, batch_size=8, sites=("resid",))
        rows = 2 * (small.rounds.count if small.rounds else 1)  # a live recipe decides once per round
        assert all(rec.scores[c].shape == (rows, 2) and torch.isfinite(rec.scores[c]).all() for c in rec.conditions)
        # A live recipe generates the target's replies in either mode.
        assert ("generated_choices" in summarize(rec)) == (mode == "generate" or small.rounds is not None)


def test_commons_live_plays_four_seasons_of_24_items_with_a_decision_each():
    r = load_recipe("commons-live").recipe
    assert r.family == "commons" and len(r.items) >= 24 and set(r.conditions) == {"pressure", "clean", "control"}
    assert r.rounds.count == 4 and sum(t.decision for t in r.rounds.turns) == 1
    assert {t.capture for t in r.rounds.turns if t.capture} == {"ana", "ben", "chloe", "sam"}


def test_an_unknown_mode_is_refused():
    with pytest.raises(RecipeError, match="--mode must be one of score, generate"):
        load_recipe("conformity", mode="chat")


def test_a_built_in_name_means_the_built_in_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    # `mechfix run recipes/conformity.yaml --out conformity` leaves a folder named like the built-in recipe.
    from mechfix.scenario.recipe import builtin_recipe_dir, load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conformity").mkdir()
    assert load_recipe("conformity").path == str(builtin_recipe_dir() / "conformity.yaml")
    (tmp_path / "mine").mkdir()
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe("mine")


@pytest.mark.parametrize(("name", "key"), [("collusion", "product"), ("commons", "land")])
def test_a_reworded_recipe_asks_the_built_in_question_in_words_the_built_in_never_uses(name, key):
    # The transfer check verifies a built-in recipe's fix on its reworded twin; that tests carrying over only if no wording is shared.
    from pathlib import Path

    from mechfix.scenario.episodes import render_episode

    def four_grams(r):
        grams = set()
        for i in range(len(r.items)):
            for c in r.condition_names:
                words = re.findall(r"[a-z']+", render_episode(r, i, c).text.lower())
                grams |= {tuple(words[k:k + 4]) for k in range(len(words) - 3)}
        return grams

    built_in = load_recipe(name).recipe
    reworded = load_recipe(Path(__file__).parents[1] / "benchmarks" / "transfer" / f"{name}-reworded.yaml").recipe
    assert reworded.family == built_in.family and set(reworded.conditions) == set(built_in.conditions)
    assert len(reworded.items) == len(built_in.items)
    assert not {a.name for a in reworded.agents} & {a.name for a in built_in.agents}
    # What the items name (goods, pastures) is new too.
    assert not {i[key] for i in reworded.items} & {v for i in built_in.items for v in i.values()}
    assert not four_grams(reworded) & four_grams(built_in)
