"""A fix: what steer emits, and the Python API that applies it to a loaded model.

A fix is a small edit of the forward pass, applied at every position (so it
works the same while scoring a decision, generating a reply, or in llama.cpp),
or, for a gated fix, at every position where its probe fires:

- ``vector``: subtract ``strength × direction`` from the output of chosen
  decoder layers (the residual stream). The direction is the
  difference of means between the pressure and clean runs at the decision position.
- ``heads``: edit the output of chosen attention heads (the input of their
  layer's output projection), by one of the operations in :data:`OPS`.
- ``lora``: a trained low-rank update ``W x + B A x`` of chosen linear modules
  (the attention output projections of the layers holding the top heads),
  saved as a PEFT adapter folder; see :mod:`mechfix.stages.lora` and :mod:`mechfix.fixes.adapter`.

A vector or heads fix may carry a *gate* (:mod:`mechfix.fixes.gate`): a linear probe
of one layer's residual stream; the edit then applies only at the positions
(of each row) where the probe fires, and everywhere else the model is unchanged.

Use it from Python::

    from mechfix import load_fix, apply_fix
    fix = load_fix("conformity.fix.safetensors")
    with apply_fix(lm, fix):          # lm: a mechfix LoadedModel
        lm.model.generate(...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechfix.architectures import get_path
from mechfix.fixes.adapter import LoraWeights, adapter_tensors, lora_from_artifact, save_adapter
from mechfix.artifacts import Artifact, check_same_model, load_artifact, save_artifact
from mechfix.engine.edits import add_hook
from mechfix.errors import ArtifactError
from mechfix.fixes.gate import Gate, GateMask, gated, stacked_params
from mechfix.models import LoadedModel


@dataclass(frozen=True)
class Op:
    """One way to edit activations: ``apply(x, v, mu, strength)``.

    ``x`` is ``[..., n]``; ``v`` is the direction mean(pressure) − mean(baseline)
    and ``mu`` the mean baseline activation, both ``[n]`` (or one per head,
    broadcasting over ``x``). At the ``lora`` site ``x`` is a module's input,
    ``v`` and ``mu`` are the adapter's A ``[r, in]`` and B ``[out, r]``, and
    the result is added to the module's output.

    Attributes:
        kind: The fix kind it belongs to (``vector``, ``heads`` or ``lora``).
        site: Where it acts (``resid``: decoder layer output; ``heads``: per-head
            attention output; ``lora``: a linear module's output).
        apply: The edit.
        doc: One line for help texts and manifests.
        uses: Which stored tensors the edit reads (``vectors``, ``means``), for
            counting the numbers a fix adds to the model.
        affine: For a heads operation that is an affine map of one head's output,
            ``affine(v, mu, s) -> (P [k, head_dim], Q [k, head_dim], c [head_dim])``
            with ``apply(x) = x + (x Q^T) P + c``: then the edit is exactly a change
            of the layer's output projection (rank ``k`` per head, and a bias
            ``W c``), see :mod:`mechfix.fixes.weights`. None: no weights compute it.
        constant: The affine map has a constant term ``c`` (it needs an output
            projection bias; a LoRA adapter cannot carry it).
        not_weights: Why no weights compute it (for refusals), where ``affine`` is None.
    """

    kind: str
    site: str
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    doc: str
    uses: tuple[str, ...] = ("vectors",)
    affine: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    constant: bool = False
    not_weights: str = ""

    @property
    def portable(self) -> bool:
        """Whether a fix of this operation exports exactly as weights everywhere: a PEFT adapter and a merged checkpoint."""
        return self.kind == "lora" or (self.affine is not None and not self.constant)

    @property
    def not_portable(self) -> str:
        """Why it does not export as an adapter ("" when it does)."""
        if self.portable:
            return ""
        return self.not_weights or "a constant term, which a LoRA adapter has no bias to carry"


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _project(x: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    # Only the part beyond the baseline mean, on the pressure side, is removed:
    # activations that do not lean towards the pressure are left as they are.
    u = _unit(v)
    lean = ((x - mu) * u).sum(-1, keepdim=True)
    return x - s * torch.relu(lean) * u


def _ablate(x: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    # Directional ablation: linear in x (no mean, no rectification), so it is a rank-1 weight edit.
    u = _unit(v)
    return x - s * (x * u).sum(-1, keepdim=True) * u


# The affine form of each linear heads operation: x' = x + (x Q^T) P + c (see Op.affine).
def _no_rank(v: torch.Tensor) -> torch.Tensor:
    return v.new_zeros(0, v.shape[-1])


def _eye(v: torch.Tensor) -> torch.Tensor:
    return torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)


_AFFINE = {
    "ablate": lambda v, mu, s: (-s * _unit(v)[None], _unit(v)[None], torch.zeros_like(v)),
    "steer": lambda v, mu, s: (_no_rank(v), _no_rank(v), -s * v),
    "restore": lambda v, mu, s: (-s * _eye(v), _eye(v), s * mu),
    "scale": lambda v, mu, s: (-s * _eye(v), _eye(v), torch.zeros_like(v)),
}
_RECTIFIED = ("rectified: it removes only a positive lean beyond the mean, a branch that no weight matrix computes. "
              "--op ablate is its linear counterpart")
_RESIDUAL = ("it adds to a decoder layer's output (the residual stream), which no weight of the model adds to; "
             "it exports exactly as a llama.cpp control vector (--format gguf)")

# The operations, as data. Strength 0 is always the unchanged model.
OPS: dict[str, Op] = {
    "subtract": Op(
        "vector",
        "resid",
        lambda x, v, mu, s: x - s * v,
        "layer output - strength * (mean pressure - mean baseline output)",
        not_weights=_RESIDUAL,
    ),
    "project": Op(
        "heads",
        "heads",
        _project,
        "head output minus strength * its lean beyond the mean baseline output along (mean pressure - mean baseline)",
        ("vectors", "means"),
        not_weights=_RECTIFIED,
    ),
    "ablate": Op(
        "heads",
        "heads",
        _ablate,
        "head output minus strength * its component along (mean pressure - mean baseline): linear, a rank-1 weight edit",
        affine=_AFFINE["ablate"],
    ),
    "steer": Op(
        "heads",
        "heads",
        lambda x, v, mu, s: x - s * v,
        "head output - strength * (mean pressure - mean baseline output), as in Inference-Time Intervention",
        affine=_AFFINE["steer"],
        constant=True,
    ),
    "restore": Op(
        "heads",
        "heads",
        lambda x, v, mu, s: x + s * (mu - x),
        "head output moved a share `strength` of the way to its mean baseline output",
        ("means",),
        affine=_AFFINE["restore"],
        constant=True,
    ),
    "scale": Op(
        "heads",
        "heads",
        lambda x, v, mu, s: x * (1.0 - s),
        "head output * (1 - strength); strength 1 switches the head off",
        (),
        affine=_AFFINE["scale"],
    ),
    "lora": Op(
        "lora",
        "lora",
        lambda x, a, b, s: s * ((x @ a.T) @ b.T),
        "module output + strength * B A x (a LoRA update; the saved adapter has the strength folded into B)",
        ("lora",),
    ),
}
FIX_KINDS = ("vector", "heads", "lora")
DEFAULT_OP = {"vector": "subtract", "heads": "project", "lora": "lora"}


@dataclass
class Fix:
    """A fix in memory.

    Attributes:
        op: Name of the operation (a key of :data:`OPS`).
        layers: Decoder layer of each vector (vector fixes), head (heads fixes)
            or adapted module (lora fixes).
        heads: Head index of each vector (heads fixes), else empty.
        vectors: Directions, mean(pressure) − mean(baseline) at the decision position:
            ``[n, d]`` for vector fixes, ``[n, head_dim]`` for heads fixes; empty for lora fixes.
        means: Mean baseline activations, same shape as ``vectors``.
        strength: The multiplier chosen by steer (1 for a saved lora fix: its
            strength is folded into the adapter).
        model: Identity of the model it was made for.
        manifest: The artifact manifest (empty for a fix built in memory).
        path: Where it was loaded from, if anywhere.
        sha256: Of the file it was loaded from (a lora fix: its weights file), if any.
        lora: A lora fix's adapter weights.
        gate: A probe that limits the edit to the positions where it fires (None: every position).
    """

    op: str
    layers: list[int]
    heads: list[int]
    vectors: torch.Tensor
    means: torch.Tensor
    strength: float
    model: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    lora: LoraWeights | None = None
    gate: Gate | None = None

    @property
    def kind(self) -> str:
        return OPS[self.op].kind

    @property
    def site(self) -> str:
        return OPS[self.op].site

    @property
    def targets(self) -> list[str]:
        """Human names of what it edits: ``L12`` (layer output), ``L12.H1`` (head),
        ``L12.o_proj[H1,H2]`` (adapted module, and the heads whose columns it reads)."""
        if self.kind == "vector":
            return [f"L{layer}" for layer in self.layers]
        if self.kind == "lora" and self.lora is not None:
            return [
                f"L{layer}.{module.rsplit('.', 1)[-1]}" + ("" if heads is None else "[" + ",".join(f"H{h}" for h in heads) + "]")
                for layer, module, heads in zip(self.layers, self.lora.modules, self.lora.heads)
            ]
        return [f"L{layer}.H{h}" for layer, h in zip(self.layers, self.heads)]

    @property
    def n_parameters(self) -> int:
        """How many numbers the fix adds to the model (trained or fitted), for comparing fixes.

        Vector and heads fixes: the directions and means their operation reads.
        LoRA fixes: the entries of B and the unmasked columns of A.
        """
        uses = OPS[self.op].uses
        # A gate's probe: its weights, bias and threshold.
        probe = self.gate.weight.numel() + 2 if self.gate is not None else 0
        if "lora" in uses:
            if self.lora is None:
                return probe
            return probe + sum(int((a != 0).any(0).sum()) * a.shape[0] + b.numel() for a, b in zip(self.lora.a, self.lora.b))
        return probe + (self.vectors.numel() if "vectors" in uses else 0) + (self.means.numel() if "means" in uses else 0)


# What an edit reads for the tensor it edits: (v, mu), cast to its device and dtype and shaped to broadcast over it.
Values = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _fixed_values(v: torch.Tensor, mu: torch.Tensor) -> Values:
    """One fix's direction and mean for every row, cast once per device and dtype."""
    cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in cast:
            cast[key] = (v.to(device=x.device, dtype=x.dtype), mu.to(device=x.device, dtype=x.dtype))
        return cast[key]

    return values


