"""Property-based fuzzing of the recipe and transcript loaders: load, or raise mechfix's own error; never anything else, never hang.

Seeded (``derandomize``) and bounded, so CI runs the same examples every time.
Inputs start from good files and are then broken: YAML and JSON values of
any shape, good files with keys dropped, values replaced and text cut, and
raw text.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import MINI_RECIPE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transcript import DECISION, QUESTIONS, _chat

from mechfix.errors import MechfixError
from mechfix.scenario.recipe import parse_recipe
from mechfix.scenario.transcript import load_transcript

FUZZ = settings(max_examples=150, derandomize=True, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                        st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=40)


def _mutations(good: object) -> st.SearchStrategy:
    """A good document with one part dropped or replaced by anything, at any depth."""
    def mutate(data: object, path: list[int], new: object, drop: bool) -> object:
        if not path or not isinstance(data, (dict, list)) or not data:
            return new
        keys = list(data) if isinstance(data, dict) else list(range(len(data)))
        k = keys[path[0] % len(keys)]
        out = dict(data) if isinstance(data, dict) else list(data)
        if drop and len(path) == 1:
            del out[k]
        else:
            out[k] = mutate(out[k], path[1:], new, drop)
        return out
    return st.builds(mutate, st.just(good), st.lists(st.integers(0, 50), min_size=1, max_size=4), values, st.booleans())


GOOD_RECIPE = yaml.safe_load(MINI_RECIPE)


def _load_recipe(text: str) -> None:
    try:
        parse_recipe(text, "fuzz.yaml")
    except MechfixError:
        pass


@FUZZ
@given(st.text(max_size=400))
def test_any_text_as_a_recipe_loads_or_raises_mechfix_s_error(text):
    _load_recipe(text)


@FUZZ
@given(values)
def test_any_yaml_value_as_a_recipe_loads_or_raises_mechfix_s_error(value):
    _load_recipe(yaml.safe_dump(value))


@FUZZ
@given(_mutations(GOOD_RECIPE))
def test_a_broken_good_recipe_loads_or_raises_mechfix_s_error(value):
    _load_recipe(yaml.safe_dump(value, allow_unicode=True))


@FUZZ
@given(st.integers(0, len(MINI_RECIPE)))
def test_a_recipe_cut_short_anywhere_loads_or_raises_mechfix_s_error(cut):
    _load_recipe(MINI_RECIPE[:cut])


GOOD_CHATS = [_chat(q, w, c) for q, c, w in QUESTIONS]
GOOD_DECISION = yaml.safe_load(DECISION + "".join(f"  - {{correct: {c}, wrong: {w}}}\n" for _, c, w in QUESTIONS))


def _load_transcript(tmp: Path, chats: str, decision: str, suffix: str = ".json") -> None:
    (tmp / f"t{suffix}").write_text(chats, encoding="utf-8")
    (tmp / "d.yaml").write_text(decision, encoding="utf-8")
    try:
        load_transcript(tmp / f"t{suffix}", tmp / "d.yaml")
    except MechfixError:
        pass


@FUZZ
@given(values)
def test_any_json_value_as_a_transcript_loads_or_raises_mechfix_s_error(tmp_path_factory, value):
    _load_transcript(tmp_path_factory.mktemp("f"), json.dumps(value), yaml.safe_dump(GOOD_DECISION))


@FUZZ
@given(_mutations(GOOD_CHATS))
def test_a_broken_good_transcript_loads_or_raises_mechfix_s_error(tmp_path_factory, value):
    _load_transcript(tmp_path_factory.mktemp("f"), json.dumps(value), yaml.safe_dump(GOOD_DECISION))


@FUZZ
@given(_mutations(GOOD_DECISION))
def test_a_broken_good_decision_file_loads_or_raises_mechfix_s_error(tmp_path_factory, value):
    _load_transcript(tmp_path_factory.mktemp("f"), json.dumps(GOOD_CHATS), yaml.safe_dump(value, allow_unicode=True))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_as_a_jsonl_transcript_loads_or_raises_mechfix_s_error(tmp_path_factory, text):
    _load_transcript(tmp_path_factory.mktemp("f"), text, yaml.safe_dump(GOOD_DECISION), suffix=".jsonl")
