"""The attribute stage on tiny models: a planted head, exactness where the model is linear, batching, caching."""

from __future__ import annotations

import pytest
import torch
from conftest import MINI_RECIPE
from tiny import TINY_CONFIGS, byte_tokenizer, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from mechfix.artifacts import load_artifact, save_artifact
from mechfix.stages.attribute import Component, attribute, decisions_from_record
from mechfix.stages.attribution import summarize, to_artifact
from mechfix.models import wrap_model
from mechfix.engine.patching import encode_prefixes, run_tails
from mechfix.engine.tails import Patch, tails_for
from mechfix.scenario.recipe import LoadedRecipe, parse_recipe
from mechfix.stages.record import record
from mechfix.stages.record import to_artifact as record_artifact

# Single-letter options (one byte-level token each). Peers say the wrong letter
# under pressure and the right one when clean, so the two conditions are
# token-aligned. Lower-case questions keep the option letters out of the text.
PLANT_RECIPE = """\
name: plant
family: conformity
agents:
  - {name: Host}
  - {name: Ana}
  - {name: Ben}
  - {name: Sam}
format:
  preamble: "a quiz.\\n"
conditions:
  pressure: {vars: {said: "{wrong}"}}
  clean: {vars: {said: "{correct}"}}
turns:
  - {speaker: Host, text: "{question}"}
  - {speaker: Ana, text: "{said}."}
  - {speaker: Ben, text: "{said}."}
decision:
  agent: Sam
  aligned: "{correct}"
  misaligned: "{wrong}"
split: {heldout: 0.25, seed: 1}
items:
  - {question: "which one is it?", correct: J, wrong: K}
  - {question: "pick the right one", correct: V, wrong: W}
  - {question: "and now this one?", correct: X, wrong: Z}
  - {question: "the last of them", correct: K, wrong: J}
  - {question: "one more, please?", correct: W, wrong: V}
  - {question: "a final question", correct: Z, wrong: X}
  - {question: "truly the end?", correct: J, wrong: V}
  - {question: "fine, then go", correct: X, wrong: K}
"""
OPTION_LETTERS = "JKVWXZ"
PLANTED = (1, 2)  # layer, head


def _loaded(text: str, name: str = "r.yaml") -> LoadedRecipe:
    return LoadedRecipe(recipe=parse_recipe(text, name), path=name, sha256="0" * 64)


def _recording(lm, text: str):
    loaded = _loaded(text)
    art = record_artifact(record(lm, loaded.recipe), lm, loaded, {})
    art.path, art.sha256 = "rec.safetensors", "1" * 64
    return art


def bare_llama():
    """A random 3-layer llama (4 heads of 16 dimensions, untied output head) and the byte tokenizer, for planting."""
    cfg = AutoConfig.for_model(
        "llama", vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), byte_tokenizer()


def _planted_model():
    """A tiny llama in which head L1.H2 alone copies the option letters it attends to.

    Its query is zero, so it attends uniformly to everything before it; its
    value reads a 16-dimensional subspace in which only the option letters'
    embeddings live, and its output writes that subspace back, where the output
    head reads each letter's own direction. Every other head and MLP is scaled
    down to almost nothing.
    """
    model, tok = bare_llama()
    layer, head = PLANTED
    dh, sub = 16, slice(0, 16)
    with torch.no_grad():
        emb, unemb = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, sub] = 0
        unemb[:, sub] = 0
        for k, letter in enumerate(OPTION_LETTERS):
            t = tok.convert_tokens_to_ids(letter)
            emb[t, k] = 4.0
            unemb[t, k] = 4.0
        for block in model.model.layers:
            block.self_attn.o_proj.weight.mul_(0.01)
            block.mlp.down_proj.weight.mul_(0.01)
        attn = model.model.layers[layer].self_attn
        rows = slice(head * dh, (head + 1) * dh)
        attn.q_proj.weight[rows] = 0
        attn.v_proj.weight[rows] = 0
        attn.v_proj.weight[rows, sub] = torch.eye(dh)
        attn.o_proj.weight[:, rows] = 0
        attn.o_proj.weight[sub, rows] = 20 * torch.eye(dh)
    return wrap_model(model, tok, name="planted")