def _out_hook(op: Op, values: Values, strength: float):
    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        new = op.apply(h, *values(h), strength)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook


def _heads_pre_hook(op: Op, heads: list[int], values: Values, n_heads: int, head_dim: int, strength: float):
    index = torch.tensor(heads, dtype=torch.long)
    on_device: dict[torch.device, torch.Tensor] = {}

    def hook(module, args):
        x = args[0]
        if x.device not in on_device:
            on_device[x.device] = index.to(x.device)
        idx = on_device[x.device]
        view = x.reshape(*x.shape[:-1], n_heads, head_dim)
        edited = view.clone()
        edited[..., idx, :] = op.apply(view[..., idx, :], *values(x), strength)
        return (edited.reshape(x.shape), *args[1:])

    return hook


def _lora_hook(op: Op, a: torch.Tensor, b: torch.Tensor, strength: float):
    cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, out):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cast:
            cast[key] = (a.to(device=x.device, dtype=x.dtype), b.to(device=x.device, dtype=x.dtype))
        return out + op.apply(x, *cast[key], strength)

    return hook


# Each installer appends its hook handles to ``handles`` as it goes, so that a
# failure half-way still lets apply_fix remove what was put on.
# ``values`` gives what target j (resid) or targets js (heads) read; by default the fix's own vectors and means.
def _install_resid(lm: LoadedModel, fix: Fix | RowFixes, op: Op, s: float, handles: list,
                   values: Callable[[Any], Values] | None = None) -> None:
    values = values or (lambda j: _fixed_values(fix.vectors[j], fix.means[j]))
    for j, layer in enumerate(fix.layers):
        handles.append(add_hook(lm, lm.layers[layer], _out_hook(op, values(j), s)))


