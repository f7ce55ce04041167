"""The steer stage: turn an attribution into a small fix, with its strength chosen under a side-effect budget.

1. Targets come from the attribution: for a ``vector`` fix, the first layer
   whose residual stream carries most of the behaviour; for a ``heads`` fix,
   the top heads by effect; for a ``lora`` fix, the attention output
   projections of the layers holding the top heads.
2. Directions come from the recording's activations at the decision position,
   training split only: mean(pressure) − mean(baseline condition). A ``lora``
   fix is trained instead (:mod:`mechfix.lora`), on the same split.
3. A sweep over strengths measures, on the training split, the behaviour left
   with the fix on, KL per token on neutral text, and the share of clean
   decisions whose answer is unchanged. A coarse grid is refined by bisection
   between the last strength inside the budget and the first one outside.
4. The strength that removes the most behaviour inside the budget is kept.
   A lora fix's strength scales its update and is then folded into the
   adapter's weights, so PEFT applies exactly what verify measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mechfix.artifacts import Artifact, new_manifest
from mechfix.attribute import decisions_from_record
from mechfix.errors import BadInputError, GateError
from mechfix.evaluate import NeutralSet, clean_agreement, neutral_kl, score_requests
from mechfix.fix import DEFAULT_OP, OPS, Fix, fix_tensors
from mechfix.forward import Request
from mechfix.lora import LoraSettings, LoraTarget, TrainingLog, lora_targets, train_lora
from mechfix.models import LoadedModel
from mechfix.stats import decision_scores, mean_ci, reduction

# Coarse strength grids: ops bounded by 1 (scale, restore) and unbounded ones.
GRIDS = {"bounded": (0.25, 0.5, 0.75, 1.0), "unbounded": (0.5, 1.0, 2.0, 4.0)}
# A trained adapter is swept up to its trained size: past it, it does what it never learned.
_GRID_OF_OP = {"subtract": "unbounded", "steer": "unbounded", "project": "unbounded", "restore": "bounded", "scale": "bounded",
               "lora": "bounded"}
# A layer "carries" the behaviour once its residual stream holds this share of the largest effect.
RESID_SHARE = 0.8
DEFAULT_TOP_HEADS = 5
REFINE_STEPS = 3


@dataclass
class Budget:
    """The side-effect budget a strength must stay inside (training split + neutral text)."""

    max_kl: float = 0.1
    min_clean_agreement: float = 0.95


@dataclass
class SweepPoint:
    """One strength of the sweep, measured on the training split.

    Attributes:
        strength: The multiplier.
        effect: Behaviour left, pressure − baseline score (mean and 95% CI).
        reduction: 1 − effect / effect without the fix.
        kl: KL per token on the neutral set (nats).
        clean_agreement: Share of baseline decisions whose preferred option is unchanged.
        within_budget: Whether KL and clean agreement are inside the budget.
    """

    strength: float
    effect: dict[str, Any]
    reduction: float
    kl: float
    clean_agreement: float
    within_budget: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "effect": self.effect,
            "reduction": self.reduction,
            "kl": self.kl,
            "clean_agreement": self.clean_agreement,
            "within_budget": self.within_budget,
        }


@dataclass
class Steering:
    """What steer produced.

    Attributes:
        fix: The fix, with the chosen strength.
        sweep: Every strength tried, weakest first (strength 0 is the model as it is).
        chosen: Index of the kept strength in ``sweep``.
        baseline: The condition the directions point away from (the attribution's baseline).
        why: How the targets were picked, in words.
        budget: The side-effect budget.
        training: How a lora fix was trained (None for other kinds).
        modules: The modules a lora fix adapts.
        folded: The strength folded into a lora fix's weights (its ``strength`` is then 1).
    """

    fix: Fix
    sweep: list[SweepPoint]
    chosen: int
    baseline: str
    why: str
    budget: Budget = field(default_factory=Budget)
    training: TrainingLog | None = None
    modules: list[LoraTarget] = field(default_factory=list)
    folded: float | None = None


def pick_targets(att: Artifact, kind: str, top: int = DEFAULT_TOP_HEADS, layers: Sequence[int] | None = None):
    """Layers (vector) or heads (heads) the attribution points to.

    Returns:
        (layers, heads, why): heads is empty for vector fixes.

    Raises:
        BadInputError: For layers out of range, or when nothing carries the behaviour.
    """
    n_layers, n_heads = int(att.tensors["heads"].shape[0]), int(att.tensors["heads"].shape[1])
    if layers:
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad:
            raise BadInputError(f"--layers {bad} is out of range: the model has layers 0 to {n_layers - 1}.")
    if kind == "vector":
        if layers:
            return sorted(set(layers)), [], "layers given with --layers"
        resid = att.tensors["resid"]
        peak = float(resid.max())
        if peak <= 0:
            raise BadInputError(
                f"no residual-stream layer carries the behaviour in '{att.path}' (largest effect {peak:+.2f}), "
                "so there is nothing for a vector to remove. Check the recording's effect, or pass --layers."
            )
        layer = int(torch.nonzero(resid >= RESID_SHARE * peak)[0])
        return [layer], [], (
            f"L{layer}: the first layer whose residual stream carries {RESID_SHARE:.0%} of the largest "
            f"layer effect ({float(resid[layer]):+.2f} of {peak:+.2f})"
        )
    heads = att.tensors["heads"]
    order = torch.argsort(heads.flatten(), descending=True).tolist()
    chosen = [(i // n_heads, i % n_heads) for i in order if float(heads.flatten()[i]) > 0]
    if layers:
        chosen = [lh for lh in chosen if lh[0] in set(layers)]
    chosen = chosen[:top]
    if not chosen:
        raise BadInputError(
            f"no head has a positive effect in '{att.path}'{' on the given --layers' if layers else ''}, "
            "so there is nothing for a heads fix to act on."
        )
    names = ", ".join(f"L{a}.H{b} {float(heads[a, b]):+.2f}" for a, b in chosen)
    return [a for a, _ in chosen], [b for _, b in chosen], f"the top {len(chosen)} heads by effect: {names}"


def directions(rec: Artifact, kind: str, layers: Sequence[int], heads: Sequence[int], baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions and baseline means from the recording's training split (decision position).

    Returns:
        (mean(pressure) − mean(baseline), mean(baseline)), each ``[n, width]``:
        per layer (vector fixes, residual stream) or per head (heads fixes).

    Raises:
        BadInputError: When the recording lacks the activation site the fix needs.
    """
    site = "resid" if kind == "vector" else "heads"
    train = rec.tensors["split"] == 0
    need = [f"acts/pressure/{site}", f"acts/{baseline}/{site}"]
    missing = [k for k in need if k not in rec.tensors]
    if missing:
        raise BadInputError(
            f"recording '{rec.path}' has no {site} activations ({', '.join(missing)} missing). "
            f"Record again with the {site} site kept (the default keeps every site)."
        )
    pres, base = rec.tensors[need[0]][train].float(), rec.tensors[need[1]][train].float()
    if pres.dim() != (3 if site == "resid" else 4):
        raise BadInputError(f"recording '{rec.path}' kept activations at every position; steer needs a decision-position recording.")
    if site == "resid":
        p, b = pres[:, list(layers)], base[:, list(layers)]
    else:
        p, b = pres[:, list(layers), list(heads)], base[:, list(layers), list(heads)]
    return (p.mean(0) - b.mean(0)), b.mean(0)


def _measure(lm, fix, s, kl, requests, before, budget, batch_size) -> SweepPoint:
    """One sweep point; ``kl`` comes from the caller, which measures a whole grid in one pass over neutral text."""
    base_c = [c for c in requests if c != "pressure"][0]
    scores = before if s == 0 else score_requests(lm, requests, fix, s, batch_size=batch_size)
    eff = decision_scores(scores["pressure"]) - decision_scores(scores[base_c])
    eff0 = decision_scores(before["pressure"]) - decision_scores(before[base_c])
    agree = clean_agreement(before[base_c], scores[base_c])
    ok = kl <= budget.max_kl and agree >= budget.min_clean_agreement
    return SweepPoint(s, mean_ci(eff), reduction(float(eff0.mean()), float(eff.mean())), kl, agree, ok)


def _objective(p: SweepPoint) -> tuple[float, float]:
    # Most behaviour removed (a reduction past 100% is no better), then the smallest KL.
    red = p.reduction if p.reduction == p.reduction else -1.0
    return (min(red, 1.0), -p.kl)


def sweep_strengths(
    lm: LoadedModel,
    fix: Fix,
    requests: dict[str, list[Request]],
    neutral: NeutralSet,
    budget: Budget,
    grid: Sequence[float],
    refine: int = REFINE_STEPS,
    batch_size: int = 16,
    on_step: Callable[[float], None] | None = None,
) -> list[SweepPoint]:
    """Measure the fix at strength 0, every grid strength, then refine at the budget's edge.

    Refinement bisects between the strongest in-budget strength and the next,
    out-of-budget one, ``refine`` times (side effects grow with strength).

    Returns:
        The points, ordered by strength.
    """
    before = score_requests(lm, requests, batch_size=batch_size)
    points = [_measure(lm, fix, 0.0, 0.0, requests, before, budget, batch_size)]
    # The unfixed model's neutral-text distributions are computed once for the whole grid.
    grid_kl = neutral_kl(lm, fix, [float(s) for s in grid], neutral)
    for s, kl in zip(grid, grid_kl):
        points.append(_measure(lm, fix, float(s), kl, requests, before, budget, batch_size))
        if on_step:
            on_step(s)
    for _ in range(refine):
        points.sort(key=lambda p: p.strength)
        ok = [i for i, p in enumerate(points) if p.within_budget]
        best = max(ok, key=lambda i: points[i].strength)
        if best + 1 >= len(points) or (points[best].reduction >= 1.0):
            break
        mid = round((points[best].strength + points[best + 1].strength) / 2, 4)
        kl = neutral_kl(lm, fix, [mid], neutral)[0]
        points.append(_measure(lm, fix, mid, kl, requests, before, budget, batch_size))
        if on_step:
            on_step(mid)
    points.sort(key=lambda p: p.strength)
    return points


def check_kind_op(kind: str, op: str | None) -> str:
    """The operation a fix of ``kind`` uses (``op`` or the kind's default).

    Raises:
        BadInputError: For an unknown kind, or an operation of another kind.
    """
    if kind not in DEFAULT_OP:
        raise BadInputError(f"--kind must be one of {', '.join(DEFAULT_OP)}, not '{kind}'.")
    op = op or DEFAULT_OP[kind]
    if op not in OPS or OPS[op].kind != kind:
        ops = [name for name, o in OPS.items() if o.kind == kind]
        raise BadInputError(f"--op '{op}' does not fit a {kind} fix; use one of {', '.join(ops)}.")
    return op


def steer(
    lm: LoadedModel,
    att: Artifact,
    rec: Artifact,
    neutral: NeutralSet,
    *,
    kind: str = "heads",
    op: str | None = None,
    top: int = DEFAULT_TOP_HEADS,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] | None = None,
    budget: Budget | None = None,
    refine: int = REFINE_STEPS,
    batch_size: int = 16,
    on_step: Callable[[float], None] | None = None,
    lora: LoraSettings | None = None,
    on_train: Callable[[int, dict[str, float]], None] | None = None,
) -> Steering:
    """Run the steer stage.

    Args:
        lm: The model the attribution was made with.
        att: The attribution artifact.
        rec: The recording the attribution was made from (activations, decisions).
        neutral: Neutral text for the KL budget.
        kind: ``vector``, ``heads`` or ``lora``.
        op: Operation (a key of :data:`mechfix.fix.OPS` of that kind); default per kind.
        top: Heads to act on (heads fixes).
        layers: Restrict targets to these layers (vector: use exactly these).
        strengths: Coarse grid to sweep; default per op (:data:`GRIDS`).
        budget: Side-effect budget.
        refine: Bisection steps at the edge of the budget.
        batch_size: Sequences per forward pass.
        on_step: Called with each strength measured (progress).
        lora: Training settings of a lora fix.
        on_train: Called after each training step of a lora fix, with the step and its losses.

    Raises:
        BadInputError: For an unknown kind or op, or unusable inputs.
        GateError: When no strength both reduces the behaviour and stays inside the budget.
    """
    budget = budget or Budget()
    op = check_kind_op(kind, op)
    baseline = att.manifest.get("params", {}).get("baseline", "clean")
    # A LoRA fix adapts the modules that hold the top heads.
    tgt_layers, tgt_heads, why = pick_targets(att, "heads" if kind == "lora" else kind, top, layers)
    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", baseline], split=0)
    requests = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in ("pressure", baseline)}
    training, modules = None, []
    if kind == "lora":
        settings = lora or LoraSettings()
        modules = lora_targets(lm, tgt_layers, tgt_heads, settings.scope)
        weights, training = train_lora(lm, modules, requests["pressure"], requests[baseline], neutral, settings, on_train)
        fix = Fix(op=op, layers=[m.layer for m in modules], heads=[], vectors=torch.zeros(0), means=torch.zeros(0),
                  strength=0.0, model=lm.identity, lora=weights)
        why = f"{why}; a rank-{settings.rank} LoRA update of {len(modules)} attention output projection(s)" + (
            ", reading only those heads' columns" if settings.scope == "heads" else "")
    else:
        vectors, means = directions(rec, kind, tgt_layers, tgt_heads, baseline)
        fix = Fix(op=op, layers=tgt_layers, heads=tgt_heads, vectors=vectors, means=means, strength=0.0, model=lm.identity)
    grid = tuple(strengths) if strengths else GRIDS[_GRID_OF_OP[op]]
    points = sweep_strengths(lm, fix, requests, neutral, budget, grid, refine, batch_size, on_step)
    candidates = [i for i, p in enumerate(points) if p.within_budget and p.strength > 0 and p.reduction > 0]
    steering = Steering(fix=fix, sweep=points, chosen=-1, baseline=baseline, why=why, budget=budget,
                        training=training, modules=modules)
    if not candidates:
        raise GateError(
            f"no strength of this {kind} fix ({why}) reduced the behaviour while staying inside the side-effect "
            f"budget (KL <= {budget.max_kl:g} nats/token, clean agreement >= {budget.min_clean_agreement:.0%}); "
            "see the sweep above. Try another --kind, more or fewer --top-heads, other --layers, or a looser "
            "--max-kl / --min-clean-agreement.",
            detail=steering,
        )
    steering.chosen = max(candidates, key=lambda i: _objective(points[i]))
    fix.strength = points[steering.chosen].strength
    if fix.lora is not None:
        # PEFT applies an adapter at its saved size: fold the strength into B.
        steering.folded = fix.strength
        fix.lora.b = [b * fix.strength for b in fix.lora.b]
        fix.strength = 1.0
    return steering


