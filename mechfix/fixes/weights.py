"""A fix as weights: the exact change of the model's weights that a heads or LoRA fix makes.

A heads operation that is affine in one head's output (``x' = x + (x Q^T) P + c``,
:attr:`mechfix.fixes.fix.Op.affine`) acts on the input of the layer's attention output
projection ``W``, so ``W x' = W x + (W_h P^T)(Q x_h) + W_h c`` where ``W_h`` are
the head's columns of ``W``. The middle term is a LoRA update of ``W`` with
``A = Q`` (placed in the head's columns) and ``B = W_h P^T``; the last is a
constant, an output bias. So:

- ``ablate`` (rank 1 per head) and ``scale`` (rank ``head_dim`` per head) are
  exactly a LoRA adapter on the output projections, and exactly merged weights;
- ``steer`` and ``restore`` add a constant: merged weights with an output
  projection bias, where the family can hold one (:attr:`ArchSpec.attn_out_bias`);
- ``project`` is rectified and ``subtract`` acts on the residual stream: no
  weights compute them.

A LoRA fix is already ``W + B A``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mechfix.architectures import get_path
from mechfix.errors import BadInputError
from mechfix.fixes.adapter import LoraWeights
from mechfix.fixes.fix import Fix, OPS
from mechfix.fixes.adapter import LoraTarget, lora_targets
from mechfix.models import LoadedModel


@dataclass
class WeightEdit:
    """What a fix changes in the model's weights, per attention output projection.

    Attributes:
        targets: The adapted modules (one per layer the fix edits).
        a: Per module, ``A [k, in]`` of its low-rank part ``B A`` (``k`` may be 0).
        b: Per module, ``B [out, k]``.
        bias: Per module, the constant added to its output ``[out]``, or None.
    """

    targets: list[LoraTarget]
    a: list[torch.Tensor] = field(default_factory=list)
    b: list[torch.Tensor] = field(default_factory=list)
    bias: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def has_constant(self) -> bool:
        return any(c is not None for c in self.bias)


def _weight(lm: LoadedModel, target: LoraTarget) -> torch.Tensor:
    """The module's weight as ``[out, in]``, in float64 (GPT-2's Conv1D stores it ``[in, out]``)."""
    w = get_path(lm.model, target.module).weight.detach()
    return (w.T if target.fan_in_fan_out else w).double().cpu()


def _module_target(lm: LoadedModel, module: str, layer: int, heads: list[int] | None) -> LoraTarget:
    m = get_path(lm.model, module)
    flip = type(m).__name__ == "Conv1D"  # GPT-2 stores [in, out]
    rows, cols = m.weight.shape
    return LoraTarget(module, layer, heads, *((rows, cols) if flip else (cols, rows)), flip)


def weight_edit(lm: LoadedModel, fix: Fix) -> WeightEdit:
    """The exact weight change of a heads fix of an affine operation, or of a LoRA fix, at its strength.

    Raises:
        BadInputError: For an operation no weights compute (rectified, or on the residual stream).
    """
    op = OPS[fix.op]
    if fix.kind == "lora" and fix.lora is not None:
        edit = WeightEdit([_module_target(lm, m, layer, heads)
                           for m, layer, heads in zip(fix.lora.modules, fix.layers, fix.lora.heads)])
        for a, b in zip(fix.lora.a, fix.lora.b):
            edit.a.append(a.double())
            edit.b.append(b.double() * fix.strength)
            edit.bias.append(None)
        return edit
    if op.affine is None or fix.kind != "heads":
        raise BadInputError(f"a {fix.kind} fix of operation '{fix.op}' is not a change of weights: {op.not_weights}.")
    hd = lm.head_dim
    targets = lora_targets(lm, fix.layers, fix.heads, scope="heads")
    edit = WeightEdit(targets)
    for t in targets:
        w = _weight(lm, t)
        a_rows, b_cols, const = [], [], torch.zeros(t.out_features, dtype=torch.float64)
        for j, layer in enumerate(fix.layers):
            if layer != t.layer:
                continue
            cols = slice(fix.heads[j] * hd, (fix.heads[j] + 1) * hd)
            p, q, c = op.affine(fix.vectors[j].double(), fix.means[j].double(), float(fix.strength))
            a = torch.zeros(q.shape[0], t.in_features, dtype=torch.float64)
            a[:, cols] = q
            a_rows.append(a)
            b_cols.append(w[:, cols] @ p.T)
            const += w[:, cols] @ c
        a, b = _compact(torch.cat(a_rows), torch.cat(b_cols, dim=1))
        edit.a.append(a)
        edit.b.append(b)
        edit.bias.append(const if op.constant else None)
    return edit


def _compact(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same update ``B A`` with no more rank than the module's width allows: ``min(k, out, in)``.

    ``scale`` on many heads of one layer needs ``heads × head_dim`` rows, which
    can exceed the output width; then ``(B A)`` itself is the new A and B is the identity.
    """
    k, (out, inp) = a.shape[0], (b.shape[0], a.shape[1])
    if k > out and out <= inp:
        return b @ a, torch.eye(out, dtype=b.dtype)
    if k > inp:
        return torch.eye(inp, dtype=a.dtype), b @ a
    return a, b