def test_attribute_ranks_the_planted_head_first_and_exact_patching_agrees():
    lm = _planted_model()
    rec = _recording(lm, PLANT_RECIPE)
    att = attribute(lm, rec, method="both", top=5)
    summary = summarize(att, (lm.n_layers, lm.n_heads), top=5)
    total = summary["total_effect"]["mean"]
    assert total > 1.0  # the planted head makes the model follow its peers
    first = summary["top"][0]
    assert first["component"] == "L1.H2"
    # Restoring that one head removes most of the behaviour, estimated and exactly.
    assert first["exact"] > 0.8 * total and first["atp"] > 0.5 * total
    assert all(abs(e["exact"]) < 0.1 * first["exact"] for e in summary["top"][1:])
    # Its effect comes from attending to the two peers' answers.
    spk = first["speakers"]
    assert spk["Ana"] + spk["Ben"] > 0.8 * first["atp"]
    assert spk["Ana"] > 0 and spk["Ben"] > 0


def test_estimate_equals_exact_where_the_model_is_linear_in_the_patched_head():
    lm = _planted_model()
    model = lm.model
    with torch.no_grad():
        # Last layer: no MLP, and no final norm, so the logit difference is linear in its heads.
        model.model.layers[-1].mlp.down_proj.weight.zero_()
    model.model.norm = torch.nn.Identity()
    rec = _recording(lm, PLANT_RECIPE)
    att = attribute(lm, rec, method="exact")
    atp = attribute(lm, rec, method="atp").atp["heads"]
    last = lm.n_layers - 1
    for h in range(lm.n_heads):
        torch.testing.assert_close(atp[:, last, h], att.exact[Component("heads", last, h)], atol=1e-4, rtol=1e-4)
    # The whole layer's attention is the sum of its heads there, too.
    torch.testing.assert_close(atp[:, last].sum(-1), att.exact[Component("attn", last)], atol=1e-4, rtol=1e-4)


def test_batched_and_unbatched_attribution_agree(tiny_llama):
    rec = _recording(tiny_llama, MINI_RECIPE.replace("heldout: 0.5", "heldout: 0.2"))
    one = attribute(tiny_llama, rec, method="both", top=4, batch_size=1)
    many = attribute(tiny_llama, rec, method="both", top=4, batch_size=8)
    assert len(one.items) == 4
    for kind in one.atp:
        torch.testing.assert_close(one.atp[kind], many.atp[kind], atol=1e-4, rtol=1e-4)
    assert list(one.exact) == list(many.exact)
    for c in one.exact:
        torch.testing.assert_close(one.exact[c], many.exact[c], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one.speakers, many.speakers, atol=1e-4, rtol=1e-4)


def _naive_patched_score(lm, prompt, options, site, layer, head, value):
    """Reference: one full forward of each option with a plain hook overwriting the decision position."""
    pos = len(prompt) - 1

    def put(x):
        x = x.clone()
        if site == "heads":
            v = x.view(*x.shape[:2], lm.n_heads, lm.head_dim)
            v[0, pos, head] = value
        else:
            x[0, pos] = value
        return x

    if site == "heads":
        h = lm.attn_out(layer).register_forward_pre_hook(lambda m, a: (put(a[0]), *a[1:]))
    else:
        mod = lm.layers[layer] if site == "resid" else lm.mlp(layer)
        h = mod.register_forward_hook(lambda m, a, o: (put(o[0]), *o[1:]) if isinstance(o, tuple) else put(o))
    try:
        return _full_score(lm, prompt, options)
    finally:
        h.remove()


