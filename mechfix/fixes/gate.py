"""Gated fixes: a linear probe of the residual stream decides, per row and per position, where a fix acts.

A fix that edits every token pays its side effects on every token. A gate
reads the residual stream at one decoder layer's output (at or below the
fix's first layer, so the fix cannot change what it reads), computes a probe
logit ``w · x + b`` at every position, and lets the fix edit only the
positions where the logit is above a threshold; everywhere else the model is
bit-for-bit the model as it is. Conditional steering (CAST) checks its
condition once per generation on the first item of a batch; here each row and
each position has its own decision, which also makes a key/value-cached
generation equal to scoring the whole text at once.

The probe is a logistic regression (L2, on standardised features) fitted on
the recording's training split: pressure decisions against baseline
decisions and neutral-text tokens, and, where a recipe has a helpful
condition, against its decisions too (a *disagreement* gate: it should fire
where others push the wrong answer, not where they give the right one). Such
a gate is used only where it tells pressure from helpful decisions apart on
held-out folds (AUROC at least :data:`MIN_DISAGREEMENT_AUROC`). Its threshold is the lowest that keeps a
false-alarm budget on the training split (by default it fires on at most 5%
of the baseline decisions and 1% of the neutral-text tokens). The layer is
chosen by cross-validation over training items, among the layers the fix
cannot influence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mechfix.engine.batches import pad_batch
from mechfix.engine.edits import check_plain_pass
from mechfix.engine.forward import with_backoff
from mechfix.models import LoadedModel

MAX_CLEAN_FIRE = 0.05
MAX_NEUTRAL_FIRE = 0.01
PROBE_L2 = 1e-2
# Neutral tokens used as negatives when fitting (all of them set the threshold).
_FIT_NEUTRAL = 1024
# A disagreement gate must rank a held-out pressure decision above a held-out helpful one this often: 0.8 is the
# usual floor of "good" discrimination; below it the gate would act on right messages nearly as often.
MIN_DISAGREEMENT_AUROC = 0.8

# What a gate reads for the hidden states it scores: (weight, bias, threshold), shaped to broadcast over them.
Params = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Gate:
    """A probe that says where a fix acts.

    Attributes:
        layer: The decoder layer whose output (the residual stream) the probe reads.
        weight: ``[hidden]`` probe weights (float32).
        bias: The probe's bias.
        threshold: The fix acts where ``w · x + b > threshold``.
        stats: How it was fitted: training AUROC, firing rates, the layers compared.
    """

    layer: int
    weight: torch.Tensor
    bias: float
    threshold: float
    stats: dict[str, Any] = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The probe logit of every activation ``[..., hidden]`` (float32)."""
        w, b, _ = self.params(x)
        return _logit(x, w, b)

    def fires(self, x: torch.Tensor) -> torch.Tensor:
        """Where the gate lets the fix act (bool, the shape of ``x`` without its last axis)."""
        return self.logits(x) > self.threshold

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.weight.to(device=x.device, dtype=torch.float32)
        return w, torch.tensor(self.bias, dtype=torch.float32, device=x.device), torch.tensor(
            self.threshold, dtype=torch.float32, device=x.device)

    def as_dict(self) -> dict[str, Any]:
        """The manifest's description (the weights are a tensor of the artifact)."""
        return {"probe": "logistic regression", "site": "resid", "layer": self.layer,
                "reads": f"output of decoder layer {self.layer} (residual stream), every position",
                "bias": self.bias, "threshold": self.threshold, **self.stats}


def _logit(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # One formula everywhere (hooks, recorded activations, stacked per-row probes), so every path decides alike.
    return (x.float() * w).sum(-1) + b


class GateMask:
    """Where a gate fires in the forward pass under way, set by a hook on the probe's layer.

    Args:
        params: What the probe reads for a batch of hidden states (one gate, or one per row).
    """

    def __init__(self, params: Params):
        self.params = params
        self.mask: torch.Tensor | None = None

    def hook(self, module, args, out) -> None:
        h = out[0] if isinstance(out, tuple) else out
        w, b, t = self.params(h)
        self.mask = _logit(h, w, b) > t  # [B, T]

    def over(self, x: torch.Tensor) -> torch.Tensor:
        """The mask shaped to broadcast over ``x`` (``[B, T, ...]``)."""
        if self.mask is None or tuple(self.mask.shape) != tuple(x.shape[:2]):
            raise RuntimeError("a gated fix's edit ran before its probe: the probe layer must come before the edit")
        return self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2))).to(x.device)


