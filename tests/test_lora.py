"""LoRA fixes: training on the found modules, the PEFT adapter folder, and PEFT's own reading of it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_steer import planted  # noqa: F401  (a fixture)
from tiny import gpt2_lora_fix, tiny_model

from mechfix.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Artifact, new_manifest
from mechfix.stages.attribute import decisions_from_record
from mechfix.errors import ArtifactError, BadInputError
from mechfix.measure.evaluate import score_requests
from mechfix.fixes.adapter import LoraWeights
from mechfix.fixes.fix import Fix, apply_fix, fix_tensors, load_fix, save_fix
from mechfix.engine.batches import Request
from mechfix.fixes.adapter import lora_targets
from mechfix.stages.lora import LoraSettings, bucket_kl, train_lora
from mechfix.stages.steer import steer
from mechfix.stages.sweep import Budget
from mechfix.stages.steer import to_artifact as fix_artifact
from mechfix.measure.stats import decision_scores

# The planted head is the model's only way to read a letter, the clean answers' too, so the clean margin is left out.
LOOSE = Budget(max_kl=5.0, min_clean_agreement=0.95, min_clean_margin=None)

FAST = LoraSettings(rank=2, steps=25, lr=0.02, batch=4, kl_weight=1.0, neutral_per_step=2, kl_positions=16)


def _requests(lm, rec, split=0, conds=("pressure", "clean")):
    dec = decisions_from_record(rec, lm.tokenizer, list(conds), split=split)
    return {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in conds}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_steering(planted):  # noqa: F811
    # With --layers, on the top heads' layers and their columns only (without, the planted model's token-aligned
    # recipe sends a lora fix to the whole module that carries the behaviour at every position: test_restore.py).
    lm, rec, att, neutral = planted
    return steer(lm, att, rec, neutral, kind="lora", top=2, layers=[1, 2], budget=LOOSE, lora=FAST)


@pytest.fixture(scope="module")
def lora_folder(lora_steering, planted, tmp_path_factory):  # noqa: F811
    lm, rec, att, neutral = planted
    folder = tmp_path_factory.mktemp("fixes") / "plant.lora"
    art = fix_artifact(lora_steering, lm, att, rec, {"kind": "lora"})
    save_fix(folder, art)
    return folder


def test_lora_targets_are_the_output_projections_of_the_layers_holding_the_top_heads():
    lm = tiny_model("llama")
    targets = lora_targets(lm, [2, 1, 2], [3, 0, 1], scope="heads")
    assert [t.module for t in targets] == ["model.layers.1.self_attn.o_proj", "model.layers.2.self_attn.o_proj"]
    assert [t.heads for t in targets] == [[0], [1, 3]]
    assert (targets[0].in_features, targets[0].out_features) == (64, 64)
    mask = targets[1].mask(lm.head_dim)
    assert mask.tolist() == [0.0] * 16 + [1.0] * 16 + [0.0] * 16 + [1.0] * 16
    assert lora_targets(lm, [1], [0], scope="modules")[0].heads is None
    with pytest.raises(BadInputError, match="--lora-scope"):
        lora_targets(lm, [1], [0], scope="everything")


def test_gpt2_conv1d_projection_is_marked_fan_in_fan_out_for_peft():
    lm = tiny_model("gpt2")
    (t,) = lora_targets(lm, [1], [0])
    assert t.module == "transformer.h.1.attn.c_proj" and t.fan_in_fan_out
    assert (t.in_features, t.out_features) == (64, 64)


def test_bucket_kl_is_zero_for_the_base_model_and_never_above_the_full_kl():
    torch.manual_seed(0)
    base = torch.randn(5, 300) * 3
    logp = torch.log_softmax(base, -1)
    vals, idx = logp.topk(20, -1)
    tail = torch.log1p(-vals.exp().sum(-1))
    assert bucket_kl(idx, vals, tail, base).abs().max() < 1e-5
    new = base + torch.randn(5, 300)
    full = (logp.exp() * (logp - torch.log_softmax(new, -1))).sum(-1)
    bucket = bucket_kl(idx, vals, tail, new)
    assert (bucket <= full + 1e-5).all() and (bucket > 0).all()


def test_training_is_deterministic_with_a_seed_and_keeps_masked_columns_zero(planted):  # noqa: F811
    lm, rec, att, neutral = planted
    reqs = _requests(lm, rec)
    targets = lora_targets(lm, [1, 1], [2, 0], scope="heads")
    short = LoraSettings(**{**FAST.__dict__, "steps": 6})
    one, log1 = train_lora(lm, targets, reqs["pressure"], reqs["clean"], neutral, short)
    two, log2 = train_lora(lm, targets, reqs["pressure"], reqs["clean"], neutral, short)
    other, _ = train_lora(lm, targets, reqs["pressure"], reqs["clean"], neutral, LoraSettings(**{**short.__dict__, "seed": 1}))
    assert all(torch.equal(a, b) for a, b in zip(one.a + one.b, two.a + two.b))
    assert [s["loss"] for s in log1.steps] == [s["loss"] for s in log2.steps] and len(log1.steps) == 6
    assert not torch.equal(one.a[0], other.a[0])
    # Only heads 0 and 2 (columns 0-15 and 32-47) may be read; B trained away from its zero start.
    a = one.a[0]
    assert a[:, 16:32].abs().max() == 0 and a[:, 48:].abs().max() == 0
    assert a[:, :16].abs().min() > 0 and one.b[0].abs().max() > 0
    # The model's own weights are untouched and take gradients again afterwards, as before.
    assert all(p.requires_grad for p in lm.model.parameters())


def test_a_training_step_that_runs_out_of_memory_is_redone_in_halves_to_the_same_adapter(planted, monkeypatch):  # noqa: F811
    import mechfix.engine.forward as fw
    import mechfix.stages.lora as lo

    lm, rec, att, neutral = planted
    reqs = _requests(lm, rec)
    targets = lora_targets(lm, [1, 1], [2, 0], scope="heads")
    short = LoraSettings(**{**FAST.__dict__, "steps": 4})
    want, log_want = train_lora(lm, targets, reqs["pressure"], reqs["clean"], neutral, short)
    sizes: list[int] = []

    def small_memory(real):  # training passes hold at most 2 sequences (the no-grad passes are not limited)
        def final_hidden(lm_, ids, mask):
            if torch.is_grad_enabled():
                sizes.append(len(ids))
                if len(ids) > 2:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return real(lm_, ids, mask)
        return final_hidden

    monkeypatch.setattr(fw, "final_hidden", small_memory(fw.final_hidden))
    monkeypatch.setattr(lo, "final_hidden", small_memory(lo.final_hidden))
    got, log_got = train_lora(lm, targets, reqs["pressure"], reqs["clean"], neutral, short)
    # 4 items, then 3, ran out of memory; every later pass, in every step, held at most 2.
    assert sizes[:2] == [4, 3] and max(sizes[2:]) == 2
    for a, b in zip(want.a + want.b, got.a + got.b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert [s["loss"] for s in log_got.steps] == pytest.approx([s["loss"] for s in log_want.steps], rel=1e-4)


def test_lora_fix_removes_the_planted_behaviour_and_its_strength_is_folded_into_b(lora_steering, planted):  # noqa: F811
    lm, rec, att, neutral = planted
    st = lora_steering
    # The planted head and the runner-up, each in its own layer's output projection.
    assert st.fix.kind == "lora" and st.fix.targets == ["L1.o_proj[H2]", "L2.o_proj[H0]"]
    chosen = st.sweep[st.chosen]
    # Chosen on the folds' held-out items: each fold's adapter never trained on them.
    assert chosen.within_budget and chosen.cv_reduction > 0.5 and chosen.reduction > 0.3
    assert chosen.steps in (12, 25) and st.training.chosen_steps == chosen.steps and len(st.training.fold_seconds) == 3
    assert st.fix.strength == 1.0 and st.folded == chosen.strength
    losses = [s["loss"] for s in st.training.steps]
    assert losses[-1] < losses[0]
    # The saved size reproduces the sweep's chosen point exactly.
    reqs = _requests(lm, rec)
    after = score_requests(lm, reqs, st.fix)
    effect = decision_scores(after["pressure"]) - decision_scores(after["clean"])
    assert effect.mean().item() == pytest.approx(chosen.effect["mean"], abs=1e-4)


def test_peft_loads_the_adapter_folder_unchanged_and_gives_the_same_logits(lora_folder, planted):  # noqa: F811
    from peft import PeftModel

    lm = planted[0]
    config = json.loads((lora_folder / ADAPTER_CONFIG).read_text())
    assert sorted(p.name for p in lora_folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["base_model_name_or_path"] is None  # a local model: no path in the config
    assert not any(isinstance(v, str) and v.startswith("/") for v in json.dumps(config).split('"'))

    fix = load_fix(lora_folder)
    ids = torch.tensor([lm.tokenizer("Ana: Q. Ben: Q. Sam says the answer is").input_ids])
    base = _logits(lm.model, ids)
    with apply_fix(lm, fix):
        ours = _logits(lm.model, ids)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(lora_folder))
    theirs = _logits(peft_model, ids)
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Merged into the weights, it is still the same model.
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), ours, rtol=1e-4, atol=1e-4)


def test_gpt2_adapter_round_trips_through_peft_with_conv1d_layout():
    from peft import PeftModel

    lm = tiny_model("gpt2")
    fix = gpt2_lora_fix(lm)
    lora, targets = fix.lora, lora_targets(lm, [1, 2], [0, 3])
    from mechfix.fixes.adapter import peft_config

    manifest = new_manifest("fix", model=lm.identity, fix={
        "kind": "lora", "op": "lora", "strength": 1.0,
        "modules": [{"module": t.module, "layer": t.layer, "heads": t.heads} for t in targets]},
        adapter_config=peft_config(lora, None, fan_in_fan_out=True),
        shape={"layers": lm.n_layers, "heads": lm.n_heads, "head_dim": lm.head_dim, "hidden": lm.hidden})
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "g.lora"
        save_fix(folder, Artifact(kind="fix", manifest=manifest, tensors=fix_tensors(fix)))
        loaded = load_fix(folder)
        ids = torch.tensor([lm.tokenizer("hello there, friends").input_ids])
        with apply_fix(lm, loaded):
            ours = _logits(lm.model, ids)
        theirs = _logits(PeftModel.from_pretrained(copy.deepcopy(lm.model), str(folder)), ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_hand_edited_lora_alpha_is_applied_as_peft_would(lora_folder, planted, tmp_path):  # noqa: F811
    import shutil

    copy_dir = tmp_path / "edited.lora"
    shutil.copytree(lora_folder, copy_dir)
    cfg = json.loads((copy_dir / ADAPTER_CONFIG).read_text())
    cfg["lora_alpha"] = 2 * cfg["r"]
    (copy_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    one, two = load_fix(lora_folder), load_fix(copy_dir)
    torch.testing.assert_close(two.lora.b[0], 2 * one.lora.b[0])
    assert two.n_parameters == one.n_parameters > 0


def test_broken_adapter_folders_are_refused_with_the_problem_named(lora_folder, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="not a LoRA fix"):
        load_fix(empty)
    no_cfg = tmp_path / "nocfg.lora"
    shutil.copytree(lora_folder, no_cfg)
    (no_cfg / ADAPTER_CONFIG).unlink()
    with pytest.raises(ArtifactError, match="no adapter_config.json"):
        load_fix(no_cfg)
    bad_cfg = tmp_path / "badcfg.lora"
    shutil.copytree(lora_folder, bad_cfg)
    (bad_cfg / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_fix(bad_cfg)
    (bad_cfg / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3", "r": 4}))
    with pytest.raises(ArtifactError, match="not a LoRA config"):
        load_fix(bad_cfg)
    cut = tmp_path / "cut.lora"
    shutil.copytree(lora_folder, cut)
    data = (cut / ADAPTER_WEIGHTS).read_bytes()
    (cut / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_fix(cut)


def test_a_lora_fix_for_another_model_is_refused(lora_folder):
    other = tiny_model("llama", seed=5)
    with pytest.raises(ArtifactError, match="was made with model"):
        with apply_fix(other, load_fix(lora_folder)):
            pass


def test_resaving_replaces_an_adapter_folder_but_never_a_foreign_one(lora_folder, lora_steering, planted, tmp_path):  # noqa: F811
    lm, rec, att, neutral = planted
    art = fix_artifact(lora_steering, lm, att, rec, {"kind": "lora"})
    target = tmp_path / "again.lora"
    save_fix(target, art)
    first = (target / ADAPTER_WEIGHTS).read_bytes()
    save_fix(target, art)  # an earlier adapter folder is replaced
    assert sorted(p.name for p in target.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert len((target / ADAPTER_WEIGHTS).read_bytes()) == len(first)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="will not replace"):
        save_fix(foreign, art)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_parameter_counts_follow_what_each_fix_reads():
    v = torch.ones(2, 8)
    assert Fix("subtract", [1, 2], [], v, v, 1.0).n_parameters == 16
    assert Fix("project", [1, 2], [0, 1], v, v, 1.0).n_parameters == 32
    assert Fix("scale", [1, 2], [0, 1], v, v, 1.0).n_parameters == 0
    a = torch.zeros(2, 8)
    a[:, :4] = 1.0
    lora = LoraWeights(modules=["m"], a=[a], b=[torch.ones(6, 2)], heads=[[0]])
    assert Fix("lora", [1], [], torch.zeros(0), torch.zeros(0), 1.0, lora=lora).n_parameters == 2 * 4 + 12


def test_cli_defaults_of_the_lora_options_match_the_training_defaults():
    import inspect

    from mechfix.cli.run import run
    from mechfix.cli.steer import steer

    want = LoraSettings()
    names = {"rank": "rank", "steps": "steps", "lr": "lr", "kl_weight": "kl_weight", "lora_scope": "scope", "seed": "seed"}
    for command in (steer, run):
        params = inspect.signature(command).parameters
        for cli_name, field_name in names.items():
            assert params[cli_name].default == getattr(want, field_name), (command.__name__, cli_name)
