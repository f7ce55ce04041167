"""Export a fix to where models are served, exactly or not at all.

- ``gguf``: a vector fix as a llama.cpp control vector (below).
- ``peft``: a heads fix of an operation without a constant term (``ablate``,
  ``scale``) as a PEFT LoRA adapter folder on the attention output projections
  of its layers (:mod:`mechfix.fixes.weights`), which is also a mechfix LoRA fix; a
  LoRA fix is written again as one.
- ``hf``: a heads fix of an affine operation, or a LoRA fix, merged into the
  weights of a complete transformers checkpoint.

Every other combination is refused (:func:`check_export`) with what would be
lost and what to use instead: never a silent approximation.

llama.cpp adds tensor ``direction.N`` (F32, length hidden) to the output of
decoder layer N, at every position: the same hook site and positions as a
mechfix vector fix. A fix *subtracts* ``strength × v``, so the file holds
``-strength × v``. Layer 0 cannot be steered by llama.cpp (its loader starts at
``direction.1``); every layer from 1 to L-1 is written, zero where the fix does
nothing, as llama.cpp's own control-vector generator does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mechfix.architectures import ARCHITECTURES
from mechfix.artifacts import ADAPTER_WEIGHTS, Artifact, HF_MARKER, atomic_dir, check_writable, check_writable_dir, new_manifest, sha256_file
from mechfix.textio import atomic_target
from mechfix.errors import BadInputError
from mechfix.fixes.adapter import adapter_tensors, hub_id, peft_config, save_adapter
from mechfix.fixes.fix import OPS, Fix, apply_fix
from mechfix.fixes.weights import as_lora, bias_switch, check_bias, merged, weight_edit
from mechfix.measure.evaluate import neutral_passages
from mechfix.stages.steer import HOOK_OF_SITE

FORMATS = ("gguf", "peft", "hf")


# Why each other kind has no control vector, and what to use instead.
_NOT_EXPORTED = {
    "heads": "which edits single attention heads (a control vector adds to a whole layer's output). A heads fix of "
    "ablate or scale exports exactly as an adapter (--format peft) or merged weights (--format hf).",
    "lora": "which changes weights, not activations. Its folder already is a PEFT adapter: load it with "
    "peft.PeftModel.from_pretrained, convert it with llama.cpp's convert_lora_to_gguf.py, or merge it "
    "(--format hf).",
}


def check_export(fix: Fix, fmt: str) -> None:
    """Refuse, before any work, an export that could not reproduce the fix exactly.

    Raises:
        BadInputError: Saying what would be lost and which format or operation to use instead.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    if fix.gate is not None:
        raise BadInputError(
            f"'{fix.path}' is a gated fix: it edits only where its probe (on layer {fix.gate.layer}) fires, and a control "
            "vector, merged weights or an adapter would apply it at every position. No format can carry the gate, so "
            "nothing is exported. Apply it with the Python API (mechfix.apply_fix), or make an ungated fix with "
            "`mechfix steer ATTR` (no --gate; with --portable for an adapter or merged weights) to export one.")
    if fmt == "gguf":
        return  # control_vector says what it refuses
    op = OPS[fix.op]
    if fix.kind == "lora":
        return
    what = f"this {fix.kind} fix ({fix.op} on {', '.join(fix.targets)})"
    if op.affine is None:
        instead = "--format gguf" if fix.kind == "vector" else "`mechfix steer ATTR --portable` (ablate or scale)"
        raise BadInputError(
            f"{what} cannot be written as weights: {op.not_weights}. An adapter or merged checkpoint would only "
            f"approximate it, so nothing is exported. Use {instead} for a fix that exports exactly, or apply this one "
            "with the Python API.")
    if fmt == "peft" and op.constant:
        raise BadInputError(
            f"{what} adds a constant to each edited head's output ({op.doc}), and a LoRA adapter has no bias to carry "
            "it, so an adapter would lose it. Export it as merged weights with --format hf (an output-projection "
            "bias, where the model family has one), or make a fix without a constant term with `mechfix steer ATTR "
            "--portable` (ablate or scale) for an adapter.")