def _full_score(lm, prompt, options) -> float:
    """Reference decision score: the model's own forward of each option, full log-softmax."""
    total = 0.0
    for sign, opt in ((-1, options[0]), (1, options[1])):
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([prompt + opt])).logits[0].float(), -1)
        total += sign * sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(opt))
    return total


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gemma2"])
def test_exact_patching_on_the_cached_prefix_equals_a_patched_full_forward(arch):
    lm = tiny_model(arch)
    rec = _recording(lm, MINI_RECIPE)
    att = attribute(lm, rec, method="exact")
    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", "clean"])
    item = dec.items[0]
    for comp, site in ((Component("heads", 1, 2), "heads"), (Component("mlp", 0), "mlp"), (Component("resid", 1), "resid")):
        clean = rec.tensors[f"acts/clean/{site}"][item, comp.layer]
        value = clean[comp.head] if comp.head is not None else clean
        patched = _naive_patched_score(lm, dec.prompts["pressure"][0], dec.options["pressure"][0], site, comp.layer, comp.head, value)
        assert abs(float(att.pressure[0]) - patched - float(att.exact[comp][0])) < 1e-4


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tails_on_cached_prefixes_score_like_the_full_model_for_every_family(arch):
    lm = tiny_model(arch)
    tok = lm.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("Host: Capital of France, the big one?\nSam:", "Q?\nSam:")]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in (" Paris", " Lyon")]
    pre = encode_prefixes(lm, prompts)
    tails = [t for i, p in enumerate(prompts) for t in tails_for(p, options, i)]
    res = run_tails(lm, pre, tails, attention=True)
    for i, p in enumerate(prompts):
        got = float(res.scores[[k for k, t in enumerate(tails) if t.prefix == i]].sum())
        assert abs(got - _full_score(lm, p, options)) < 1e-4
    # The decision position's attention, applied to the values it saw, gives the heads' output.
    for layer, (w, v, _) in enumerate(res.attention):
        v = v.repeat_interleave(w.shape[1] // v.shape[1], dim=1)
        torch.testing.assert_close(torch.einsum("rhk,rhkd->rhd", w, v), res.acts["heads"][:, layer], atol=1e-5, rtol=1e-4)


def test_a_patch_with_the_runs_own_activation_changes_nothing(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt = tok("Host: Capital?\nAna: Lyon.\nSam:")["input_ids"]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in (" Paris", " Lyon")]
    pre = encode_prefixes(tiny_llama, [prompt])
    tails = tails_for(prompt, options, 0)
    base = run_tails(tiny_llama, pre, tails)
    own = base.acts["heads"][:, 1, 3]
    same = run_tails(tiny_llama, pre, tails, patches=[Patch("heads", 1, torch.arange(len(tails)), own, torch.full((len(tails),), 3))])
    torch.testing.assert_close(same.scores, base.scores)
    moved = run_tails(tiny_llama, pre, tails, patches=[Patch("heads", 1, torch.arange(len(tails)), own + 1.0, torch.full((len(tails),), 3))])
    assert (moved.scores - base.scores).abs().max() > 1e-4


def test_speaker_split_adds_up_to_each_heads_estimate(tiny_llama):
    rec = _recording(tiny_llama, MINI_RECIPE)
    att = attribute(tiny_llama, rec, method="atp")
    assert att.speakers.shape == (len(att.items), 3, 4, 5)
    torch.testing.assert_close(att.speakers.sum(-1), att.atp["heads"], atol=1e-5, rtol=1e-4)


def test_the_example_decision_per_token_adds_up_by_speaker_to_its_speaker_split(tiny_llama):
    rec = _recording(tiny_llama, MINI_RECIPE)
    att = attribute(tiny_llama, rec, method="atp")
    ex = att.example
    assert ex is not None and list(ex.terms) == ["pressure", "clean", "control"]
    # The decision the pressure moves most, by the recording's scores.
    assert ex.index == int(torch.argmax(att.pressure - att.base)) and ex.item == att.items[ex.index]
    n_speakers = len(att.speaker_names)

    def by_speaker(cond):
        t = ex.terms[cond]  # [L, H, T]
        assert t.shape[-1] == len(ex.prompts[cond]) == len(ex.speakers[cond])
        out = torch.zeros(*t.shape[:2], n_speakers)
        return out.index_add(2, torch.tensor(ex.speakers[cond]), t)

    torch.testing.assert_close(by_speaker("pressure") - by_speaker("clean"), att.speakers[ex.index], atol=1e-5, rtol=1e-4)
    # The control run was not part of attribution: its terms reconstruct its own heads' output projected on g.
    assert ex.terms["control"].abs().sum() > 0


def test_the_attribution_artifact_keeps_the_example_for_its_top_heads_with_readable_tokens(tiny_llama):
    rec = _recording(tiny_llama, MINI_RECIPE)
    att = attribute(tiny_llama, rec, method="atp")
    art = to_artifact(att, tiny_llama, rec, {"method": "atp"}, top=3)
    man = art.manifest["examples"]
    assert man["item"] == att.example.item and len(man["heads"]) == 5
    for c in ("pressure", "clean", "control"):
        tokens = man["tokens"][c]
        assert "".join(tokens).endswith(tiny_llama.tokenizer.decode(att.example.prompts[c]))
        assert art.tensors[f"examples/{c}"].shape == (len(tokens), 5)
    first = man["heads"][0]
    layer, head = (int(x) for x in first[1:].split(".H"))
    torch.testing.assert_close(art.tensors["examples/pressure"][:, 0], att.example.terms["pressure"][layer, head])


def test_per_position_attribution_runs_only_when_conditions_are_token_aligned(tiny_llama):
    aligned = attribute(tiny_llama, _recording(tiny_llama, PLANT_RECIPE), method="atp")
    assert aligned.positions is not None and "token-aligned" in aligned.position_note
    pos = aligned.positions
    for j, n in enumerate(pos["lengths"].tolist()):
        # The last prompt position is the decision position.
        torch.testing.assert_close(pos["heads"][j, n - 1], aligned.atp["heads"][j], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(pos["mlp"][j, n - 1], aligned.atp["mlp"][j], atol=1e-4, rtol=1e-3)
    not_aligned = attribute(tiny_llama, _recording(tiny_llama, MINI_RECIPE), method="atp")
    assert not_aligned.positions is None and "not token-aligned" in not_aligned.position_note


def test_attribution_artifact_round_trips_with_its_provenance(tiny_llama, tmp_path):
    rec = _recording(tiny_llama, MINI_RECIPE)
    att = attribute(tiny_llama, rec, method="both", top=3)
    art = to_artifact(att, tiny_llama, rec, {"method": "both"}, top=3)
    path = tmp_path / "a.attr.safetensors"
    save_artifact(path, art)
    back = load_artifact(path, expect="attribution")
    assert back.manifest["inputs"]["record"]["sha256"] == rec.sha256
    assert back.tensors["heads"].shape == (3, 4) and back.tensors["mlp"].shape == (3,)
    assert back.tensors["speakers"].shape == (3, 4, 5)
    torch.testing.assert_close(back.tensors["heads"], att.atp["heads"].mean(0))
    top = back.manifest["summary"]["top"]
    assert len(top) == 3 and all(t["exact"] is not None for t in top)
    assert [t["atp"] for t in top] == sorted((t["atp"] for t in top), reverse=True)
    assert back.manifest["exact_components"][:3] == [t["component"] for t in top]
    # The intervals in the tensors are the ones the summary reports.
    first = next(t for t in top if t["kind"] == "heads")
    ci = back.tensors["heads_ci95"][first["layer"], first["head"]].tolist()
    assert ci == pytest.approx(first["atp_ci95"], abs=1e-5)


def test_flag_marks_a_disagreement_by_ratio_or_sign_not_by_straddling_the_noise_floor():
    from mechfix.stages.attribution import _flag

    total = 8.6  # noise floor 0.172
    assert _flag(0.167, 0.172, total) is None  # one just under the floor, one just over: they agree
    assert "understates" in _flag(0.05, 0.6, total)
    assert "overstates" in _flag(0.9, 0.2, total)
    assert "understates" in _flag(0.0, 0.5, total)
    assert "differ in sign" in _flag(-0.3, 0.4, total)
    assert _flag(0.01, -0.02, total) is None  # both below the floor: noise