def _install_heads(lm: LoadedModel, fix: Fix | RowFixes, op: Op, s: float, handles: list,
                   values: Callable[[Any], Values] | None = None) -> None:
    values = values or (lambda js: _fixed_values(fix.vectors[js], fix.means[js]))
    by_layer: dict[int, list[int]] = {}
    for j, layer in enumerate(fix.layers):
        by_layer.setdefault(layer, []).append(j)
    for layer, js in by_layer.items():
        hook = _heads_pre_hook(op, [fix.heads[j] for j in js], values(js), lm.n_heads, lm.head_dim, s)
        handles.append(add_hook(lm, lm.attn_out(layer), hook, pre=True))


def _install_lora(lm: LoadedModel, fix: Fix, op: Op, s: float, handles: list) -> None:
    if fix.lora is None:
        raise ArtifactError(f"{fix.path or 'the fix'} is a lora fix without adapter weights.")
    for module, a, b in zip(fix.lora.modules, fix.lora.a, fix.lora.b):
        try:
            target = get_path(lm.model, module)
        except AttributeError:
            raise ArtifactError(
                f"{fix.path or 'the fix'} adapts module '{module}', which this model does not have. "
                "Use the model the fix was made for."
            ) from None
        w = getattr(target, "weight", None)
        # nn.Linear keeps its weight as [out, in]; GPT-2's Conv1D as [in, out].
        dims = None if w is None else (tuple(w.shape[::-1]) if type(target).__name__ == "Conv1D" else tuple(w.shape))
        if dims is not None and (dims[1] != a.shape[1] or dims[0] != b.shape[0]):
            raise ArtifactError(
                f"{fix.path or 'the fix'} adapts '{module}' as a {a.shape[1]} -> {b.shape[0]} map, but in this model it is "
                f"{dims[1]} -> {dims[0]}. Use the model the fix was made for."
            )
        handles.append(add_hook(lm, target, _lora_hook(op, a, b, s)))