# Where each site's fix acts, in words, for the manifest.
_HOOK_OF_SITE = {
    "resid": "output of decoder layer N",
    "heads": "input of layer N's attention output projection, per head",
    "lora": "output of layer N's attention output projection (a LoRA update of it)",
}


def _fix_block(st: Steering) -> dict[str, Any]:
    """The manifest's description of what the fix applies where."""
    fix, op = st.fix, OPS[st.fix.op]
    block: dict[str, Any] = {
        "kind": fix.kind,
        "op": fix.op,
        "site": op.site,
        "hook": _HOOK_OF_SITE[op.site],
        "positions": "all",
        "layers": fix.layers,
        "heads": fix.heads,
        "targets": fix.targets,
        "strength": fix.strength,
        "formula": op.doc,
        "parameters": fix.n_parameters,
        "why": st.why,
    }
    if fix.lora is not None and st.training is not None:
        block.update(
            modules=[{"module": m.module, "layer": m.layer, "heads": m.heads, "in_features": m.in_features,
                      "out_features": m.out_features} for m in st.modules],
            rank=fix.lora.rank,
            scope=st.training.settings.scope,
            folded_strength=st.folded,
            loss=(
                f"(score(pressure) - score({st.baseline}, no adapter))^2 + {st.training.settings.kl_weight:g} * "
                f"KL(base || adapted) on {st.baseline} prompts and neutral text"
            ),
        )
    else:
        block.update(
            vectors=f"mean(pressure) - mean({st.baseline}) at the decision position, training split",
            means=f"mean({st.baseline}) at the decision position, training split",
        )
    return block


