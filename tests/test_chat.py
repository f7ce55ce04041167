"""Chat style on tiny models whose tokenizers carry each built-in template (and one from a file)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MINI_RECIPE
from test_attribute import _loaded
from test_cli import run
from test_cli_fix import planted_dir  # noqa: F401, F811 (a fixture)
from tiny import tiny_model

from mechfix.chat import Style, agent_messages, choose_style, style_mismatch, template_ids
from mechfix.episodes import FRAME, render_episode, speaker_list
from mechfix.errors import BadInputError
from mechfix.models import wrap_model
from mechfix.record import decision_requests, record
from mechfix.templates import BUILTIN_TEMPLATES, TEMPLATE_TOKENS, Template, resolve_template, use_template

# A template of our own, as a user would write one in a file: role tags in square brackets.
FILE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


def chat_tiny(name: str, tmp_path=None):
    """A tiny llama whose tokenizer has the template's special tokens and the template itself."""
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tok.add_special_tokens({"additional_special_tokens": list(TEMPLATE_TOKENS.get(name, ()))})
    lm.model.resize_token_embeddings(len(tok))
    if name == "file":
        path = tmp_path / "mine.jinja"
        path.write_text(FILE_TEMPLATE)
        template = resolve_template(str(path))
    else:
        template = resolve_template(name)
    use_template(tok, template)
    return wrap_model(lm.model, tok, name=f"tiny-chat-{name}"), template


TEMPLATES = [*BUILTIN_TEMPLATES, "file"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_renderings_are_token_for_token_the_templates_own_with_a_speaker_for_every_token(name, tmp_path):
    lm, template = chat_tiny(name, tmp_path)
    recipe = _loaded(MINI_RECIPE).recipe
    style = Style("chat", template)
    rendered = decision_requests(lm, recipe, [0, 1], style=style)
    speakers = speaker_list(recipe)
    for cond in ("pressure", "clean", "control"):
        ep = render_episode(recipe, 0, cond)
        messages = agent_messages(recipe, ep.turns, ep.agent, ep.values)
        tok = rendered.tokens[cond][0]
        # Exactly apply_chat_template's ids (no double BOS, no stray separator), then the reply's prompt (empty here).
        assert tok.ids == template_ids(lm.tokenizer, messages)
        assert tok.ids.count(lm.tokenizer.bos_token_id) <= 1
        assert len(tok.speakers) == len(tok.ids)
        # Every agent's words are its own tokens; the template's tokens are the frame's.
        by = {s: lm.tokenizer.decode([i for i, w in zip(tok.ids, tok.speakers) if w == speakers.index(s)]) for s in speakers}
        assert "Host: Capital of France?" in by["Host"]
        if cond == "pressure":
            assert by["Ana"].strip() == "Ana: Lyon." and by["Ben"].strip() == "Ben: Lyon."
        else:
            assert by["Ana"] == "" and by["Ben"] == ""
        for special in TEMPLATE_TOKENS.get(name, ()):
            if special in lm.tokenizer.decode(tok.ids):
                assert special in by[FRAME] and all(special not in by[s] for s in speakers if s != FRAME)
    # The options are the start of the reply: no leading space after the generation prompt.
    assert rendered.episodes["pressure"][0].options[:2] == ["Paris", "Lyon"]
    assert rendered.requests["pressure"][0].options[0] == list(lm.tokenizer("Paris", add_special_tokens=False)["input_ids"])


def test_other_agents_are_users_with_their_names_and_roles_merge_where_templates_need_it():
    recipe = _loaded(MINI_RECIPE).recipe
    ep = render_episode(recipe, 0, "pressure")
    msgs = agent_messages(recipe, ep.turns, "Sam", ep.values)
    assert [m.role for m in msgs] == ["system", "user"]
    assert msgs[0].content == "A quiz.\n\nYou are Sam."
    assert msgs[1].content == "Host: Capital of France?\n\nAna: Lyon.\n\nBen: Lyon."
    # Ana's own view: her turn is the assistant's, the others are users.
    ana = agent_messages(recipe, ep.turns, "Ana", ep.values)
    assert [(m.role, m.content) for m in ana[1:]] == [("user", "Host: Capital of France?"), ("assistant", "Lyon."),
                                                       ("user", "Ben: Lyon.")]


def test_chat_scores_batched_equal_unbatched(tmp_path):
    lm, template = chat_tiny("chatml")
    recipe = _loaded(MINI_RECIPE).recipe
    one = record(lm, recipe, batch_size=1, sites=(), style=Style("chat", template))
    many = record(lm, recipe, batch_size=8, sites=(), style=Style("chat", template))
    for c in one.conditions:
        torch.testing.assert_close(many.scores[c], one.scores[c], atol=1e-5, rtol=1e-5)
    text = record(lm, recipe, batch_size=8, sites=())
    assert not torch.allclose(text.scores["pressure"], many.scores["pressure"], atol=1e-3)


def test_the_style_default_follows_the_template_and_the_fix_and_bad_templates_are_refused(tmp_path):
    lm = tiny_model("llama")
    recipe = _loaded(MINI_RECIPE).recipe
    assert choose_style(lm.tokenizer, recipe).name == "text"  # no template: text
    with pytest.raises(BadInputError, match="has none"):
        choose_style(lm.tokenizer, recipe, "chat")
    chosen = choose_style(lm.tokenizer, recipe, None, "chatml")
    assert chosen.name == "chat" and chosen.template.name == "chatml"
    # verify renders as the fix's recording was: a text-made fix stays text on a model with a template.
    assert choose_style(lm.tokenizer, recipe, None, None, {"name": "text"}).name == "text"
    with pytest.raises(BadInputError, match="neither a built-in"):
        resolve_template("llama9")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(BadInputError, match="does not render"):
        use_template(lm.tokenizer, resolve_template(str(bad)))
    # Gemma's template insists on alternating roles: an assistant turn first is refused with the reason.
    gemma = Template("gemma", BUILTIN_TEMPLATES["gemma"])
    text_made = {"name": "text", "template": None, "template_sha256": None}
    assert "text-style" in style_mismatch(text_made, Style("chat", gemma))
    assert "chat template" in style_mismatch(Style("chat", Template("chatml", BUILTIN_TEMPLATES["chatml"])).as_dict(),
                                             Style("chat", gemma))
    assert style_mismatch(Style("chat", gemma).as_dict(), Style("chat", gemma)) is None


def test_chat_style_is_refused_for_live_and_generate_recipes_with_the_way_out():
    from mechfix.recipe import load_recipe

    lm, template = chat_tiny("chatml")
    live = load_recipe("commons-live").recipe
    with pytest.raises(BadInputError, match="--style text"):
        decision_requests(lm, live, [0], style=Style("chat", template))
    assert choose_style(lm.tokenizer, live).name == "text"  # the default falls back for it


def test_a_fix_made_on_text_is_not_verified_on_chat_renderings_unless_asked(monkeypatch, capsys, tmp_path, planted_dir):  # noqa: F811
    from test_cli_fix import LOOSE
    from test_steer import PLANT_MORE

    recipe = tmp_path / "plant.yaml"
    recipe.write_text(PLANT_MORE)
    rec, att, fix = tmp_path / "p.rec.safetensors", tmp_path / "p.attr.safetensors", tmp_path / "p.fix.safetensors"
    assert run(monkeypatch, capsys, "record", str(recipe), "--model", str(planted_dir), "--out", str(rec))[0] == 0
    code, out, _ = run(monkeypatch, capsys, "show", str(rec), "--json")
    assert json.loads(out)["manifest"]["style"] == {"name": "text", "template": None, "template_sha256": None}
    assert run(monkeypatch, capsys, "attribute", str(rec), "--out", str(att), "--method", "atp")[0] == 0
    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(fix), "--op", "scale", "--top-heads", "1", *LOOSE)[0] == 0
    code, _, err = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--style", "chat",
                       "--chat-template", "chatml", *LOOSE)
    assert code == 2 and "text-style renderings" in err and "--style text" in err
    code, out, _ = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--style", "chat",
                       "--chat-template", "chatml", "--allow-style-mismatch", "--json", *LOOSE)
    report = json.loads(out)
    assert code == (0 if report["passed"] else 1) and report["style"]["name"] == "chat"
    # The same verify in the fix's own style needs no flag.
    code, out, _ = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--json", *LOOSE)
    assert json.loads(out)["style"]["name"] == "text"


