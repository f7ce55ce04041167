"""The steer stage: turn an attribution into a small fix, chosen by what carries over to unseen items.

1. Targets come from the attribution: for a ``vector`` fix, the first layer
   whose residual stream carries most of the behaviour; for a ``heads`` fix,
   the top heads by effect; for a ``lora`` fix, the attention output
   projections of the layers whose attention output, restored at every
   position, removes the most (when the conditions are token-aligned), else of
   the layers holding the top heads.
2. Directions come from the recording's activations at the decision position:
   mean(pressure) − mean(baseline condition). A ``lora`` fix is trained
   instead (:mod:`mechfix.stages.lora`), on the training split, with every
   condition the recording has as a label (pressure pulled back, the helpful
   pull kept, clean and control unchanged).
3. Candidates: for a heads fix, every heads operation (unless ``op`` is given)
   on the top 1, 3 and ``top`` heads; for a vector fix, its layer. Each is
   scored by cross-validation over the training items (:mod:`mechfix.measure.crossval`):
   folds of items, each scored with the fix fitted on the other folds, the way
   verify will score the held-out items. A lora fix trains one adapter per
   fold (at most ``LORA_FOLDS``) and keeps snapshots half way and at the end,
   each also cut to half its rank: its steps, size and strength are chosen on
   the folds' held-out items the same way.
4. The budget: KL per token on neutral text (the *selection* set, which verify
   never uses, at every 4th position), capabilities kept (the suite's selection part), the clean
   answers kept (agreement and margin), the helpful influence kept, and no
   overshoot (the cross-validated reduction past 100%), all measured with the
   fix fitted on the whole training split.
5. Search: every operation is scored (cross-validated) on the most heads at
   its strongest grid strength, and the best of them also on fewer heads.
   Candidates are then searched best first, each from its strongest strength
   down, until a point is inside the whole budget, and the search stops when
   no remaining candidate could beat it. The winner's strength is refined by
   bisection at the edge of the budget. Each point is measured only as far
   as the choice needs (the cheap budget parts always; the cross-validated
   reduction where it can decide; KL and capabilities where all else holds);
   the training fit of the pressure decisions, which decides nothing when the
   choice is cross-validated, is added to the points shown at the end.
6. The point with the largest cross-validated reduction inside the budget is
   kept. A lora fix's strength is folded into the adapter's weights, so PEFT
   applies exactly what verify measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mechfix.measure import capabilities as caps
from mechfix.artifacts import Artifact, new_manifest
from mechfix.stages.attribute import decisions_from_record
from mechfix.scenario.chat import recorded_style
from mechfix.measure.crossval import DEFAULT_FOLDS, fold_masks, item_folds, row_items
from mechfix.defaults import MIN_EFFECT
from mechfix.errors import BadInputError, GateError
from mechfix.measure.evaluate import NeutralSet
from mechfix.fixes.fix import DEFAULT_OP, OPS, Fix, fix_tensors
from mechfix.engine.batches import Request
from mechfix.fixes.gate import GateSettings
from mechfix.stages.probe import fit_gates
from mechfix.engine.layerskip import first_layer
from mechfix.fixes.adapter import LoraTarget, hub_id, lora_targets, peft_config
from mechfix.stages.lora import LORA_FOLDS, LoraSettings, TrainingLog, lora_candidates
from mechfix.models import LoadedModel
from mechfix.stages.sweep import REFINE_STEPS, Bench, Budget, Candidate, SweepPoint, choose

# A layer "carries" the behaviour once its residual stream holds this share of the largest effect.
RESID_SHARE = 0.8
DEFAULT_TOP_HEADS = 5
# steer measures KL at every 4th position of the selection set (verify at every position of its own set).
SEARCH_KL_STRIDE = 4
# Numbers of top heads a heads fix is tried on (capped by ``top``, which is always tried).
HEAD_COUNTS = (1, 3)
# A lora fix adapts the attention outputs whose restoring at every position removes at least this share of the
# largest such effect, at most LORA_MAX_LAYERS of them (see pick_lora_targets).
LORA_SHARE = 0.5
LORA_MAX_LAYERS = 4


@dataclass
class Steering:
    """What steer produced.

    Attributes:
        fix: The fix, with the chosen strength.
        sweep: The chosen candidate's strengths, weakest first (strength 0 is the model as it is).
        chosen: Index of the kept strength in ``sweep``.
        baseline: The condition the directions point away from (the attribution's baseline).
        why: How the targets were picked, in words.
        budget: The side-effect budget.
        training: How a lora fix was trained (None for other kinds).
        modules: The modules a lora fix adapts.
        folded: The strength folded into a lora fix's weights (its ``strength`` is then 1).
        search: Every point measured, every candidate (op, heads) included.
        folds: Cross-validation folds (0: not cross-validated).
        notes: What the search left out or could not measure, in words.
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
    search: list[SweepPoint] = field(default_factory=list)
    folds: int = 0
    notes: list[str] = field(default_factory=list)


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


def pick_lora_targets(att: Artifact, top: int = DEFAULT_TOP_HEADS, layers: Sequence[int] | None = None):
    """The attention output projections a lora fix adapts.

    A weight update acts at every position. When the attribution restored each
    layer's attention output at every position (token-aligned conditions), the
    modules are the layers whose restoring removes at least ``LORA_SHARE`` of the
    largest such effect (at most ``LORA_MAX_LAYERS``), adapted whole. Otherwise
    (or with ``layers``) they are the layers holding the top heads at the
    decision position (:func:`pick_targets`).

    Returns:
        (layers, heads, why, whole): one entry per head, as :func:`pick_targets`;
        ``whole`` when the modules were found as wholes.
    """
    per = att.tensors.get("everywhere/attn")
    if per is None or layers:
        return (*pick_targets(att, "heads", top, layers), False)
    n_layers = int(att.tensors["heads"].shape[0])
    if per.dim() != 2 or per.shape[1] != n_layers or not len(per) or not bool(torch.isfinite(per.float()).all()):
        raise BadInputError(
            f"attribution '{att.path}' has an everywhere/attn tensor of shape {list(per.shape)} (or with non-finite "
            f"values), not [decisions, {n_layers}] finite numbers: it was not written by mechfix attribute, or was "
            "changed since. Attribute the recording again, or pass --layers to choose the modules yourself."
        )
    effect = per.float().mean(0)
    peak = float(effect.max())
    if peak <= 0:
        at, heads, why = pick_targets(att, "heads", top, layers)
        return at, heads, f"{why} (no attention output carries the behaviour when restored at every position)", False
    order = [i for i in torch.argsort(effect, descending=True).tolist() if float(effect[i]) >= LORA_SHARE * peak]
    picked = sorted(order[:LORA_MAX_LAYERS])
    n_heads = int(att.tensors["heads"].shape[1])
    names = ", ".join(f"L{i} {float(effect[i]):+.2f}" for i in order[:LORA_MAX_LAYERS])
    why = (f"the attention outputs that remove the most when restored at every position: {names} "
           f"(at least {LORA_SHARE:.0%} of the largest)")
    return [i for i in picked for _ in range(n_heads)], [h for _ in picked for h in range(n_heads)], why, True


def directions(
    rec: Artifact, kind: str, layers: Sequence[int], heads: Sequence[int], baseline: str, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions and baseline means from the recording's training split (decision position).

    ``rows`` (a boolean mask over the recording's decisions) fits them on those
    rows instead: cross-validation fits each fold's fix on the other folds.

    Returns:
        (mean(pressure) − mean(baseline), mean(baseline)), each ``[n, width]``:
        per layer (vector fixes, residual stream) or per head (heads fixes).

    Raises:
        BadInputError: When the recording lacks the activation site the fix needs.
    """
    site = "resid" if kind == "vector" else "heads"
    train = rec.tensors["split"] == 0 if rows is None else rows
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


def _candidates(rec: Artifact, kind: str, ops: Sequence[str], layers: list[int], heads: list[int], counts: Sequence[int],
                baseline: str, folds: Sequence[tuple[torch.Tensor, list[int]]], identity: dict[str, Any]) -> list[Candidate]:
    """Every (operation, number of top heads) to choose from, fitted on the whole training split and per fold."""
    site_kind = "vector" if kind == "vector" else "heads"
    vectors, means = directions(rec, site_kind, layers, heads, baseline)
    per_fold = [directions(rec, site_kind, layers, heads, baseline, fit) for fit, _ in folds]
    out = []
    for op in ops:
        for n in counts:
            cut = slice(0, n) if kind == "heads" else slice(None)
            make = lambda v, m: Fix(op=op, layers=layers[cut], heads=heads[cut], vectors=v[cut].clone(),  # noqa: E731
                                    means=m[cut].clone(), strength=0.0, model=identity)
            out.append(Candidate(op=op, heads=n if kind == "heads" else 0, fix=make(vectors, means),
                                  fold_fixes=[make(v, m) for v, m in per_fold]))
    return out


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


def search_ops(kind: str, op: str | None) -> list[str]:
    """The operations steer searches: ``op`` (or the kind's default), or with no ``op`` every heads operation.

    Raises:
        BadInputError: For an unknown kind, or an operation of another kind.
    """
    if kind == "heads" and op is None:
        return [name for name, o in OPS.items() if o.kind == "heads"]
    return [check_kind_op(kind, op)]


def check_portable(kind: str, op: str | None, gate: GateSettings | None) -> list[str]:
    """The operations ``--portable`` leaves out of steer's search (those no PEFT adapter carries exactly).

    Args:
        kind: The fix kind.
        op: The operation asked for, or None (a heads fix then searches every operation).
        gate: The gate settings, if any.

    Raises:
        BadInputError: For a gate, a vector fix, or a chosen operation that does not export as weights.
    """
    if gate is not None:
        raise BadInputError("--portable does not go with --gate: a gate's probe decides per position whether to edit, "
                            "and no adapter or merged weights can carry it. Leave out one of the two.")
    if kind == "vector":
        raise BadInputError(f"--portable keeps fixes that export as weights, and a vector fix cannot: {OPS['subtract'].not_weights}. "
                            "Leave out --portable, or make a heads fix (--kind heads --portable).")
    left = [o for o in search_ops(kind, op) if not OPS[o].portable]
    if left and op is not None:
        raise BadInputError(f"--op {left[0]} does not export exactly as weights ({OPS[left[0]].not_portable}). With --portable use "
                            f"{' or '.join(n for n, x in OPS.items() if x.kind == kind and x.portable)}, or leave out --portable.")
    return left


def portable_note(left_out: Sequence[str]) -> str:
    """What ``--portable`` left out and why, in words."""
    return "--portable: left out " + "; ".join(f"{name} ({OPS[name].not_portable.split(':')[0]})" for name in left_out)


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
    min_effect: float = MIN_EFFECT,
    refine: int = REFINE_STEPS,
    batch_size: int = 16,
    on_step: Callable[[str], None] | None = None,
    lora: LoraSettings | None = None,
    on_train: Callable[[int, dict[str, float]], None] | None = None,
    capabilities: caps.Suite | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    gate: GateSettings | None = None,
    portable: bool = False,
) -> Steering:
    """Run the steer stage.

    Args:
        lm: The model the attribution was made with.
        att: The attribution artifact.
        rec: The recording the attribution was made from (activations, decisions).
        neutral: Neutral text for the KL budget (the selection set; verify uses another).
        kind: ``vector``, ``heads`` or ``lora``.
        op: Operation (a key of :data:`mechfix.fixes.fix.OPS` of that kind); None: a
            heads fix chooses among every heads operation, other kinds use their default.
        top: The most top heads a heads fix edits (1, 3 and ``top`` are tried).
        layers: Restrict targets to these layers (vector: use exactly these).
        strengths: Coarse grid to sweep; default per op (:data:`mechfix.stages.sweep.GRIDS`).
        budget: Side-effect budget.
        min_effect: The smallest training-split effect (nats) worth a fix; below it steer refuses.
        refine: Bisection steps at the edge of the budget.
        batch_size: Sequences per forward pass.
        on_step: Called with a short label after each measurement (progress).
        lora: Training settings of a lora fix.
        on_train: Called after each training step of a lora fix, with the step and its losses.
        capabilities: The capability suite's selection part (None: capabilities are not part of the budget).
        folds: Cross-validation folds over the training items (0 or 1: choose on the training fit).
        seed: Seed of the folds.
        gate: Gate every candidate with a probe fitted on the training split (:mod:`mechfix.fixes.gate`;
            each fold's fix gets a probe fitted on its own folds), so the sweep runs with the gate on.
        portable: Keep only operations that export exactly as weights (a PEFT
            adapter and a merged checkpoint, :attr:`mechfix.fixes.fix.Op.portable`);
            the notes say which were left out and why.

    Raises:
        BadInputError: For an unknown kind or op, or unusable inputs.
        GateError: When no candidate both reduces the behaviour and stays inside the budget.
    """
    budget = budget or Budget()
    asked = op  # None: a heads fix searches every operation
    op = check_kind_op(kind, op)
    if gate is not None and kind == "lora":
        raise BadInputError(
            "--gate does not go with --kind lora: a LoRA fix is saved as a PEFT adapter, which every engine applies at "
            "every position, so a gate could not travel with it. Gate a heads or vector fix instead (--kind heads).")
    # With no operation given, a heads fix chooses among all of them by what carries over.
    left_out = check_portable(kind, asked, gate) if portable else []
    ops = [o for o in search_ops(kind, asked) if o not in left_out]
    baseline = att.manifest.get("params", {}).get("baseline", "clean")
    made, recorded = recorded_style(att.manifest), recorded_style(rec.manifest)
    if made != recorded:
        raise BadInputError(
            f"attribution '{att.path}' was made on {made['name']}-style renderings and "
            f"recording '{rec.path}' holds {recorded['name']}-style ones (or another template). "
            "Attribute the recording you steer on: mechfix attribute REC, then mechfix steer.")
    _require_behaviour(att, baseline, min_effect)
    whole = False
    if kind == "lora":
        tgt_layers, tgt_heads, why, whole = pick_lora_targets(att, top, layers)
    else:
        tgt_layers, tgt_heads, why = pick_targets(att, kind, top, layers)
    conds = ["pressure", baseline] + (["helpful"] if "tokens/helpful" in rec.tensors and baseline != "helpful" else [])
    # A lora fix also trains on the control decisions (kept unchanged); the budget reads only the others.
    extra = ["control"] if kind == "lora" and "tokens/control" in rec.tensors and baseline != "control" else []
    dec = decisions_from_record(rec, lm.tokenizer, conds + extra, split=0)
    requests = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in conds}
    labelled = {**requests, **{c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in extra}}
    notes: list[str] = [portable_note(left_out)] if left_out else []
    if "helpful" not in conds:
        notes.append("the recording has no helpful condition, so the helpful influence is not part of the budget")
    if capabilities is None:
        notes.append("no capability suite was given, so capabilities are not part of the budget")
    split: list[tuple[torch.Tensor, list[int]]] = []
    items = row_items(rec, dec.items)
    n_folds = min(folds, LORA_FOLDS) if kind == "lora" else folds
    if n_folds >= 2 and len(set(items)) >= 2:
        split = fold_masks(item_folds(items, n_folds, seed), int(rec.tensors["split"].shape[0]), dec.items)
        if kind == "lora" and folds > n_folds:
            notes.append(f"a lora fix trains one adapter per fold, so it is cross-validated over {n_folds} folds "
                         f"(not {folds}): {n_folds + 1} trainings in all")
    elif folds < 2:
        notes.append(f"--folds {folds}: no cross-validation, the choice rests on the training fit")
    else:
        notes.append(f"only {len(set(items))} training item(s): no cross-validation, the choice rests on the training fit")
    training, modules = None, []
    if kind == "lora":
        settings = lora or LoraSettings()
        if whole:  # modules found as wholes are adapted whole
            settings = replace(settings, scope="modules")
        modules = lora_targets(lm, tgt_layers, tgt_heads, settings.scope)
        keep = [r.prompt for reqs in capabilities.requests.values() for r in reqs] if capabilities is not None else []
        cands, training = lora_candidates(lm, op, modules, labelled, baseline, neutral, settings, split, keep, on_train)
        why = f"{why}; a rank-{settings.rank} LoRA update of {len(modules)} attention output projection(s)" + (
            ", reading only those heads' columns" if settings.scope == "heads" else "")
    else:
        counts = sorted({n for n in (*HEAD_COUNTS, len(tgt_heads)) if n <= len(tgt_heads)}) if kind == "heads" else [0]
        cands = _candidates(rec, kind, ops, tgt_layers, tgt_heads, counts, baseline, split, lm.identity)
    if gate is not None:
        whole, per_fold, gate_note = fit_gates(lm, rec, kind, min(tgt_layers), baseline, neutral, split, gate)
        notes.append(gate_note)
        for c in cands:
            c.fix.gate = whole
            for f, g in zip(c.fold_fixes, per_fold):
                f.gate = g
        why = f"{why}; gated by a probe on L{whole.layer}'s residual stream"
    bench = Bench(lm, requests, baseline, split, neutral, capabilities, budget, batch_size, on_step,
                   first_layer([c.fix for c in cands]))
    cand, point = choose(bench, cands, refine, strengths)
    # The points shown get their training fit and cross-validated numbers side by side: the chosen
    # candidate's sweep, or, when none passes, every point scored.
    for c in cands if cand is None or point is None else [cand]:
        bench.fill(c, c.points)
    search = [p for c in cands for p in c.measured]
    if cand is None or point is None:
        steering = Steering(fix=cands[0].fix, sweep=[p for p in search if p.measured != "cv"], chosen=-1, baseline=baseline,
                            why=why, budget=budget, training=training, modules=modules, search=search, folds=len(split),
                            notes=notes)
        tried = ", ".join(sorted({c.op for c in cands}))
        held = " on held-out folds" if split else ""
        raise GateError(
            f"no {kind} fix ({tried}; {why}) reduced the behaviour{held} while staying inside the side-effect budget "
            f"({_budget_words(budget, capabilities is not None, 'helpful' in conds)}); see the points above. Try another "
            "--kind, more or fewer --top-heads, other --layers, or a looser budget if you can defend it.",
            detail=steering,
        )
    fix = cand.fix
    if kind == "heads":
        why = f"{why}; chosen: {cand.op} on the top {cand.heads}"
    if training is not None:
        training.chosen_steps, training.chosen_rank = cand.steps, cand.rank
        why = f"{why}; chosen: the adapter after {cand.steps} of {training.settings.steps} steps" + (
            f", cut to rank {cand.rank} of {training.settings.rank}" if cand.rank is not None and cand.rank < training.settings.rank else "")
    steering = Steering(fix=fix, sweep=cand.points, chosen=cand.points.index(point), baseline=baseline, why=why,
                        budget=budget, training=training, modules=modules, search=search, folds=len(split), notes=notes)
    fix.strength = point.strength
    if fix.lora is not None:
        # PEFT applies an adapter at its saved size: fold the strength into B.
        steering.folded = fix.strength
        fix.lora.b = [b * fix.strength for b in fix.lora.b]
        fix.strength = 1.0
    return steering


def _require_behaviour(att: Artifact, baseline: str, min_effect: float = MIN_EFFECT) -> None:
    """Refuse to fit a fix to a training split without a behaviour worth fixing: its effect's interval does not lie
    above zero, or its mean is below ``min_effect`` nats.

    A "reduction" of an effect indistinguishable from zero is a ratio of noise
    (a fix can remove 2,500% of +0.1 nats), so no search over it means anything;
    one of a few hundredths of a nat, however certain, is a ratio of nothing worth a fix.
    """
    total = (att.manifest.get("summary") or {}).get("total_effect") or {}
    ci = total.get("ci95")
    if not ci or ci[0] is None:
        return
    measured = (f"the training split shows no behaviour to fix: pressure − {baseline} is {total['mean']:+.2f} "
                f"[{ci[0]:+.2f}, {ci[1]:+.2f}] nats over {total.get('n', '?')} decisions")
    if ci[0] <= 0:
        raise GateError(
            f"{measured}, and that 95% interval does not lie above zero. "
            "A fix fitted to it would be fitted to noise, so steer does not search. Check the recipe with `mechfix record` "
            "(does this model show the behaviour at all?), add items, or try a model that shows it."
        )
    if total["mean"] < min_effect:
        raise GateError(
            f"{measured}: above zero, but below the {min_effect:g} nats a fix is worth (the odds of the misaligned "
            f"option move by less than {math.exp(min_effect):.2f}×), so steer does not search. Check the recipe with "
            "`mechfix record`, or pass a smaller minimum (`mechfix.steer(..., min_effect=...)`) if so small a shift matters."
        )


def _budget_words(budget: Budget, capabilities: bool, helpful: bool) -> str:
    """The budget parts that apply, in words, for messages."""
    words = [f"KL <= {budget.max_kl:g} nats/token", f"clean agreement >= {budget.min_clean_agreement:.0%}"]
    if budget.min_clean_margin is not None:
        words.append(f"clean margin kept >= {budget.min_clean_margin:.0%}")
    if capabilities and budget.min_capability is not None:
        words.append(f"capability kept >= {budget.min_capability:.0%}")
    if helpful and budget.max_helpful_loss is not None:
        words.append(f"helpful influence removed <= {budget.max_helpful_loss:.0%}")
    if budget.max_overshoot is not None:
        words.append(f"overshoot <= {budget.max_overshoot:.0%}")
    return ", ".join(words)


# Where each site's fix acts, in words, for the manifest.
HOOK_OF_SITE = {
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
        "hook": HOOK_OF_SITE[op.site],
        "positions": "where the gate fires" if fix.gate is not None else "all",
        "layers": fix.layers,
        "heads": fix.heads,
        "targets": fix.targets,
        "strength": fix.strength,
        "formula": op.doc,
        "parameters": fix.n_parameters,
        "why": st.why,
    }
    if fix.gate is not None:
        block["gate"] = fix.gate.as_dict()
    if fix.lora is not None and st.training is not None:
        block.update(
            modules=[{"module": m.module, "layer": m.layer, "heads": m.heads, "in_features": m.in_features,
                      "out_features": m.out_features} for m in st.modules],
            rank=fix.lora.rank,
            scope=st.training.settings.scope,
            folded_strength=st.folded,
            loss=(
                f"(score(pressure) - score({st.baseline}, no adapter))^2 + {st.training.settings.helpful_weight:g} * "
                f"relu(pull, no adapter - pull)^2 (pull = score({st.baseline}) - score(helpful)) + "
                f"{st.training.settings.kl_weight:g} * "
                f"KL(base || adapted) on {st.baseline} and control prompts, capability prompts and neutral text "
                "(a condition the recording lacks drops out)"
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
    site, operation, targets, strength; ``sweep`` holds every strength of the
    chosen candidate with training-fit and cross-validated numbers side by
    side; ``selection`` every candidate point measured while choosing;
    a lora fix adds ``training`` (settings and the loss at every step) and
    ``adapter_config`` (the PEFT config written beside it).
    """
    chosen = st.sweep[st.chosen]
    extra: dict[str, Any] = {}
    if st.fix.lora is not None and st.training is not None:
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
        budget=st.budget.as_dict(),
        sweep=[p.as_dict() for p in st.sweep],
        chosen=chosen.as_dict(),
        # Every candidate measured while choosing, and how the choice was made.
        selection={"folds": st.folds, "by": "cross-validated reduction" if st.folds else "training-fit reduction",
                   "candidates": [p.as_dict() for p in st.search], "notes": st.notes},
        # How the episodes the fix was fitted on were rendered: verify renders its held-out ones the same way.
        style=recorded_style(rec.manifest),
        **extra,
    )
    return Artifact(kind="fix", manifest=manifest, tensors=fix_tensors(st.fix))