def to_artifact(st: Steering, lm: LoadedModel, att: Artifact, rec: Artifact, params: dict[str, Any]) -> Artifact:
    """Pack a steering result into a ``fix`` artifact.

    Tensors: ``vectors [n, width]``, ``means``, ``layers [n]``, ``heads [n]``
    (empty for a vector fix); for a lora fix, the adapter's A and B under
    PEFT's key names. The manifest's ``fix`` block says what is applied where:
    site, operation, targets, strength; ``sweep`` holds every strength tried;
    a lora fix adds ``training`` (settings and the loss at every step) and
    ``adapter_config`` (the PEFT config written beside it).
    """
    chosen = st.sweep[st.chosen]
    extra: dict[str, Any] = {}
    if st.fix.lora is not None and st.training is not None:
        from mechfix.adapter import hub_id, peft_config

        fan = any(m.fan_in_fan_out for m in st.modules)
        extra = {"training": st.training.as_dict(),
                 "adapter_config": peft_config(st.fix.lora, hub_id(lm.identity.get("source")), fan)}
    manifest = new_manifest(
        "fix",
        model=lm.identity,
        inputs={
            "attribution": {"path": att.path, "sha256": att.sha256},
            "record": {"path": rec.path, "sha256": rec.sha256},
            # The recipe the recording was made from: verify says whether its held-out split is the one left out here.
            "recipe": rec.manifest.get("inputs", {}).get("recipe", {}),
        },
        recipe=att.manifest.get("recipe"),
        shape={"layers": lm.n_layers, "heads": lm.n_heads, "head_dim": lm.head_dim, "hidden": lm.hidden},
        params=params,
        seed=rec.manifest.get("seed"),
        fix=_fix_block(st),
        budget={"max_kl": st.budget.max_kl, "min_clean_agreement": st.budget.min_clean_agreement},
        sweep=[p.as_dict() for p in st.sweep],
        chosen=chosen.as_dict(),
        **extra,
    )
    return Artifact(kind="fix", manifest=manifest, tensors=fix_tensors(st.fix))