def _no_abs_paths(value: Any) -> Any:
    """A manifest with every absolute path reduced to its file name (an exported folder must travel).

    A model ``source`` that is a local path becomes None (a file name would not
    load): verify then needs ``--model``, and the model's fingerprint still decides.
    """
    if isinstance(value, dict):
        return {k: (None if k == "source" and isinstance(v, str) and _is_abs(v) else _no_abs_paths(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_no_abs_paths(v) for v in value]
    if isinstance(value, str) and _is_abs(value):
        return Path(value).name
    return value


def _is_abs(value: str) -> bool:
    return os.path.isabs(value) or value.startswith("~") or (len(value) > 2 and value[1] == ":" and value[2] in "\\/")


def _provenance(fix: Fix) -> dict[str, Any]:
    """What an exported fix was made from."""
    return {"path": Path(fix.path).name if fix.path else None,
            "sha256": _sha256_of(fix),
            "kind": fix.kind, "op": fix.op, "targets": fix.targets, "strength": fix.strength}


def _sha256_of(fix: Fix) -> str | None:
    if not fix.path:
        return None
    p = Path(fix.path)
    p = p / ADAPTER_WEIGHTS if p.is_dir() else p
    return sha256_file(p) if p.is_file() else None


def lora_fix_artifact(lm, fix: Fix) -> Artifact:
    """A heads fix of an operation without a constant (or a LoRA fix) as a LoRA fix artifact that reproduces it exactly.

    The manifest keeps the source fix's (inputs, recipe, style, sweep, budget),
    with absolute paths reduced to file names; its ``fix`` block describes the
    adapter, and ``exported_from`` names the source fix (file, sha256,
    operation, targets, strength, now folded into B).

    Raises:
        BadInputError: For an operation an adapter cannot carry exactly.
    """
    check_export(fix, "peft")
    edit = weight_edit(lm, fix)
    lora = as_lora(edit)
    fan = any(t.fan_in_fan_out for t in edit.targets)
    base = {k: v for k, v in _no_abs_paths(fix.manifest).items() if k not in ("kind", "schema", "created", "libraries")}
    block = dict(base.get("fix", {}))
    block.update(
        kind="lora", op="lora", site="lora", positions="all", layers=[t.layer for t in edit.targets], heads=[],
        targets=[f"L{t.layer}.{t.module.rsplit('.', 1)[-1]}" + (f"[{','.join(f'H{h}' for h in t.heads)}]" if t.heads else "")
                 for t in edit.targets],
        strength=1.0, formula=OPS["lora"].doc, rank=lora.rank, folded_strength=fix.strength,
        hook=HOOK_OF_SITE["lora"],
        parameters=Fix(op="lora", layers=[t.layer for t in edit.targets], heads=[], vectors=fix.vectors[:0],
                       means=fix.means[:0], strength=1.0, lora=lora).n_parameters,
        modules=[{"module": t.module, "layer": t.layer, "heads": t.heads, "in_features": t.in_features,
                  "out_features": t.out_features} for t in edit.targets],
        exported_from=_provenance(fix),
    )
    block.pop("vectors", None)
    block.pop("means", None)
    block.pop("gate", None)
    base["fix"] = block
    base["model"] = base.get("model") or _no_abs_paths(dict(fix.model or lm.identity))
    base["shape"] = {"layers": lm.n_layers, "heads": lm.n_heads, "head_dim": lm.head_dim, "hidden": lm.hidden}
    base["adapter_config"] = peft_config(lora, hub_id((fix.model or {}).get("source")), fan)
    return Artifact(kind="fix", manifest=new_manifest("fix", **base), tensors=adapter_tensors(lora))


def write_peft(lm, fix: Fix, path: str | Path) -> Artifact:
    """Write a fix as a PEFT LoRA adapter folder (a mechfix LoRA fix), atomically.

    Returns:
        The artifact written (its ``path`` and ``sha256`` set).

    Raises:
        BadInputError: For a fix an adapter cannot carry exactly, or an unusable ``path``.
    """
    check_writable_dir(path)
    art = lora_fix_artifact(lm, fix)
    save_adapter(path, art, art.manifest["adapter_config"])
    return art


def check_exported(lm, fix: Fix, exported: Fix | None, tokens: int = 64) -> dict[str, Any]:
    """How closely an export reproduces the fix, on the first ``tokens`` tokens of a neutral passage.

    Args:
        lm: The model (unfixed).
        fix: The fix, applied by mechfix.
        exported: The exported LoRA fix (``peft``, read back from its folder),
            or None for the merged weights (``hf``: the same tensors it saved).
        tokens: Probe length.

    Returns:
        ``check_tokens``, ``fix_effect`` (largest change of a logit the fix
        makes) and ``max_abs_diff`` (largest logit difference between fix and export).
    """
    import torch

    ids = torch.tensor([lm.tokenizer(neutral_passages()[0]).input_ids[:tokens]], device=lm.device)
    with torch.inference_mode():
        base = lm.model(ids).logits.float()
        with apply_fix(lm, fix, check_model=False):
            want = lm.model(ids).logits.float()
        if exported is not None:
            with apply_fix(lm, exported, check_model=False):
                got = lm.model(ids).logits.float()
        else:
            with merged(lm, weight_edit(lm, fix)):
                got = lm.model(ids).logits.float()
    return {"check_tokens": int(ids.shape[1]), "fix_effect": float((want - base).abs().max()),
            "max_abs_diff": float((got - want).abs().max())}


def write_hf(lm, fix: Fix, path: str | Path) -> dict[str, Any]:
    """Write a complete transformers checkpoint with the fix merged into its weights, atomically.

    The folder holds what ``save_pretrained`` writes for the model and its
    tokenizer, and ``mechfix_export.json`` (what was merged, from which fix).
    The loaded model is left as it was.

    Returns:
        The provenance record written to ``mechfix_export.json``.

    Raises:
        BadInputError: For a fix no weights reproduce, a constant term the family cannot hold, or an unusable ``path``.
    """
    check_export(fix, "hf")
    path = check_writable_dir(path, "hf")
    edit = weight_edit(lm, fix)
    check_bias(lm, edit, f"this {fix.kind} fix ({fix.op})")
    record = {
        "exported_from": _provenance(fix),
        "model": _no_abs_paths(dict(fix.model or lm.identity)),
        "merged": [{"module": t.module, "rank": int(a.shape[0]), "bias": c is not None}
                   for t, a, c in zip(edit.targets, edit.a, edit.bias)],
        "config_changed": {key: True for key in [bias_switch(lm, edit)] if key is not None},
    }
    with atomic_dir(path) as tmp, merged(lm, edit):
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        # What was saved, so that a later export may replace this folder and nothing a user put beside it.
        record["files"] = sorted(p.name for p in tmp.iterdir())
        (tmp / HF_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def control_vector(fix: Fix) -> dict[int, np.ndarray]:
    """The per-layer vectors llama.cpp must add to reproduce the fix: ``{layer: -strength × v}``.

    Raises:
        BadInputError: For a gated fix, a heads fix, or a vector on layer 0.
    """
    check_export(fix, "gguf")
    if fix.kind != "vector":
        raise BadInputError(
            f"only vector fixes export to a llama.cpp control vector; this is a {fix.kind} fix ({fix.op} on "
            f"{', '.join(fix.targets)}), {_NOT_EXPORTED.get(fix.kind, '')} Make a vector fix with "
            "`mechfix steer ATTR --kind vector`, or apply this fix with the Python API."
        )
    if 0 in fix.layers:
        raise BadInputError(
            "this fix acts on decoder layer 0, which llama.cpp control vectors cannot reach (they start at "
            "direction.1). Make the fix on a later layer with `mechfix steer ATTR --kind vector --layers N`."
        )
    out: dict[int, np.ndarray] = {}
    for layer, v in zip(fix.layers, fix.vectors):
        add = (-fix.strength * v.double()).float().numpy()
        out[layer] = out.get(layer, 0) + add
    return out


def write_gguf(fix: Fix, path: str | Path) -> Path:
    """Write a vector fix as a llama.cpp control vector, atomically.

    Args:
        fix: A vector fix loaded from its artifact (its manifest gives the layer count and family).
        path: The ``.gguf`` file to write.

    Raises:
        BadInputError: For a heads fix, layer 0, or a fix without model shape information.
    """
    import gguf

    path = check_writable(path)
    vectors = control_vector(fix)
    n_layers = fix.manifest.get("shape", {}).get("layers")
    if not n_layers:
        raise BadInputError(f"'{fix.path}' does not record the model's layer count; make the fix again with `mechfix steer`.")
    spec = ARCHITECTURES.get(fix.model.get("architecture", ""))
    hint = (spec.gguf_arch if spec and spec.gguf_arch else None) or str(fix.model.get("architecture"))
    width = next(iter(vectors.values())).shape[0]
    with atomic_target(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="controlvector")
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", int(n_layers) - 1)
        for layer in range(1, int(n_layers)):
            writer.add_tensor(f"direction.{layer}", vectors.get(layer, np.zeros(width, dtype=np.float32)).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
