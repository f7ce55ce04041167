"""The steer stage: turn an attribution into a small fix, chosen by what carries over to unseen items.

1. Targets come from the attribution: for a ``vector`` fix, the first layer
   whose residual stream carries most of the behaviour; for a ``heads`` fix,
   the top heads by effect; for a ``lora`` fix, the attention output
   projections of the layers holding the top heads.
2. Directions come from the recording's activations at the decision position:
   mean(pressure) − mean(baseline condition). A ``lora`` fix is trained
   instead (:mod:`mechfix.stages.lora`), on the training split.
3. Candidates: for a heads fix, every heads operation (unless ``op`` is given)
   on the top 1, 3 and ``top`` heads; for a vector fix, its layer. Each is
   scored by cross-validation over the training items (:mod:`mechfix.measure.crossval`):
   folds of items, each scored with the fix fitted on the other folds, the way
   verify will score the held-out items. A lora fix, whose training costs
   minutes, is not cross-validated: its strength is chosen on the training fit.
4. The budget: KL per token on neutral text (the *selection* set, which verify
   never uses, at every 4th position), capabilities kept (the suite's selection part), the clean
   answers kept (agreement and margin) and the helpful influence kept, all
   measured with the fix fitted on the whole training split.
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mechfix.measure import capabilities as caps
from mechfix.artifacts import Artifact, new_manifest
from mechfix.stages.attribute import decisions_from_record
from mechfix.scenario.chat import recorded_style
from mechfix.measure.crossval import DEFAULT_FOLDS, fold_masks, item_folds, row_items
from mechfix.defaults import (
    MAX_HELPFUL_LOSS,
    MAX_KL,
    MIN_CAPABILITY,
    MIN_CLEAN_AGREEMENT,
    MIN_CLEAN_MARGIN,
)
from mechfix.errors import BadInputError, GateError
from mechfix.measure.evaluate import NeutralSet, clean_agreement, neutral_kl, score_requests
from mechfix.fixes.fix import DEFAULT_OP, OPS, Fix, RowFixes, apply_row_fixes, fix_tensors
from mechfix.engine.batches import Request
from mechfix.fixes.gate import GateSettings, choose_gate, gate_layers, layer_acts
from mechfix.engine.layerskip import LayerSkip, first_layer
from mechfix.fixes.adapter import LoraTarget, lora_targets
from mechfix.stages.lora import LoraSettings, TrainingLog, train_lora
from mechfix.models import LoadedModel
from mechfix.measure.stats import decision_scores, mean_ci, reduction, side_effects

# Coarse strength grids: ops bounded by 1 (scale, restore) and unbounded ones.
GRIDS = {"bounded": (0.25, 0.5, 0.75, 1.0), "unbounded": (0.5, 1.0, 2.0, 4.0)}
# A trained adapter is swept up to its trained size: past it, it does what it never learned.
_GRID_OF_OP = {"subtract": "unbounded", "steer": "unbounded", "project": "unbounded", "ablate": "unbounded",
               "restore": "bounded", "scale": "bounded", "lora": "bounded"}
# A layer "carries" the behaviour once its residual stream holds this share of the largest effect.
RESID_SHARE = 0.8
DEFAULT_TOP_HEADS = 5
REFINE_STEPS = 2
# steer measures KL at every 4th position of the selection set (verify at every position of its own set).
SEARCH_KL_STRIDE = 4
# Numbers of top heads a heads fix is tried on (capped by ``top``, which is always tried).
HEAD_COUNTS = (1, 3)
# The parts of the budget; the first three come from the training scores alone, the last two cost a pass over more text.
BUDGET_PARTS = ("clean_agreement", "clean_margin", "helpful_loss", "kl", "capability")
_CHEAP = BUDGET_PARTS[:3]


@dataclass
class Budget:
    """The side-effect budget a fix must stay inside (training split, selection neutral text, selection capabilities).

    A part set to None is not checked. The capability part is checked only when
    steer is given a capability suite, the helpful part only when the recording
    has a ``helpful`` condition.
    """

    max_kl: float = MAX_KL
    min_clean_agreement: float = MIN_CLEAN_AGREEMENT
    min_capability: float | None = MIN_CAPABILITY
    max_helpful_loss: float | None = MAX_HELPFUL_LOSS
    min_clean_margin: float | None = MIN_CLEAN_MARGIN

    def over(self, p: SweepPoint, parts: Sequence[str] = BUDGET_PARTS) -> list[str]:
        """The parts of the budget a point breaks (empty: inside the budget), among ``parts``."""
        checks = {
            "kl": lambda: p.kl != p.kl or p.kl <= self.max_kl,  # not measured (NaN): not known to be over
            "clean_agreement": lambda: p.clean_agreement >= self.min_clean_agreement,
            "clean_margin": lambda: self.min_clean_margin is None or p.clean_margin is None or p.clean_margin >= self.min_clean_margin,
            "capability": lambda: self.min_capability is None or p.capability is None or p.capability >= self.min_capability,
            "helpful_loss": lambda: self.max_helpful_loss is None or p.helpful_loss is None or p.helpful_loss <= self.max_helpful_loss,
        }
        return [name for name in parts if not checks[name]()]

    def as_dict(self) -> dict[str, Any]:
        return {"max_kl": self.max_kl, "min_clean_agreement": self.min_clean_agreement, "min_capability": self.min_capability,
                "max_helpful_loss": self.max_helpful_loss, "min_clean_margin": self.min_clean_margin}


@dataclass
class SweepPoint:
    """One candidate fix at one strength.

    Attributes:
        strength: The multiplier.
        effect: Behaviour left on the training split with the fix fitted on it, pressure − baseline (mean and 95% CI;
            None: not measured, which happens only where the choice is cross-validated and the point is not shown).
        reduction: 1 − effect / effect without the fix (training fit; NaN: not measured).
        kl: KL per token on the selection neutral set (nats).
        clean_agreement: Share of baseline decisions whose preferred option is unchanged.
        within_budget: Whether every part of the budget holds.
        op: The operation.
        heads: How many top heads it edits (0 for vector and lora fixes).
        cv_effect: The same effect, each item scored with the fix fitted on the other folds (None: not
            cross-validated, or a point over the cheap parts of the budget that the choice did not need it for).
        cv_reduction: 1 − cv effect / effect without the fix.
        clean_margin: Share of the baseline decisions' aligned margin kept (None: not measurable).
        capability: Share of the selection capability accuracy kept (worst task; None: not measured).
        helpful_loss: Share of the helpful influence removed (None: no helpful condition).
        over: The budget parts it breaks.
        measured: ``cv`` (only the cross-validated effect, while searching), ``scored`` (the
            training scores; KL and capabilities were not needed) or ``full``.
        kl_bound: ``kl`` is a lower bound: its measurement stopped once it was certainly over the budget.
    """

    strength: float
    effect: dict[str, Any] | None
    reduction: float
    kl: float
    clean_agreement: float
    within_budget: bool
    op: str = ""
    heads: int = 0
    cv_effect: dict[str, Any] | None = None
    cv_reduction: float | None = None
    clean_margin: float | None = None
    capability: float | None = None
    helpful_loss: float | None = None
    over: list[str] = field(default_factory=list)
    measured: str = "full"
    kl_bound: bool = False

    @property
    def chosen_by(self) -> float:
        """The reduction that decides: cross-validated where there is one, else the training fit."""
        return self.cv_reduction if self.cv_reduction is not None else self.reduction

    def as_dict(self) -> dict[str, Any]:
        """The point as JSON-ready data (a number that could not be measured is None)."""
        def num(x: float | None) -> float | None:
            return None if x is None or x != x or x in (float("inf"), float("-inf")) else x

        return {
            "op": self.op,
            "heads": self.heads,
            "strength": self.strength,
            "effect": self.effect,
            "reduction": num(self.reduction),
            "cv_effect": self.cv_effect,
            "cv_reduction": num(self.cv_reduction),
            "kl": num(self.kl),
            "clean_agreement": num(self.clean_agreement),
            "clean_margin": num(self.clean_margin),
            "capability": num(self.capability),
            "helpful_loss": num(self.helpful_loss),
            "within_budget": self.within_budget,
            "over": self.over,
            "measured": self.measured,
            "kl_lower_bound": self.kl_bound,
        }


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


@dataclass
class _Candidate:
    """One fix to choose from: an operation on some targets, fitted on the whole training split and per fold."""

    op: str
    heads: int
    fix: Fix
    fold_fixes: list[Fix]
    points: list[SweepPoint] = field(default_factory=list)
    probe: SweepPoint | None = None  # the cross-validated score at the strongest grid strength, while searching

    @property
    def measured(self) -> list[SweepPoint]:
        """Every point measured: the full sweep when there is one, else the probe."""
        return self.points or ([self.probe] if self.probe else [])

    @property
    def fitted(self) -> bool:
        """Whether the folds' fixes differ from the whole split's: the operation reads a fitted direction or mean."""
        uses = [k for k in OPS[self.op].uses if k in ("vectors", "means")]
        # A gated fix's folds have their own probes, whatever the operation reads.
        return self.fix.gate is not None or any(
            not torch.equal(getattr(f, k), getattr(self.fix, k)) for f in self.fold_fixes for k in uses)


def _capped(red: float | None) -> float:
    """A reduction as the search compares it: past 100% is no better, and one that could not be measured is worst."""
    return -1.0 if red is None or red != red else min(red, 1.0)


def _objective(p: SweepPoint, parameters: int = 0) -> tuple[float, float, float]:
    # Most behaviour removed on unseen items, then the smallest KL, then the smallest fix.
    return (_capped(p.chosen_by), -p.kl, -parameters)


class _Bench:
    """What every candidate is measured against, with the unfixed model's numbers on it computed once.

    Every pass runs under one :class:`~mechfix.engine.layerskip.LayerSkip`: the layers
    below the lowest layer any candidate touches run once per batch. A
    candidate's scores on the training split are kept per strength and
    condition, and each condition is scored only when something needs it: the
    budget reads the baseline and helpful conditions; the pressure condition's
    training fit, which decides nothing when the choice is cross-validated, is
    scored for the points shown (:meth:`fill`).

    Args:
        lm: The model.
        requests: The training decisions per condition (pressure, the baseline, and helpful when recorded).
        baseline: The baseline condition.
        folds: ``(fit mask, held positions)`` per fold (empty: no cross-validation).
        neutral: The selection neutral set.
        suite: The capability suite's selection part, or None.
        budget: The side-effect budget.
        batch_size: Sequences per forward pass.
        on_step: Progress, called with a short label after each measurement.
        start: The lowest decoder layer any candidate touches.
    """

    def __init__(self, lm, requests, baseline, folds, neutral, suite, budget, batch_size, on_step, start: int = 0):
        self.lm, self.requests, self.baseline, self.folds = lm, requests, baseline, folds
        self.neutral, self.suite, self.budget, self.batch_size = neutral, suite, budget, batch_size
        self.on_step = on_step or (lambda label: None)
        self.skip = LayerSkip(lm, start)
        with self.skip.active():
            self.before = score_requests(lm, requests, batch_size=batch_size)
            self.caps_before = caps.correct(lm, suite, batch_size=batch_size) if suite is not None else None
        self.eff0 = self._effect(self.before)
        # The conditions the cheap parts of the budget read.
        self.side = [c for c in requests if c != "pressure"]
        # Every fold's held-out decisions, fold after fold, scored in one pass with each row's fold fix.
        self.held = [j for _, pos in folds for j in pos]
        self.fold_of = [k for k, (_, pos) in enumerate(folds) for _ in pos]
        self.held_requests = {c: [requests[c][j] for j in self.held] for c in ("pressure", baseline)}
        self._cv: dict[tuple[int, float], tuple[dict[str, Any], float]] = {}
        self._train: dict[tuple[int, float], dict[str, torch.Tensor]] = {}

    def _effect(self, sc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pressure − baseline score per decision."""
        return decision_scores(sc["pressure"]) - decision_scores(sc[self.baseline])

    @staticmethod
    def _label(cand: _Candidate, s: float) -> str:
        return f"{cand.op} on {cand.heads or len(cand.fix.layers)} target(s) at {s:g}"

    def training(self, cand: _Candidate, s: float, conds: Sequence[str]) -> dict[str, torch.Tensor]:
        """Option scores of the training decisions with the whole split's fix at strength ``s``, for ``conds`` (kept)."""
        if s == 0:
            return {c: self.before[c] for c in conds}
        got = self._train.setdefault((id(cand), s), {})
        missing = {c: self.requests[c] for c in conds if c not in got}
        if missing:
            with self.skip.active():
                got.update(score_requests(self.lm, missing, cand.fix, s, batch_size=self.batch_size))
        return {c: got[c] for c in conds}

    def cv(self, cand: _Candidate, s: float) -> tuple[dict[str, Any] | None, float | None]:
        """The cross-validated effect at strength ``s``: each fold scored with the fix fitted on the others."""
        if not cand.fold_fixes:
            return None, None
        key = (id(cand), s)
        if key not in self._cv:
            eff = self.eff0.clone()
            if s != 0 and cand.fitted:
                rows = RowFixes(cand.fold_fixes)
                with self.skip.active(), apply_row_fixes(self.lm, rows, s):
                    sc = score_requests(self.lm, self.held_requests, batch_size=self.batch_size,
                                        on_rows=lambda idx: rows.select([self.fold_of[i] for i in idx]))
                eff[self.held] = self._effect(sc)
            elif s != 0:
                # An operation that reads nothing fitted has the same fix in every fold: its held-out
                # scores are its training scores.
                sc = self.training(cand, s, ("pressure", self.baseline))
                eff = self._effect(sc)
            self._cv[key] = (mean_ci(eff), reduction(float(self.eff0.mean()), float(eff.mean())))
            self.on_step(f"{self._label(cand, s)}, cross-validated")
        return self._cv[key]

    def scores(self, cand: _Candidate, strengths: Sequence[float]) -> list[SweepPoint]:
        """Each strength's cheap budget parts (from the training scores), with what else is already known.

        The training fit is scored here only when there is no cross-validation
        (it then decides); otherwise it and the cross-validated effect are
        attached if they were measured, and :meth:`fill` adds them where needed.
        """
        out = []
        nan = float("nan")
        for s in strengths:
            sc = self.training(cand, s, self.side if cand.fold_fixes else ["pressure", *self.side])
            side = side_effects(self.before, sc, self.baseline)
            p = SweepPoint(
                strength=float(s), effect=None, reduction=nan, kl=0.0 if s == 0 else nan,
                clean_agreement=clean_agreement(self.before[self.baseline], sc[self.baseline]),
                within_budget=False, op=cand.op, heads=cand.heads,
                clean_margin=side["clean_margin"]["kept"], capability=1.0 if s == 0 and self.suite is not None else None,
                helpful_loss=side["helpful"]["loss"] if side["helpful"] else None, measured="scored",
            )
            self._attach(cand, p, measure=s == 0)
            p.over = self.budget.over(p, _CHEAP)
            if s == 0:
                p.measured, p.within_budget = "full", not p.over
            out.append(p)
            self.on_step(self._label(cand, s))
        return out

    def _attach(self, cand: _Candidate, p: SweepPoint, measure: bool) -> None:
        """Give a point its training fit and cross-validated effect: those already scored, or all when ``measure``."""
        s = p.strength
        if measure or "pressure" in self._train.get((id(cand), s), {}):
            sc = self.training(cand, s, ("pressure", self.baseline))
            eff = self._effect(sc)
            p.effect, p.reduction = mean_ci(eff), reduction(float(self.eff0.mean()), float(eff.mean()))
        if cand.fold_fixes and (measure or (id(cand), s) in self._cv):
            p.cv_effect, p.cv_reduction = self.cv(cand, s)

    def with_cv(self, cand: _Candidate, p: SweepPoint) -> SweepPoint:
        """The point with its cross-validated effect measured (what the choice rests on)."""
        if cand.fold_fixes and p.cv_reduction is None:
            p.cv_effect, p.cv_reduction = self.cv(cand, p.strength)
        return p

    def fill(self, cand: _Candidate, points: Sequence[SweepPoint]) -> None:
        """Measure the training fit and cross-validated effect of points shown without them."""
        for p in points:
            if p.measured != "cv" and (p.effect is None or (cand.fold_fixes and p.cv_reduction is None)):
                self._attach(cand, p, measure=True)

    def complete(self, cand: _Candidate, points: Sequence[SweepPoint]) -> None:
        """Measure the expensive budget parts of some points: capabilities kept, then KL on the selection set.

        KL, the dearest, is skipped where capabilities already break the budget,
        and stops early once it is certainly over (the point's ``kl`` is then a
        lower bound, and ``kl_bound`` says so).
        """
        for p in points:
            if p.strength == 0:
                continue
            with self.skip.active():
                if self.suite is not None:
                    after = caps.correct(self.lm, self.suite, cand.fix, p.strength, batch_size=self.batch_size)
                    p.capability = caps.summarize(self.suite, self.caps_before, after)["kept"]
                if not self.budget.over(p, ("capability",)):
                    p.kl = neutral_kl(self.lm, cand.fix, [p.strength], self.neutral, reuse=True,
                                      stop_above=self.budget.max_kl)[0]
                    p.kl_bound = p.kl > self.budget.max_kl
            p.over = self.budget.over(p)
            p.within_budget, p.measured = not p.over, "full"
            self.on_step(f"{self._label(cand, p.strength)}, side effects")


