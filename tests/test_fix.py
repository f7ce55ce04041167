"""Fixes on tiny models: the apply API, the operations, the artifact, and the llama.cpp export."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_model

from mechfix.artifacts import Artifact, load_artifact, new_manifest, save_artifact
from mechfix.errors import ArtifactError, BadInputError
from mechfix.stages.export import write_gguf
from mechfix.fixes.fix import OPS, Fix, apply_fix, fix_from_artifact, fix_tensors, load_fix


def _ids(lm, text: str = "Ana: Lyon. Ben: Lyon. Sam:") -> torch.Tensor:
    return lm.tokenizer(text, return_tensors="pt").input_ids


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def _vector_fix(lm, layers=(1,), strength=0.7, seed=0) -> Fix:
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(len(layers), lm.hidden, generator=g)
    return Fix(op="subtract", layers=list(layers), heads=[], vectors=vecs, means=torch.zeros_like(vecs),
               strength=strength, model=lm.identity)


def _save_fix(tmp_path, lm, fix: Fix, name: str = "f.fix.safetensors") -> str:
    manifest = new_manifest(
        "fix",
        model=lm.identity,
        shape={"layers": lm.n_layers, "heads": lm.n_heads, "head_dim": lm.head_dim, "hidden": lm.hidden},
        fix={"kind": fix.kind, "op": fix.op, "strength": fix.strength, "layers": fix.layers, "heads": fix.heads},
    )
    path = tmp_path / name
    save_artifact(path, Artifact(kind="fix", manifest=manifest, tensors=fix_tensors(fix)))
    return str(path)


def test_applying_a_vector_fix_equals_adding_the_vector_with_a_plain_forward_hook():
    lm = tiny_model("llama")
    fix = _vector_fix(lm, layers=(1,), strength=0.7)
    ids = _ids(lm)
    base = _logits(lm, ids)
    with apply_fix(lm, fix):
        fixed = _logits(lm, ids)

    add = -0.7 * fix.vectors[0]

    def plain(module, args, out):
        return (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add

    handle = lm.layers[1].register_forward_hook(plain)
    try:
        reference = _logits(lm, ids)
    finally:
        handle.remove()
    assert not torch.allclose(fixed, base, atol=1e-4)  # the fix does something
    torch.testing.assert_close(fixed, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(lm, ids), base)  # and its hooks are gone afterwards


def test_scaling_a_head_by_strength_one_equals_zeroing_its_output_projection_columns():
    lm = tiny_model("llama")
    layer, head, dh = 2, 1, lm.head_dim
    fix = Fix(op="scale", layers=[layer], heads=[head], vectors=torch.zeros(1, dh), means=torch.zeros(1, dh), strength=1.0)
    ids = _ids(lm)
    with apply_fix(lm, fix):
        fixed = _logits(lm, ids)
    w = lm.attn_out(layer).weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, head * dh : (head + 1) * dh] = 0
    try:
        reference = _logits(lm, ids)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(fixed, reference, rtol=0, atol=1e-5)


def test_project_removes_only_the_lean_beyond_the_baseline_mean():
    v = torch.tensor([2.0, 0.0, 0.0])
    mu = torch.tensor([1.0, 5.0, 0.0])
    x = torch.tensor([[4.0, 1.0, 1.0], [0.5, 1.0, 1.0]])  # leans +3 along v; leans -0.5 (towards the baseline side)
    out = OPS["project"].apply(x, v, mu, 1.0)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.0, 1.0]))  # pulled back to the baseline mean along v
    torch.testing.assert_close(out[1], x[1])  # untouched
    half = OPS["project"].apply(x, v, mu, 0.5)
    torch.testing.assert_close(half[0], torch.tensor([2.5, 1.0, 1.0]))


def test_ablate_removes_the_component_along_the_direction_on_both_sides_and_ignores_the_mean():
    v, mu = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    x = torch.tensor([[4.0, 1.0, 1.0], [-0.5, 2.0, 1.0]])
    out = OPS["ablate"].apply(x, v, mu, 1.0)
    # Unlike project, the negative lean goes too, and the mean plays no part: it is linear in x.
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 1.0], [0.0, 2.0, 1.0]]))
    torch.testing.assert_close(OPS["ablate"].apply(2 * x, v, mu, 0.5), 2 * OPS["ablate"].apply(x, v, mu, 0.5))


@pytest.mark.parametrize("op", [name for name, o in OPS.items() if o.kind == "heads"])
def test_every_heads_operation_is_the_unchanged_model_at_strength_zero_and_changes_it_otherwise(op):
    lm = tiny_model("gemma3_text")
    g = torch.Generator().manual_seed(1)
    v, mu = torch.randn(2, lm.head_dim, generator=g) * 3, torch.randn(2, lm.head_dim, generator=g)
    fix = Fix(op=op, layers=[0, 2], heads=[1, 3], vectors=v, means=mu, strength=0.0)
    ids = _ids(lm)
    base = _logits(lm, ids)
    with apply_fix(lm, fix):
        torch.testing.assert_close(_logits(lm, ids), base)
    with apply_fix(lm, fix, strength=1.0):
        assert not torch.allclose(_logits(lm, ids), base, atol=1e-5)


def test_a_fix_refuses_another_model():
    lm, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    fix = _vector_fix(lm)
    with pytest.raises(ArtifactError, match="their weights fingerprints differ"):
        with apply_fix(other, fix):
            pass


def test_a_fix_artifact_round_trips(tmp_path):
    lm = tiny_model("llama")
    fix = Fix(op="project", layers=[1, 2], heads=[3, 0], vectors=torch.randn(2, lm.head_dim),
              means=torch.randn(2, lm.head_dim), strength=1.25, model=lm.identity)
    loaded = load_fix(_save_fix(tmp_path, lm, fix))
    assert (loaded.op, loaded.layers, loaded.heads, loaded.strength) == ("project", [1, 2], [3, 0], 1.25)
    assert loaded.targets == ["L1.H3", "L2.H0"]
    torch.testing.assert_close(loaded.vectors, fix.vectors)
    torch.testing.assert_close(loaded.means, fix.means)
    ids = _ids(lm)
    with apply_fix(lm, fix):
        a = _logits(lm, ids)
    with apply_fix(lm, loaded):
        b = _logits(lm, ids)
    torch.testing.assert_close(a, b)


def test_a_fix_artifact_with_a_broken_description_is_refused(tmp_path):
    lm = tiny_model("llama")
    path = _save_fix(tmp_path, lm, _vector_fix(lm))
    art = load_artifact(path)
    art.manifest["fix"]["op"] = "teleport"
    with pytest.raises(ArtifactError, match="without a usable fix description"):
        fix_from_artifact(art)


def test_exported_control_vector_reads_back_with_gguf(tmp_path):
    lm = tiny_model("gemma3_text")
    fix = _vector_fix(lm, layers=(1,), strength=0.5)
    loaded = load_fix(_save_fix(tmp_path, lm, fix))
    out = write_gguf(loaded, tmp_path / "cv.gguf")

    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "gemma3"
    assert reader.get_field("controlvector.layer_count").contents() == lm.n_layers - 1
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == [f"direction.{i}" for i in range(1, lm.n_layers)]
    for t in tensors.values():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [lm.hidden]
    # llama.cpp adds direction.N to decoder layer N's output; the fix subtracts strength * v.
    np.testing.assert_allclose(np.asarray(tensors["direction.1"].data), (-0.5 * fix.vectors[0]).numpy(), rtol=1e-6)
    assert not np.asarray(tensors["direction.2"].data).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.gguf", "f.fix.safetensors"]  # no temporary left


def test_export_refuses_a_heads_fix_and_layer_zero(tmp_path):
    lm = tiny_model("llama")
    heads = Fix(op="scale", layers=[1], heads=[0], vectors=torch.zeros(1, lm.head_dim),
                means=torch.zeros(1, lm.head_dim), strength=1.0, model=lm.identity)
    with pytest.raises(BadInputError, match="only vector fixes export"):
        write_gguf(load_fix(_save_fix(tmp_path, lm, heads, "h.fix.safetensors")), tmp_path / "h.gguf")
    zero = load_fix(_save_fix(tmp_path, lm, _vector_fix(lm, layers=(0,)), "z.fix.safetensors"))
    with pytest.raises(BadInputError, match="layer 0"):
        write_gguf(zero, tmp_path / "z.gguf")
    assert not (tmp_path / "h.gguf").exists() and not (tmp_path / "z.gguf").exists()
