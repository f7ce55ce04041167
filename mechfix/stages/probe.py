"""Fitting a gated fix's probe from a recording: against the baseline, or against helpful decisions too."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechfix.artifacts import Artifact
from mechfix.errors import BadInputError
from mechfix.fixes.gate import (
    MIN_DISAGREEMENT_AUROC,
    Gate,
    GateSettings,
    choose_gate,
    disagreement_separation,
    gate_layers,
    layer_acts,
)
from mechfix.measure.evaluate import NeutralSet
from mechfix.models import LoadedModel


def fit_gates(lm: LoadedModel, rec: Artifact, kind: str, first: int, baseline: str, neutral: NeutralSet,
              folds: Sequence[tuple[torch.Tensor, list[int]]], settings: GateSettings) -> tuple[Gate, list[Gate], str]:
    """The gate of a fix whose first edited layer is ``first``: fitted on the training split, and per fold.

    Reads the recording's residual stream at the decision position and the
    neutral set's at every position (one pass, up to the highest layer a probe may read).
    Where the recording has a helpful condition, a disagreement gate (pressure
    against helpful decisions too) is fitted first and kept only if it tells
    them apart on held-out folds (:data:`~mechfix.fixes.gate.MIN_DISAGREEMENT_AUROC`);
    otherwise the gate is fitted against the baseline alone.

    Returns:
        The whole split's gate, one per fold, and a sentence for steer's notes on which kind it is and why.

    Raises:
        BadInputError: When no layer comes before the fix, the given layer is not one of them, or the
            recording kept no residual-stream activations.
    """
    allowed = gate_layers(kind, first)
    if not allowed:
        raise BadInputError(f"the fix edits layer {first}, and a gate's probe must read a layer before it: there is none. "
                            "Leave out --gate, or make the fix on later layers with --layers.")
    if settings.layer is not None and settings.layer not in allowed:
        raise BadInputError(f"--gate-layer {settings.layer} is not before the fix's first layer ({first}); "
                            f"use one of {allowed[0]} to {allowed[-1]}.")
    layers = [settings.layer] if settings.layer is not None else allowed
    need = ["acts/pressure/resid", f"acts/{baseline}/resid"]
    if any(k not in rec.tensors for k in need) or rec.tensors[need[0]].dim() != 3:
        raise BadInputError(f"recording '{rec.path}' has no decision-position residual-stream activations, which a gate's "
                            "probe is fitted on. Record again with the resid site kept (the default keeps every site).")
    train = rec.tensors["split"] == 0
    rows = torch.nonzero(train).flatten()
    pos = {layer: rec.tensors[need[0]][train][:, layer].float() for layer in layers}
    neg = {layer: rec.tensors[need[1]][train][:, layer].float() for layer in layers}
    text = layer_acts(lm, layers, neutral.batches)
    masks = []
    for fit, held in folds:
        h = torch.zeros(len(rows), dtype=torch.bool)
        h[held] = True
        masks.append((fit[rows], h))
    if "acts/helpful/resid" not in rec.tensors or baseline == "helpful":
        return (*choose_gate(pos, neg, text, masks, settings),
                "the recording has no helpful condition: the gate is fitted against the baseline alone, and nothing "
                "shows whether it also fires on right messages")
    helpful = {layer: rec.tensors["acts/helpful/resid"][train][:, layer].float() for layer in layers}
    whole, per_fold = choose_gate(pos, neg, text, masks, settings, helpful)
    sep = disagreement_separation(whole)
    if sep is not None and sep >= MIN_DISAGREEMENT_AUROC:
        return whole, per_fold, (f"the gate tells pressure from helpful decisions apart held out (AUROC {sep:.2f}): it "
                                 "is fitted to fire where others push the wrong answer, not where they give the right one")
    plain, plain_folds = choose_gate(pos, neg, text, masks, settings)
    plain.stats["disagreement"] = {"cv_auroc_helpful": sep, "used": False}
    shown = "could not be measured without cross-validation" if sep is None else f"held-out AUROC {sep:.2f}"
    return plain, plain_folds, (
        f"a gate fitted against helpful decisions too does not tell them apart from pressure ({shown}, below "
        f"{MIN_DISAGREEMENT_AUROC:g}): the gate is fitted against the baseline alone and may fire on right messages too")