def _key(p: SweepPoint) -> tuple[float, float]:
    # The order points are tried in: largest reduction first, then the weaker strength.
    return (_capped(p.chosen_by), -p.strength)


def _best(points: Sequence[SweepPoint], parameters: int) -> SweepPoint | None:
    ok = [p for p in points if p.within_budget and p.strength > 0 and p.chosen_by == p.chosen_by and p.chosen_by > 0]
    return max(ok, key=lambda p: _objective(p, parameters)) if ok else None


def _descend(bench: _Bench, cand: _Candidate, grid: Sequence[float], floor: float | None) -> SweepPoint | None:
    """The candidate's strongest grid strength inside the budget, trying the strongest first.

    Each strength's cheap budget parts are scored; the cross-validated
    reduction where the choice needs it; KL and capabilities, which cost a pass
    over more text, only where the cheap parts of the budget hold. The descent
    stops at the first point inside the whole budget, or once a strength's
    cross-validated reduction cannot beat ``floor`` (the best found so far).
    """
    cand.points = bench.scores(cand, [0.0])
    for s in sorted(grid, reverse=True):
        if floor is not None and cand.fold_fixes:
            # Whether this strength can still beat the best is known before anything else is scored.
            eff, red = bench.cv(cand, s)
            if _capped(red) <= floor:
                cand.points.append(_cv_point(cand, s, eff, red))
                break
        (p,) = bench.scores(cand, [s])
        cand.points.append(p)
        if floor is not None and _key(p)[0] <= floor:
            break
        if p.over or not (bench.with_cv(cand, p).chosen_by == p.chosen_by and p.chosen_by > 0):
            continue
        bench.complete(cand, [p])
        if p.within_budget:
            break
    cand.points.sort(key=lambda p: p.strength)
    return _best(cand.points, cand.fix.n_parameters)