# How each site's hooks are put on the model.
_INSTALL = {"resid": _install_resid, "heads": _install_heads, "lora": _install_lora}


def _install_gate(lm: LoadedModel, layer: int, params, op: Op, handles: list) -> Op:
    """Put a gate's probe on its layer (before the edit's hooks, so that it reads first) and gate the operation."""
    if not 0 <= layer < lm.n_layers:
        raise ArtifactError(f"the fix's gate reads layer {layer}, which this model does not have. Use the model the fix was made for.")
    mask = GateMask(params)
    handles.append(add_hook(lm, lm.layers[layer], mask.hook))
    return gated(op, mask)


@contextmanager
def apply_fix(lm: LoadedModel, fix: Fix, strength: float | None = None, *, check_model: bool = True) -> Iterator[Fix]:
    """Apply a fix to a loaded model inside a ``with`` block (hooks removed on exit).

    Args:
        lm: The model.
        fix: The fix (from :func:`load_fix` or steer).
        strength: Override the fix's strength (steer's sweep uses this).
        check_model: Refuse a fix made for another model (on by default).

    Raises:
        ArtifactError: When the fix was made for another model.
    """
    if check_model and fix.model:
        check_same_model({"model": fix.model}, lm.identity, fix.path or "the fix")
    s = float(fix.strength if strength is None else strength)
    op = OPS[fix.op]
    handles: list = []
    try:
        op = _install_gate(lm, fix.gate.layer, fix.gate.params, op, handles) if fix.gate is not None else op
        _INSTALL[op.site](lm, fix, op, s, handles)
        yield fix
    finally:
        for h in handles:
            h.remove()


