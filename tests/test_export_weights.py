"""Heads fixes as weights: a PEFT adapter and a merged checkpoint that reproduce the fix exactly, or a refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mechfix.errors import BadInputError
from mechfix.stages.export import check_export, lora_fix_artifact, write_hf, write_peft
from mechfix.fixes.fix import OPS, Fix, apply_fix, load_fix
from mechfix.fixes.gate import Gate
from mechfix.fixes.weights import as_lora, merged, weight_edit
from tiny import TINY_CONFIGS, gpt2_lora_fix, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
# Families whose attention output projection cannot hold a bias in a checkpoint (transformers builds it without one).
NO_BIAS = {"mistral", "qwen2", "phi3"}
# Two heads in one layer (so one module's rank adds up) and one in another.
LAYERS, HEADS = [2, 0, 2], [3, 1, 0]
# fp32: the adapter and the hooks sum the same numbers in another order.
TOL = dict(rtol=1e-5, atol=1e-5)


def _ids() -> torch.Tensor:
    return torch.randint(3, 250, (2, 14), generator=torch.Generator().manual_seed(7))


def _fix(lm, op: str, strength: float = 0.8) -> Fix:
    g = torch.Generator().manual_seed(3)
    n = len(LAYERS)
    return Fix(op=op, layers=list(LAYERS), heads=list(HEADS), vectors=torch.randn(n, lm.head_dim, generator=g),
               means=torch.randn(n, lm.head_dim, generator=g), strength=strength, model=lm.identity)


def _setup(arch: str, op: str):
    """A tiny model, a heads fix on it, token ids, and the logits with and without the fix."""
    lm = tiny_model(arch)
    fix, ids = _fix(lm, op), _ids()
    return lm, fix, ids, _logits(lm, ids, fix), _logits(lm, ids)


def _logits(lm, ids, fix: Fix | None = None) -> torch.Tensor:
    with torch.no_grad():
        if fix is None:
            return lm.model(input_ids=ids).logits
        with apply_fix(lm, fix):
            return lm.model(input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_operation_with_an_affine_form_computes_exactly_that_form(name):
    op = OPS[name]
    g = torch.Generator().manual_seed(0)
    x, v, mu = torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)
    if op.affine is None:
        # No weights compute it; the refusal needs its reason (the LoRA op is weights already).
        assert op.kind == "lora" or op.not_weights
        return
    p, q, c = op.affine(v, mu, 1.3)
    torch.testing.assert_close(x + (x @ q.T) @ p + c, op.apply(x, v, mu, 1.3), rtol=1e-5, atol=1e-5)
    assert op.constant == bool(c.abs().max() > 0)
    assert op.portable == (not op.constant)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("op", ["ablate", "scale"])
def test_a_linear_heads_fix_exported_as_a_peft_adapter_gives_the_fixed_logits_in_peft_merged_and_in_mechfix(arch, op, tmp_path):
    lm, fix, ids, want, base = _setup(arch, op)
    assert (want - base).abs().max() > 1e-2  # the fix does something
    folder = tmp_path / "adapter"
    art = write_peft(lm, fix, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    # Rank: what the operation needs in the busiest module (two heads in layer 2), no more.
    need = 2 * (1 if op == "ablate" else lm.head_dim)
    assert cfg["r"] == need == art.manifest["fix"]["rank"] and cfg["lora_alpha"] == cfg["r"]
    assert cfg["target_modules"] == [f"{lm.spec.layers}.{n}.{lm.spec.attn_out}" for n in (0, 2)]
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    # mechfix reads it back as a LoRA fix, applies it as the original fix.
    again = load_fix(folder)
    assert again.kind == "lora" and again.manifest["fix"]["exported_from"]["op"] == op
    torch.testing.assert_close(_logits(lm, ids, again), want, **TOL)
    # PEFT reads it unchanged, and merging it into the weights changes nothing.
    peft_model = PeftModel.from_pretrained(lm.model, str(folder))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, **TOL)
        merged_model = peft_model.merge_and_unload()
        torch.testing.assert_close(merged_model(input_ids=ids).logits, want, **TOL)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("op", ["ablate", "steer"])
def test_a_heads_fix_merged_into_a_checkpoint_reloads_with_the_fixed_logits_or_is_refused_where_no_bias_fits(arch, op, tmp_path):
    lm, fix, ids, want, base = _setup(arch, op)
    out = tmp_path / "fixed"
    if op == "steer" and arch in NO_BIAS:
        with pytest.raises(BadInputError, match="without a bias"):
            write_hf(lm, fix, out)
        assert not out.exists()
        return
    record = write_hf(lm, fix, out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, **TOL)
    # The loaded model is left as it was.
    torch.testing.assert_close(_logits(lm, ids), base, rtol=0, atol=0)
    assert [m["bias"] for m in record["merged"]] == [op == "steer"] * 2
    switched = op == "steer" and not getattr(lm.model.config, "attention_bias", False) and arch != "gpt2"
    assert record["config_changed"] == ({"attention_bias": True} if switched else {})
    assert json.loads((out / "mechfix_export.json").read_text())["exported_from"]["op"] == op


def test_a_lora_fix_merges_into_a_checkpoint_and_is_written_again_as_the_same_adapter(tmp_path):
    lm = tiny_model("gpt2")
    fix = gpt2_lora_fix(lm, seed=1, scale=0.3, strength=0.5)
    ids = _ids()
    want = _logits(lm, ids, fix)
    write_hf(lm, fix, tmp_path / "merged")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, **TOL)
    write_peft(lm, fix, tmp_path / "adapter")
    torch.testing.assert_close(_logits(lm, ids, load_fix(tmp_path / "adapter")), want, **TOL)


def test_scaling_more_heads_than_the_output_is_wide_needs_no_more_rank_than_the_output(tmp_path):
    lm = tiny_model("gemma3_text")  # 4 heads of 32 into a residual stream of 64
    fix = Fix(op="scale", layers=[1] * 4, heads=[0, 1, 2, 3], vectors=torch.randn(4, lm.head_dim),
              means=torch.zeros(4, lm.head_dim), strength=0.6, model=lm.identity)
    ids = _ids()
    want = _logits(lm, ids, fix)
    write_peft(lm, fix, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == lm.hidden == 64  # not 4 × 32
    torch.testing.assert_close(_logits(lm, ids, load_fix(tmp_path / "adapter")), want, **TOL)


def test_exports_that_would_approximate_are_refused_with_what_to_use_instead(tmp_path):
    lm = tiny_model("llama")
    project, steer_fix = _fix(lm, "project"), _fix(lm, "steer")
    vector = Fix(op="subtract", layers=[1], heads=[], vectors=torch.randn(1, lm.hidden), means=torch.zeros(1, lm.hidden),
                 strength=1.0, model=lm.identity)
    cases = [
        (project, "peft", "rectified"), (project, "hf", "rectified"),
        (vector, "peft", "gguf"), (vector, "hf", "residual stream"),
        (steer_fix, "peft", "--format hf"),
        (_fix(lm, "ablate"), "gguf", "only vector fixes"),
    ]
    for fix, fmt, words in cases:
        with pytest.raises(BadInputError, match=words):
            check_export(fix, fmt)
            if fmt == "gguf":
                from mechfix.stages.export import control_vector

                control_vector(fix)
    gated = _fix(lm, "ablate")
    gated.gate = Gate(0, torch.randn(lm.hidden), 0.0, 0.0, {})
    for fmt in ("peft", "hf", "gguf"):
        with pytest.raises(BadInputError, match="gated fix"):
            check_export(gated, fmt)
    with pytest.raises(BadInputError, match="rectified"):
        write_peft(lm, project, tmp_path / "a")
    with pytest.raises(BadInputError, match="adapter has no bias"):
        write_peft(lm, steer_fix, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # An exact LoRA adapter of a constant term does not exist: as_lora refuses rather than drop it.
    with pytest.raises(BadInputError, match="constant"):
        as_lora(weight_edit(lm, steer_fix))


def test_an_exported_adapter_folder_holds_no_absolute_paths(tmp_path):
    lm = tiny_model("qwen3")
    fix = _fix(lm, "ablate")
    src = Path(tmp_path).resolve()
    # A fix whose manifest names its inputs by absolute paths, as the CLI writes them for absolute arguments.
    fix.manifest = {"kind": "fix", "model": {**lm.identity, "source": str(src / "model")},
                    "inputs": {"attribution": {"path": str(src / "x.attr.safetensors"), "sha256": "0" * 64}},
                    "fix": {"kind": "heads", "op": "ablate"}}
    fix.path = str(src / "x.fix.safetensors")
    write_peft(lm, fix, tmp_path / "adapter")
    strings: list[str] = []

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                strings.append(str(k))
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            strings.append(v)

    walk(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    for value in meta.values():
        walk(json.loads(value) if value.startswith(("{", "[")) else value)
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [s for s in strings if os.path.isabs(s) or str(src) in s]
    assert "x.attr.safetensors" in strings  # names kept, folders dropped


def test_merging_restores_the_model_exactly_even_when_the_block_raises():
    lm = tiny_model("llama")
    ids = _ids()
    base = _logits(lm, ids)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RuntimeError), merged(lm, weight_edit(lm, _fix(lm, "restore"))):
        assert lm.model.config.attention_bias is True
        raise RuntimeError("stop")
    assert lm.model.config.attention_bias is False
    assert lm.model.state_dict().keys() == before.keys()
    torch.testing.assert_close(_logits(lm, ids), base, rtol=0, atol=0)


def test_the_adapter_artifact_describes_the_export_and_where_it_came_from():
    lm = tiny_model("gemma3_text")
    fix = _fix(lm, "ablate", strength=1.5)
    art = lora_fix_artifact(lm, fix)
    block = art.manifest["fix"]
    assert block["kind"] == "lora" and block["strength"] == 1.0 and block["folded_strength"] == 1.5
    assert block["exported_from"]["targets"] == ["L2.H3", "L0.H1", "L2.H0"]
    assert [m["heads"] for m in block["modules"]] == [[1], [0, 3]]
