"""Rendering episodes and giving every token its speaker."""

from __future__ import annotations

from conftest import MINI_RECIPE
from tiny import byte_tokenizer

from mechfix.scenario.episodes import FRAME, fill, render_episode, speaker_list, tokenize_episode
from mechfix.scenario.recipe import parse_recipe


def test_conditions_render_their_own_turns():
    r = parse_recipe(MINI_RECIPE, "mini.yaml")
    pressure = render_episode(r, 0, "pressure").text
    clean = render_episode(r, 0, "clean").text
    control = render_episode(r, 0, "control").text
    assert pressure == "A quiz.\nHost: Capital of France?\nAna: Lyon.\nBen: Lyon.\nSam:"
    assert clean == "A quiz.\nHost: Capital of France?\nSam:"
    assert control == "A quiz.\nHost: Capital of France?\nPoster: Lyon Lyon.\nSam:"
    assert render_episode(r, 0, "pressure").options == [" Paris", " Lyon", " none"]


def test_every_token_gets_the_speaker_of_its_text():
    r = parse_recipe(MINI_RECIPE, "mini.yaml")
    ep = render_episode(r, 0, "pressure")
    speakers = speaker_list(r)
    tok = byte_tokenizer()
    t = tokenize_episode(tok, ep, speakers)
    assert len(t.ids) == len(t.speakers) == len(ep.text.encode()) + 1  # bytes + BOS
    text = "\x00" + ep.text  # BOS first
    names = [speakers[s] for s in t.speakers]
    assert names[0] == FRAME
    assert "".join(ch for ch, n in zip(text, names) if n == "Ana") == "Ana: Lyon.\n"
    assert "".join(ch for ch, n in zip(text, names) if n == "Sam") == "Sam:"
    assert "".join(ch for ch, n in zip(text, names) if n == FRAME) == "\x00A quiz.\n"


def test_slow_tokenizer_path_gives_the_same_speakers():
    r = parse_recipe(MINI_RECIPE, "mini.yaml")
    ep = render_episode(r, 1, "pressure")
    speakers = speaker_list(r)
    tok = byte_tokenizer()
    fast = tokenize_episode(tok, ep, speakers)

    class Slow:
        is_fast = False

        def __call__(self, text, **kw):
            return tok(text)

    slow = tokenize_episode(Slow(), ep, speakers)
    assert slow.ids == fast.ids and slow.speakers == fast.speakers


def test_fill_substitutes_names_only_and_keeps_escaped_braces():
    assert fill("{a} {{b}} {c.__class__} {missing}", {"a": "A", "c": "C"}) == "A {b} {c.__class__} {missing}"