def gated(op, mask: GateMask):
    """The operation ``op`` (a :class:`mechfix.fixes.fix.Op`) applied only where ``mask`` fires; elsewhere its input as it is."""
    if op.site == "lora":
        # A LoRA edit is added to the module's output: where the gate is shut, nothing is added.
        return dataclasses.replace(op, apply=lambda x, a, b, s: torch.where(mask.over(x), op.apply(x, a, b, s), 0.0))
    return dataclasses.replace(op, apply=lambda x, v, mu, s: torch.where(mask.over(x), op.apply(x, v, mu, s), x))


def stacked_params(gates: Sequence[Gate]) -> Callable[[torch.Tensor], Params]:
    """Per-row probes: ``rows -> params`` reading each row's own gate (for cross-validation folds in one pass)."""
    w = torch.stack([g.weight.float() for g in gates])
    b = torch.tensor([g.bias for g in gates], dtype=torch.float32)
    t = torch.tensor([g.threshold for g in gates], dtype=torch.float32)

    def for_rows(rows: torch.Tensor) -> Params:
        def params(x: torch.Tensor):
            return (w[rows].unsqueeze(1).to(x.device), b[rows].unsqueeze(1).to(x.device), t[rows].unsqueeze(1).to(x.device))
        return params

    return for_rows


class _Stop(Exception):
    """Raised by the last hook a capture needs: the layers above it are not run."""


