"""Export a vector fix as a llama.cpp control vector (GGUF).

llama.cpp adds tensor ``direction.N`` (F32, length hidden) to the output of
decoder layer N, at every position: the same hook site and positions as a
mechfix vector fix. A fix *subtracts* ``strength × v``, so the file holds
``-strength × v``. Layer 0 cannot be steered by llama.cpp (its loader starts at
``direction.1``); every layer from 1 to L-1 is written, zero where the fix does
nothing, as llama.cpp's own control-vector generator does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechfix.architectures import ARCHITECTURES
from mechfix.artifacts import atomic_target, check_writable
from mechfix.errors import BadInputError
from mechfix.fix import Fix

FORMATS = ("gguf",)


# Why each other kind has no control vector, and what to use instead.
_NOT_EXPORTED = {
    "heads": "which edits single attention heads (a control vector adds to a whole layer's output).",
    "lora": "which changes weights, not activations. Its folder already is a PEFT adapter: load it with "
    "peft.PeftModel.from_pretrained, or convert it with llama.cpp's convert_lora_to_gguf.py.",
}


def control_vector(fix: Fix) -> dict[int, np.ndarray]:
    """The per-layer vectors llama.cpp must add to reproduce the fix: ``{layer: -strength × v}``.

    Raises:
        BadInputError: For a gated fix, a heads fix, or a vector on layer 0.
    """
    if fix.gate is not None:
        raise BadInputError(
            f"'{fix.path}' is a gated fix: it edits only where its probe (on layer {fix.gate.layer}) fires, and a control "
            "vector, merged weights or an adapter would apply it at every position. No format can carry the gate, so "
            "nothing is exported. Apply it with the Python API (mechfix.apply_fix), or make an ungated fix with "
            "`mechfix steer ATTR --kind vector` to export one.")
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