def as_lora(edit: WeightEdit) -> LoraWeights:
    """The low-rank part as one adapter: one rank ``r`` for every module, the largest any needs.

    A module that needs fewer gets zero rows of A and columns of B: one ``r``
    keeps every engine's ``lora_alpha / r`` scaling at 1 (not every engine reads
    PEFT's per-module ``rank_pattern``).

    Raises:
        BadInputError: When the edit has a constant term (a LoRA adapter has no bias).
    """
    if edit.has_constant:
        raise BadInputError("the fix adds a constant to the attention output, which a LoRA adapter cannot carry.")
    r = max(int(a.shape[0]) for a in edit.a)
    a_out, b_out = [], []
    for a, b in zip(edit.a, edit.b):
        pad = r - a.shape[0]
        a_out.append(torch.cat([a, a.new_zeros(pad, a.shape[1])]).float())
        b_out.append(torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).float())
    return LoraWeights(modules=[t.module for t in edit.targets], a=a_out, b=b_out, heads=[t.heads for t in edit.targets])


def check_bias(lm: LoadedModel, edit: WeightEdit, what: str) -> None:
    """Refuse a constant term the model's checkpoint cannot hold (see :attr:`ArchSpec.attn_out_bias`).

    Raises:
        BadInputError: Naming the family, why, and the operations that need no bias.
    """
    if not edit.has_constant:
        return
    carrier = lm.spec.attn_out_bias
    if carrier is None and any(get_path(lm.model, t.module).bias is None for t in edit.targets):
        raise BadInputError(
            f"{what} adds a constant to the attention output, which a merged checkpoint writes as a bias of "
            f"'{lm.spec.attn_out}'. {lm.model.config.model_type} models build that projection without a bias whatever "
            "their config says, so transformers (and every engine) would drop it on load and the checkpoint would not "
            "be the fix. Make a fix of an operation without a constant (`mechfix steer ATTR --portable`: ablate or "
            "scale), or apply this one with the Python API."
        )


def bias_switch(lm: LoadedModel, edit: WeightEdit) -> str | None:
    """The config key merging ``edit`` switches on to give the output projections a bias (None: no switch needed)."""
    key = lm.spec.attn_out_bias
    if edit.has_constant and key not in (None, "always") and not getattr(lm.model.config, key, False):
        return key
    return None


@contextmanager
def merged(lm: LoadedModel, edit: WeightEdit) -> Iterator[None]:
    """The model with the edit merged into its weights inside a ``with`` block; restored exactly on exit.

    A constant term becomes the output projection's bias; where the projection
    has none, the family's config key (``attention_bias``) is switched on and
    every module it governs gets a bias, zero but for the fix's.

    Raises:
        BadInputError: For a constant term this family cannot hold (:func:`check_bias`).
    """
    check_bias(lm, edit, "the fix")
    saved: list[tuple[torch.nn.Module, str, torch.Tensor | None]] = []
    config_key = bias_switch(lm, edit)
    switch = config_key is not None
    old_switch = getattr(lm.model.config, config_key, None) if switch else None
    try:
        with torch.no_grad():
            if switch:
                for i in range(lm.n_layers):
                    for path in (*lm.spec.bias_with, lm.spec.attn_out):
                        m = get_path(lm.layers[i], path)
                        if m.bias is None:
                            saved.append((m, "bias", None))
                            m.bias = torch.nn.Parameter(m.weight.new_zeros(m.weight.shape[0]), requires_grad=False)
                setattr(lm.model.config, config_key, True)
            for t, a, b, c in zip(edit.targets, edit.a, edit.b, edit.bias):
                m = get_path(lm.model, t.module)
                saved.append((m, "weight", m.weight.detach().clone()))
                delta = (b @ a).to(m.weight.device)
                # Summed in float64, rounded once to the model's dtype (bf16 on a GPU).
                m.weight.copy_(m.weight.double() + (delta.T if t.fan_in_fan_out else delta))
                if c is not None:
                    saved.append((m, "bias", m.bias.detach().clone()))
                    m.bias.copy_(m.bias.double() + c.to(m.bias.device))
        yield
    finally:
        with torch.no_grad():
            for m, name, value in reversed(saved):
                if value is None:
                    m.register_parameter(name, None)
                else:
                    getattr(m, name).copy_(value)
            if switch:
                setattr(lm.model.config, config_key, old_switch)