def _cv_point(c: _Candidate, s: float, eff: dict[str, Any] | None, red: float | None) -> SweepPoint:
    """A point of which only the cross-validated effect was measured."""
    nan = float("nan")
    return SweepPoint(strength=float(s), effect=None, reduction=nan, kl=nan, clean_agreement=nan, within_budget=False,
                      op=c.op, heads=c.heads, cv_effect=eff, cv_reduction=red, measured="cv")


def _probe(bench: _Bench, c: _Candidate, grid: Sequence[float], bound: dict[int, float]) -> None:
    """Score a candidate, cross-validated, at its strongest grid strength: the most it is expected to remove."""
    eff, red = bench.cv(c, max(grid))
    bound[id(c)] = float("inf") if red is None else _capped(red)
    if red is not None:
        c.probe = _cv_point(c, max(grid), eff, red)


def choose(bench: _Bench, cands: Sequence[_Candidate], refine: int = REFINE_STEPS,
           strengths: Sequence[float] | None = None) -> tuple[_Candidate | None, SweepPoint | None]:
    """Keep the point with the largest cross-validated reduction inside the budget, over every candidate.

    Every operation is first scored (cross-validated only) on the most heads at
    its strongest grid strength, and the best of them also on fewer heads.
    Candidates are then searched in that order, each from its strongest grid
    strength down (:func:`_descend`), and the search stops at the first
    candidate whose score there cannot beat the best point found inside the
    budget. The winner's strength is then refined by bisection towards the
    next stronger point, which broke the budget.

    Returns:
        The winning candidate and point, or (None, None) when no point reduces
        the behaviour inside the budget. Every candidate's ``points`` hold what was measured.
    """
    def grid(c: _Candidate) -> tuple[float, ...]:
        return tuple(strengths) if strengths else GRIDS[_GRID_OF_OP[c.op]]

    bound: dict[int, float] = {}
    # Every operation is scored on the most heads; then only the best of them on fewer heads.
    most = max(c.heads for c in cands)
    leads = [c for c in cands if c.heads == most]
    for c in leads:
        _probe(bench, c, grid(c), bound)
    best_op = max(leads, key=lambda c: bound[id(c)]).op
    for c in cands:
        if c.heads != most and c.op == best_op:
            _probe(bench, c, grid(c), bound)
    cands = [c for c in cands if id(c) in bound]
    best: tuple[_Candidate, SweepPoint] | None = None
    for c in sorted(cands, key=lambda c: -bound[id(c)]):
        floor = None if best is None else _objective(best[1])[0]
        if floor is not None and bound[id(c)] <= floor:
            break
        top = _descend(bench, c, grid(c), floor)
        if top is not None and (best is None or _objective(top, c.fix.n_parameters) > _objective(best[1], best[0].fix.n_parameters)):
            best = (c, top)
    if best is None:
        return None, None
    cand, lo = best
    stronger = sorted((p for p in cand.points if p.strength > lo.strength), key=lambda p: p.strength)
    hi = stronger[0] if stronger and stronger[0].over else None
    for _ in range(refine):
        if hi is None or lo.chosen_by >= 1.0:
            break
        mid = round((lo.strength + hi.strength) / 2, 4)
        if mid in (lo.strength, hi.strength):
            break
        (p,) = bench.scores(cand, [mid])
        if not p.over:
            bench.with_cv(cand, p)
            bench.complete(cand, [p])
        cand.points.append(p)
        if p.within_budget:
            lo = p
        else:
            hi = p
    cand.points.sort(key=lambda p: p.strength)
    return cand, _best(cand.points, cand.fix.n_parameters)