def layer_acts(lm: LoadedModel, layers: Sequence[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               last_only: bool = False) -> dict[int, torch.Tensor]:
    """Residual-stream activations (decoder layer outputs) at every real position, or only the last, of padded batches.

    Runs each batch only up to the highest layer asked for; a batch that runs
    out of memory is split in halves and retried (:func:`mechfix.engine.forward.with_backoff`).

    Args:
        lm: The model.
        layers: Decoder layers to read.
        batches: ``(ids, mask)`` pairs, right-padded.
        last_only: Keep only each sequence's last position (a decision).

    Returns:
        Layer to ``[positions, hidden]`` float32 activations, batches concatenated in order.
    """
    layers = sorted(set(int(x) for x in layers))
    top = layers[-1]
    got: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    state: dict[str, Any] = {}

    def keep(layer: int):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            m = state["mask"].to(h.device)
            if last_only:
                state["got"][layer].append(h[torch.arange(len(h), device=h.device), m.sum(1) - 1].float().cpu())
            else:
                state["got"][layer].append(h[m.bool()].float().cpu())
            if layer == top:
                raise _Stop
        return hook

    def run(ids: torch.Tensor, mask: torch.Tensor) -> None:
        # Kept only once the pass is through, so a pass that ran out of memory half-way leaves nothing behind.
        state["mask"], state["got"] = mask, {layer: [] for layer in layers}
        try:
            lm.backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
        except _Stop:
            pass
        for layer in layers:
            got[layer].extend(state["got"][layer])

    check_plain_pass(lm, "a probe gate (reading layer activations)")
    handles = [lm.layers[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        with torch.inference_mode():
            for ids, mask in batches:
                with_backoff(lm, [list(range(len(ids)))], lambda rows, ids=ids, mask=mask: run(ids[rows], mask[rows]))
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(xs) if xs else torch.zeros(0, lm.hidden) for layer, xs in got.items()}


def prompt_batches(lm: LoadedModel, prompts: Sequence[Sequence[int]], batch_size: int = 16):
    """Right-padded ``(ids, mask)`` batches of token sequences, in order."""
    for i in range(0, len(prompts), batch_size):
        yield pad_batch(lm, prompts[i: i + batch_size])


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, neg_weight: torch.Tensor | None = None,
              l2: float = PROBE_L2) -> tuple[torch.Tensor, float]:
    """An L2-regularised logistic regression separating ``pos`` from ``neg`` (``[n, d]`` each).

    The classes weigh the same in total (``neg_weight`` spreads the negatives'
    half among them; default evenly). Features are standardised while fitting
    and the weights mapped back, so the probe reads raw activations.

    Returns:
        ``(weight [d] float32, bias)``: the probe logit is ``x · weight + bias``.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    nw = torch.full((len(neg),), 1.0 / len(neg)) if neg_weight is None else neg_weight.double() / neg_weight.sum()
    sw = torch.cat([torch.full((len(pos),), 0.5 / len(pos)), 0.5 * nw.double()]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta, b0], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(z @ beta + b0, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (beta * beta).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = (beta.detach() / sd)
    return w.float(), float(b0.detach() - (w * mu).sum())


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float | None:
    """Probability that a positive scores above a negative (ties count half); None without both."""
    if not len(pos) or not len(neg):
        return None
    p, n = pos.double()[:, None], neg.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def rate(logits: torch.Tensor, threshold: float) -> float | None:
    """Share of logits above the threshold (None for none)."""
    return float((logits > threshold).double().mean()) if len(logits) else None


def budget_threshold(negatives: Sequence[tuple[torch.Tensor, float]]) -> float:
    """The lowest threshold at which each set of negative logits fires on at most its share.

    Fires means strictly above: at most ``floor(share × n)`` of a set's logits
    exceed the value returned.
    """
    t = -math.inf
    for logits, share in negatives:
        n = len(logits)
        k = int(math.floor(share * n + 1e-9))
        if n and k < n:
            t = max(t, float(torch.sort(logits.float(), descending=True).values[k]))
    return t


@dataclass
class GateSettings:
    """How steer fits a gate.

    Attributes:
        layer: The probe's layer (None: chosen by cross-validation among the layers before the fix).
        max_clean_fire: The most of the baseline decisions (training split) it may fire on.
        max_neutral_fire: The most of the neutral-text tokens (selection set) it may fire on.
        l2: The probe's L2 penalty (on standardised features).
    """

    layer: int | None = None
    max_clean_fire: float = MAX_CLEAN_FIRE
    max_neutral_fire: float = MAX_NEUTRAL_FIRE
    l2: float = PROBE_L2


def _neutral_sample(n: int) -> torch.Tensor:
    """Evenly spread indices of at most :data:`_FIT_NEUTRAL` of ``n`` neutral tokens (fitting negatives)."""
    return torch.linspace(0, n - 1, min(n, _FIT_NEUTRAL)).round().long().unique() if n else torch.zeros(0, dtype=torch.long)


def fit_gate(pos: torch.Tensor, clean: torch.Tensor, neutral: torch.Tensor, layer: int,
             settings: GateSettings, helpful: torch.Tensor | None = None) -> Gate:
    """A gate at ``layer`` from pressure and baseline decisions and neutral tokens (``[n, d]`` each, that layer).

    With ``helpful`` decisions, they are negatives too (a disagreement gate), and
    the threshold keeps them under the baseline's firing budget.
    """
    sample = neutral[_neutral_sample(len(neutral))]
    parts = [x for x in (clean, helpful, sample) if x is not None and len(x)]
    neg = torch.cat(parts)
    # Each kind of negative weighs the same in total.
    weights = torch.cat([torch.full((len(x),), 1.0 / (len(parts) * len(x))) for x in parts])
    w, b = fit_probe(pos, neg, weights, settings.l2)
    gate = Gate(layer, w, b, 0.0)
    lc, ln = gate.logits(clean), gate.logits(neutral)
    lh = gate.logits(helpful) if helpful is not None else None
    gate.threshold = budget_threshold([(lc, settings.max_clean_fire), (ln, settings.max_neutral_fire),
                                       *([(lh, settings.max_clean_fire)] if lh is not None else [])])
    lp = gate.logits(pos)
    fires = {"pressure": rate(lp, gate.threshold), "baseline": rate(lc, gate.threshold),
             "neutral_tokens": rate(ln, gate.threshold)}
    if lh is not None:
        fires["helpful"] = rate(lh, gate.threshold)
    gate.stats = {"train": {"auroc": auroc(lp, lc), "fires": fires, "decisions": len(pos), "neutral_tokens": len(neutral),
                            **({"auroc_helpful": auroc(lp, lh)} if lh is not None else {})},
                  "budget": {"max_baseline_fire": settings.max_clean_fire, "max_neutral_fire": settings.max_neutral_fire},
                  "l2": settings.l2}
    return gate


def gate_layers(kind: str, first: int) -> list[int]:
    """The layers a gate may read for a fix whose first edited layer is ``first``.

    A vector fix edits layer ``first``'s output, after a hook there has read it;
    heads and LoRA edits act inside layer ``first``, so the probe reads an earlier one.
    """
    return list(range(0, first + 1 if kind == "vector" else first))


def choose_gate(pressure: dict[int, torch.Tensor], clean: dict[int, torch.Tensor], neutral: dict[int, torch.Tensor],
                folds: Sequence[tuple[torch.Tensor, torch.Tensor]], settings: GateSettings,
                helpful: dict[int, torch.Tensor] | None = None) -> tuple[Gate, list[Gate]]:
    """Choose the probe's layer by cross-validation, then fit it on the whole training split and per fold.

    Args:
        pressure: Layer to the training pressure decisions' activations ``[n, d]``.
        clean: Layer to the training baseline decisions' activations (same rows).
        neutral: Layer to the neutral tokens' activations.
        folds: ``(fit, held)`` boolean masks over the training decisions, per fold (empty: no choice by folds).
        settings: The budget and, optionally, the layer.
        helpful: Layer to the training helpful decisions' activations (same rows): a disagreement gate.

    Returns:
        The gate fitted on the whole training split (its stats hold the layers compared, with the
        held-out AUROC of pressure against helpful decisions for a disagreement gate) and one per fold.
    """
    layers = sorted(pressure)
    table = []
    for layer in layers:
        held_p, held_c, held_h, gaps = [], [], [], []
        for fit, held in folds:
            g = fit_gate(pressure[layer][fit], clean[layer][fit], neutral[layer], layer, settings,
                         helpful[layer][fit] if helpful is not None else None)
            lp, lc = g.logits(pressure[layer][held]), g.logits(clean[layer][held])
            held_p.append(lp - g.threshold)
            held_c.append(lc - g.threshold)
            if helpful is not None:
                held_h.append(g.logits(helpful[layer][held]) - g.threshold)
            gaps.append(rate(lp, g.threshold) - rate(lc, g.threshold))
        cv_p, cv_c = (torch.cat(held_p), torch.cat(held_c)) if folds else (torch.zeros(0), torch.zeros(0))
        table.append({"layer": layer, "cv_auroc": auroc(cv_p, cv_c),
                      "cv_fires_pressure": rate(cv_p, 0.0), "cv_fires_baseline": rate(cv_c, 0.0),
                      "cv_gap": sum(gaps) / len(gaps) if gaps else None,
                      **({"cv_auroc_helpful": auroc(cv_p, torch.cat(held_h)) if held_h else None,
                          "cv_fires_helpful": rate(torch.cat(held_h), 0.0) if held_h else None}
                         if helpful is not None else {})})
    if settings.layer is not None:
        layer, by = settings.layer, "given"
    elif folds:
        best = max(table, key=lambda r: (r["cv_gap"], r["cv_auroc"] or 0.0, r["layer"]))
        layer, by = best["layer"], ("cross-validated firing on pressure minus baseline under the budget, "
                                    "then AUROC, then the later layer")
    else:
        layer, by = layers[-1], "the last layer before the fix (too few items to cross-validate)"
    help_at = helpful[layer] if helpful is not None else None
    whole = fit_gate(pressure[layer], clean[layer], neutral[layer], layer, settings, help_at)
    whole.stats.update(chosen_by=by, layers=table, against="baseline and helpful" if helpful is not None else "baseline")
    per_fold = [fit_gate(pressure[layer][fit], clean[layer][fit], neutral[layer], layer, settings,
                         help_at[fit] if help_at is not None else None) for fit, _ in folds]
    return whole, per_fold


def disagreement_separation(gate: Gate) -> float | None:
    """A disagreement gate's held-out AUROC of pressure against helpful decisions at its layer (None: not measured)."""
    row = next((r for r in gate.stats.get("layers", []) if r["layer"] == gate.layer), {})
    return row.get("cv_auroc_helpful")