class RowFixes:
    """Several fixes of one operation on the same targets, each applied to its own rows of a batch.

    Cross-validation scores each fold's held-out rows with the fix fitted on
    the other folds; with this, every fold's rows share one forward pass
    (:func:`apply_row_fixes`) instead of one small pass per fold. Each row is
    edited exactly as its own fix would edit it alone.

    Args:
        fixes: The fixes (vector or heads; same operation, layers and heads).

    Raises:
        ValueError: When the fixes differ in anything but their vectors and means, or one is a lora fix.
    """

    def __init__(self, fixes: Sequence[Fix]):
        first = fixes[0]
        if OPS[first.op].site == "lora" or any((f.op, f.layers, f.heads) != (first.op, first.layers, first.heads) for f in fixes):
            raise ValueError("row fixes need vector or heads fixes of one operation on the same targets")
        if len({None if f.gate is None else f.gate.layer for f in fixes}) > 1:
            raise ValueError("row fixes need the same gate layer, or no gate, for every fix")
        self.op, self.layers, self.heads = first.op, list(first.layers), list(first.heads)
        self.vectors = torch.stack([f.vectors for f in fixes])  # [fixes, targets, width]
        self.means = torch.stack([f.means for f in fixes])
        self.rows = torch.zeros(0, dtype=torch.long)  # which fix each row of the current batch takes
        self.gate_layer = first.gate.layer if first.gate is not None else None
        self._gates = stacked_params([f.gate for f in fixes]) if first.gate is not None else None

    def select(self, which: Sequence[int]) -> None:
        """Say which fix each row of the next batch takes (an index into ``fixes``, one per row)."""
        self.rows = torch.as_tensor(list(which), dtype=torch.long)

    def values(self, targets: int | list[int]) -> Values:
        """What the current rows read for a target (resid) or targets (heads), with a position axis after the rows."""
        def of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = self.vectors[self.rows][:, targets].unsqueeze(1)
            mu = self.means[self.rows][:, targets].unsqueeze(1)
            return v.to(device=x.device, dtype=x.dtype), mu.to(device=x.device, dtype=x.dtype)

        return of

    def gate_params(self, x: torch.Tensor):
        """What each current row's gate reads (its own fold's probe)."""
        return self._gates(self.rows)(x)


@contextmanager
def apply_row_fixes(lm: LoadedModel, fixes: RowFixes, strength: float) -> Iterator[RowFixes]:
    """Apply :class:`RowFixes` inside a ``with`` block: call ``fixes.select`` before each batch.

    The same hooks as :func:`apply_fix`, reading each row's own vectors and means.

    Args:
        lm: The model.
        fixes: The fixes, one per row as ``select`` says.
        strength: The strength every fix is applied at.
    """
    op = OPS[fixes.op]
    handles: list = []
    try:
        if fixes.gate_layer is not None:
            op = _install_gate(lm, fixes.gate_layer, fixes.gate_params, op, handles)
        _INSTALL[op.site](lm, fixes, op, strength, handles, fixes.values)
        yield fixes
    finally:
        for h in handles:
            h.remove()


def fix_tensors(fix: Fix) -> dict[str, torch.Tensor]:
    """The tensors a fix artifact stores (a lora fix: its adapter, under PEFT's key names)."""
    gate = {"gate/weight": fix.gate.weight.float().contiguous()} if fix.gate is not None else {}
    if fix.lora is not None:
        if fix.gate is not None:
            # PEFT would load the adapter and apply it at every position: a gate cannot travel in its folder.
            raise ValueError("a gated lora fix cannot be saved as a PEFT adapter")
        return adapter_tensors(fix.lora)
    return {
        "vectors": fix.vectors.float(),
        "means": fix.means.float(),
        "layers": torch.tensor(fix.layers, dtype=torch.int32),
        "heads": torch.tensor(fix.heads, dtype=torch.int32),
        **gate,
    }