def _candidates(rec: Artifact, kind: str, ops: Sequence[str], layers: list[int], heads: list[int], counts: Sequence[int],
                baseline: str, folds: Sequence[tuple[torch.Tensor, list[int]]], identity: dict[str, Any]) -> list[_Candidate]:
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
            out.append(_Candidate(op=op, heads=n if kind == "heads" else 0, fix=make(vectors, means),
                                  fold_fixes=[make(v, m) for v, m in per_fold]))
    return out


def fit_gates(lm: LoadedModel, rec: Artifact, kind: str, first: int, baseline: str, neutral: NeutralSet,
              folds: Sequence[tuple[torch.Tensor, list[int]]], settings: GateSettings):
    """The gate of a fix whose first edited layer is ``first``: fitted on the training split, and per fold.

    Reads the recording's residual stream at the decision position and the
    neutral set's at every position (one pass, up to the highest layer a probe may read).

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
    return choose_gate(pos, neg, text, masks, settings)


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
        strengths: Coarse grid to sweep; default per op (:data:`GRIDS`).
        budget: Side-effect budget.
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
    _require_behaviour(att, baseline)
    # A LoRA fix adapts the modules that hold the top heads.
    tgt_layers, tgt_heads, why = pick_targets(att, "heads" if kind == "lora" else kind, top, layers)
    conds = ["pressure", baseline] + (["helpful"] if "tokens/helpful" in rec.tensors and baseline != "helpful" else [])
    dec = decisions_from_record(rec, lm.tokenizer, conds, split=0)
    requests = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in conds}
    notes: list[str] = [portable_note(left_out)] if left_out else []
    if "helpful" not in conds:
        notes.append("the recording has no helpful condition, so the helpful influence is not part of the budget")
    if capabilities is None:
        notes.append("no capability suite was given, so capabilities are not part of the budget")
    split: list[tuple[torch.Tensor, list[int]]] = []
    items = row_items(rec, dec.items)
    if kind == "lora":
        notes.append("a lora fix is not cross-validated (each fold would train its own adapter): its strength is "
                     "chosen on the training fit")
    elif folds >= 2 and len(set(items)) >= 2:
        split = fold_masks(item_folds(items, folds, seed), int(rec.tensors["split"].shape[0]), dec.items)
    else:
        notes.append(f"only {len(set(items))} training item(s): no cross-validation, the choice rests on the training fit")
    training, modules = None, []
    if kind == "lora":
        settings = lora or LoraSettings()
        modules = lora_targets(lm, tgt_layers, tgt_heads, settings.scope)
        weights, training = train_lora(lm, modules, requests["pressure"], requests[baseline], neutral, settings, on_train)
        fix = Fix(op=op, layers=[m.layer for m in modules], heads=[], vectors=torch.zeros(0), means=torch.zeros(0),
                  strength=0.0, model=lm.identity, lora=weights)
        why = f"{why}; a rank-{settings.rank} LoRA update of {len(modules)} attention output projection(s)" + (
            ", reading only those heads' columns" if settings.scope == "heads" else "")
        cands = [_Candidate(op=op, heads=0, fix=fix, fold_fixes=[])]
    else:
        counts = sorted({n for n in (*HEAD_COUNTS, len(tgt_heads)) if n <= len(tgt_heads)}) if kind == "heads" else [0]
        cands = _candidates(rec, kind, ops, tgt_layers, tgt_heads, counts, baseline, split, lm.identity)
    if gate is not None:
        whole, per_fold = fit_gates(lm, rec, kind, min(tgt_layers), baseline, neutral, split, gate)
        for c in cands:
            c.fix.gate = whole
            for f, g in zip(c.fold_fixes, per_fold):
                f.gate = g
        why = f"{why}; gated by a probe on L{whole.layer}'s residual stream"
    bench = _Bench(lm, requests, baseline, split, neutral, capabilities, budget, batch_size, on_step,
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
    steering = Steering(fix=fix, sweep=cand.points, chosen=cand.points.index(point), baseline=baseline, why=why,
                        budget=budget, training=training, modules=modules, search=search, folds=len(split), notes=notes)
    fix.strength = point.strength
    if fix.lora is not None:
        # PEFT applies an adapter at its saved size: fold the strength into B.
        steering.folded = fix.strength
        fix.lora.b = [b * fix.strength for b in fix.lora.b]
        fix.strength = 1.0
    return steering


def _require_behaviour(att: Artifact, baseline: str) -> None:
    """Refuse to fit a fix to a training split that shows no behaviour (its effect's interval reaches zero).

    A "reduction" of an effect indistinguishable from zero is a ratio of noise
    (a fix can remove 2,500% of +0.1 nats), so no search over it means anything.
    """
    total = (att.manifest.get("summary") or {}).get("total_effect") or {}
    ci = total.get("ci95")
    if not ci or ci[0] is None or ci[0] > 0:
        return
    raise GateError(
        f"the training split shows no behaviour to fix: pressure − {baseline} is {total['mean']:+.2f} "
        f"[{ci[0]:+.2f}, {ci[1]:+.2f}] nats over {total.get('n', '?')} decisions, and that 95% interval reaches zero. "
        "A fix fitted to it would be fitted to noise, so steer does not search. Check the recipe with `mechfix record` "
        "(does this model show the behaviour at all?), add items, or try a model that shows it."
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
    site, operation, targets, strength; ``sweep`` holds every strength of the
    chosen candidate with training-fit and cross-validated numbers side by
    side; ``selection`` every candidate point measured while choosing;
    a lora fix adds ``training`` (settings and the loss at every step) and
    ``adapter_config`` (the PEFT config written beside it).
    """
    chosen = st.sweep[st.chosen]
    extra: dict[str, Any] = {}
    if st.fix.lora is not None and st.training is not None:
        from mechfix.fixes.adapter import hub_id, peft_config

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