def test_record_in_chat_style_keeps_the_style_and_template_in_every_artifact(monkeypatch, capsys, tmp_path, tiny_model_dir):
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    rec, att = tmp_path / "c.rec.safetensors", tmp_path / "c.attr.safetensors"
    code, _, err = run(monkeypatch, capsys, "record", str(recipe), "--model", str(tiny_model_dir), "--out", str(rec),
                       "--chat-template", "chatml")
    assert code == 0 and "style: chat, through chat template chatml" in err
    manifest = json.loads(run(monkeypatch, capsys, "show", str(rec), "--json")[1])["manifest"]
    assert manifest["style"]["name"] == "chat" and manifest["style"]["template"] == "chatml"
    assert manifest["transcripts"]["pressure"][0].startswith("<|im_start|>system\nA quiz.")
    assert run(monkeypatch, capsys, "attribute", str(rec), "--out", str(att), "--method", "atp")[0] == 0
    att_manifest = json.loads(run(monkeypatch, capsys, "show", str(att), "--json")[1])["manifest"]
    assert att_manifest["style"] == manifest["style"]
    code, _, err = run(monkeypatch, capsys, "record", str(recipe), "--model", str(tiny_model_dir), "--out",
                       str(tmp_path / "x.rec.safetensors"), "--chat-template", "vicuna")
    assert code == 2 and "neither a built-in" in err and not (tmp_path / "x.rec.safetensors").exists()