def gate_from_artifact(art: Artifact) -> Gate | None:
    """The gate a fix artifact holds (its manifest's ``fix.gate`` and tensor ``gate/weight``), or None.

    Raises:
        ArtifactError: When the gate's description or weights are incomplete.
    """
    desc = art.manifest.get("fix", {}).get("gate")
    if desc is None:
        return None
    ok = isinstance(desc, dict) and all(isinstance(desc.get(k), (int, float)) for k in ("layer", "bias", "threshold"))
    if not ok or "gate/weight" not in art.tensors:
        raise ArtifactError(f"'{art.path}' is a gated fix without a usable gate (layer, bias, threshold and "
                            "'gate/weight' are needed). Make it again with `mechfix steer --gate probe`.")
    stats = {k: v for k, v in desc.items() if k not in ("layer", "bias", "threshold", "probe", "site", "reads")}
    return Gate(int(desc["layer"]), art.tensors["gate/weight"].float(), float(desc["bias"]), float(desc["threshold"]), stats)


def fix_from_artifact(art: Artifact) -> Fix:
    """Rebuild a :class:`Fix` from a loaded ``fix`` artifact.

    Raises:
        ArtifactError: When the artifact's fix description is incomplete or inconsistent.
    """
    desc = art.manifest.get("fix", {})
    op = desc.get("op")
    if op in OPS and OPS[op].kind == "lora":
        lora, layers = lora_from_artifact(art)
        return Fix(op=op, layers=layers, heads=[], vectors=torch.zeros(0), means=torch.zeros(0),
                   strength=float(desc.get("strength", 1.0)), model=art.manifest.get("model", {}),
                   manifest=art.manifest, path=art.path, sha256=art.sha256, lora=lora, gate=gate_from_artifact(art))
    if op not in OPS or "strength" not in desc or any(k not in art.tensors for k in ("vectors", "means", "layers")):
        raise ArtifactError(
            f"'{art.path}' is a fix artifact without a usable fix description (operation {op!r}). "
            "It may come from a newer mechfix; make it again with `mechfix steer`."
        )
    layers = [int(x) for x in art.tensors["layers"].tolist()]
    heads = [int(x) for x in art.tensors.get("heads", torch.zeros(0)).tolist()]
    vectors, means = art.tensors["vectors"], art.tensors["means"]
    if vectors.shape != means.shape or vectors.shape[0] != len(layers) or (OPS[op].kind == "heads" and len(heads) != len(layers)):
        raise ArtifactError(f"'{art.path}' is inconsistent: {vectors.shape[0]} vectors for {len(layers)} targets. Make it again with `mechfix steer`.")
    return Fix(
        op=op,
        layers=layers,
        heads=heads,
        vectors=vectors.float(),
        means=means.float(),
        strength=float(desc["strength"]),
        model=art.manifest.get("model", {}),
        manifest=art.manifest,
        path=art.path,
        sha256=art.sha256,
        gate=gate_from_artifact(art),
    )


def save_fix(path: str | Path, artifact: Artifact) -> str:
    """Write a fix artifact: a ``.safetensors`` file, or for a lora fix a PEFT adapter folder.

    Returns:
        The sha256 of the (weights) file.
    """
    if artifact.manifest.get("fix", {}).get("kind") == "lora":
        return save_adapter(path, artifact, artifact.manifest["adapter_config"])
    return save_artifact(path, artifact)


def load_fix(path: str | Path) -> Fix:
    """Load a fix written by ``mechfix steer``: a ``.safetensors`` file, or a LoRA fix's adapter folder.

    Raises:
        ArtifactError: For a missing, corrupt or wrong-kind file.
    """
    return fix_from_artifact(load_artifact(path, expect="fix"))
