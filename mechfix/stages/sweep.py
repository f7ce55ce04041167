"""Steer's search: the budget, the points it measures, and the bench that measures candidate fixes.

A :class:`Candidate` is one operation on some targets, fitted on the whole
training split and per fold. The :class:`Bench` scores candidates at a
strength (cross-validated reduction, the budget's parts, each only as far as
the choice needs) with the unfixed model's numbers computed once, and
:func:`choose` searches candidates best first for the point that removes the
most behaviour on unseen items inside the :class:`Budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mechfix.defaults import (
    MAX_HELPFUL_LOSS,
    MAX_KL,
    MAX_OVERSHOOT,
    MIN_CAPABILITY,
    MIN_CLEAN_AGREEMENT,
    MIN_CLEAN_MARGIN,
)
from mechfix.engine.layerskip import LayerSkip
from mechfix.fixes.fix import OPS, Fix, RowFixes, apply_row_fixes
from mechfix.measure import capabilities as caps
from mechfix.measure.evaluate import clean_agreement, neutral_kl, score_requests
from mechfix.measure.stats import decision_scores, mean_ci, reduction, side_effects

# Coarse strength grids: ops bounded by 1 (scale, restore) and unbounded ones.
GRIDS = {"bounded": (0.25, 0.5, 0.75, 1.0), "unbounded": (0.5, 1.0, 2.0, 4.0)}

# A trained adapter is swept up to its trained size: past it, it does what it never learned.
_GRID_OF_OP = {"subtract": "unbounded", "steer": "unbounded", "project": "unbounded", "ablate": "unbounded",
               "restore": "bounded", "scale": "bounded", "lora": "bounded"}

REFINE_STEPS = 2

# The parts of the budget; the first four come from the training scores alone (overshoot from the
# cross-validated reduction, where there is one), the last two cost a pass over more text.
BUDGET_PARTS = ("clean_agreement", "clean_margin", "helpful_loss", "overshoot", "kl", "capability")

_CHEAP = BUDGET_PARTS[:4]

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
    max_overshoot: float | None = MAX_OVERSHOOT

    def over(self, p: SweepPoint, parts: Sequence[str] = BUDGET_PARTS) -> list[str]:
        """The parts of the budget a point breaks (empty: inside the budget), among ``parts``."""
        checks = {
            "kl": lambda: p.kl != p.kl or p.kl <= self.max_kl,  # not measured (NaN): not known to be over
            "clean_agreement": lambda: p.clean_agreement >= self.min_clean_agreement,
            "clean_margin": lambda: self.min_clean_margin is None or p.clean_margin is None or p.clean_margin >= self.min_clean_margin,
            "capability": lambda: self.min_capability is None or p.capability is None or p.capability >= self.min_capability,
            "helpful_loss": lambda: self.max_helpful_loss is None or p.helpful_loss is None or p.helpful_loss <= self.max_helpful_loss,
            # A reduction past 100% by more than the allowance pushes the agent away from the others' answer.
            "overshoot": lambda: self.max_overshoot is None or not p.chosen_by == p.chosen_by or p.chosen_by - 1.0 <= self.max_overshoot,
        }
        return [name for name in parts if not checks[name]()]

    def as_dict(self) -> dict[str, Any]:
        return {"max_kl": self.max_kl, "min_clean_agreement": self.min_clean_agreement, "min_capability": self.min_capability,
                "max_helpful_loss": self.max_helpful_loss, "min_clean_margin": self.min_clean_margin,
                "max_overshoot": self.max_overshoot}

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
        steps: A lora fix's training steps (its adapters' snapshot); None for other kinds.
        rank: A lora fix's rank (its adapters cut to their largest singular directions); None for other kinds.
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
    steps: int | None = None
    rank: int | None = None

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
            **({"steps": self.steps} if self.steps is not None else {}),
            **({"rank": self.rank} if self.rank is not None else {}),
        }

@dataclass
class Candidate:
    """One fix to choose from: an operation on some targets, fitted on the whole training split and per fold."""

    op: str
    heads: int
    fix: Fix
    fold_fixes: list[Fix]
    points: list[SweepPoint] = field(default_factory=list)
    probe: SweepPoint | None = None  # the cross-validated score at the strongest grid strength, while searching
    steps: int | None = None  # a lora fix: the training steps its adapters had
    rank: int | None = None  # a lora fix: the rank its adapters were cut to

    @property
    def measured(self) -> list[SweepPoint]:
        """Every point measured: the full sweep when there is one, else the probe."""
        return self.points or ([self.probe] if self.probe else [])

    @property
    def fitted(self) -> bool:
        """Whether the folds' fixes differ from the whole split's: the operation reads a fitted direction or mean."""
        uses = [k for k in OPS[self.op].uses if k in ("vectors", "means")]
        # A gated fix's folds have their own probes, and a lora fix's their own adapters, whatever the operation reads.
        return self.fix.gate is not None or (self.fix.lora is not None and bool(self.fold_fixes)) or any(
            not torch.equal(getattr(f, k), getattr(self.fix, k)) for f in self.fold_fixes for k in uses)

def _capped(red: float | None) -> float:
    """A reduction as the search compares it: past 100% is no better, and one that could not be measured is worst."""
    return -1.0 if red is None or red != red else min(red, 1.0)

def _objective(p: SweepPoint, parameters: int = 0) -> tuple[float, float, float]:
    # Most behaviour removed on unseen items, then the smallest KL, then the smallest fix.
    return (_capped(p.chosen_by), -p.kl, -parameters)

class Bench:
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
    def _label(cand: Candidate, s: float) -> str:
        trained = f" after {cand.steps} steps" if cand.steps is not None else ""
        trained += f", rank {cand.rank}" if cand.rank is not None else ""
        return f"{cand.op} on {cand.heads or len(cand.fix.layers)} target(s){trained} at {s:g}"

    def training(self, cand: Candidate, s: float, conds: Sequence[str]) -> dict[str, torch.Tensor]:
        """Option scores of the training decisions with the whole split's fix at strength ``s``, for ``conds`` (kept)."""
        if s == 0:
            return {c: self.before[c] for c in conds}
        got = self._train.setdefault((id(cand), s), {})
        missing = {c: self.requests[c] for c in conds if c not in got}
        if missing:
            with self.skip.active():
                got.update(score_requests(self.lm, missing, cand.fix, s, batch_size=self.batch_size))
        return {c: got[c] for c in conds}

    def cv(self, cand: Candidate, s: float) -> tuple[dict[str, Any] | None, float | None]:
        """The cross-validated effect at strength ``s``: each fold scored with the fix fitted on the others."""
        if not cand.fold_fixes:
            return None, None
        key = (id(cand), s)
        if key not in self._cv:
            eff = self.eff0.clone()
            if s != 0 and cand.fitted and cand.fix.lora is not None:
                # Adapters are not row fixes: each fold's held-out decisions are scored with its own adapter on.
                for fold_fix, (_, pos) in zip(cand.fold_fixes, self.folds):
                    with self.skip.active():
                        sc = score_requests(self.lm, {c: [self.requests[c][j] for j in pos] for c in ("pressure", self.baseline)},
                                            fold_fix, s, batch_size=self.batch_size)
                    eff[pos] = self._effect(sc)
            elif s != 0 and cand.fitted:
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

    def scores(self, cand: Candidate, strengths: Sequence[float]) -> list[SweepPoint]:
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
                within_budget=False, op=cand.op, heads=cand.heads, steps=cand.steps, rank=cand.rank,
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

    def _attach(self, cand: Candidate, p: SweepPoint, measure: bool) -> None:
        """Give a point its training fit and cross-validated effect: those already scored, or all when ``measure``."""
        s = p.strength
        if measure or "pressure" in self._train.get((id(cand), s), {}):
            sc = self.training(cand, s, ("pressure", self.baseline))
            eff = self._effect(sc)
            p.effect, p.reduction = mean_ci(eff), reduction(float(self.eff0.mean()), float(eff.mean()))
        if cand.fold_fixes and (measure or (id(cand), s) in self._cv):
            p.cv_effect, p.cv_reduction = self.cv(cand, s)

    def with_cv(self, cand: Candidate, p: SweepPoint) -> SweepPoint:
        """The point with its cross-validated effect measured (what the choice rests on)."""
        if cand.fold_fixes and p.cv_reduction is None:
            p.cv_effect, p.cv_reduction = self.cv(cand, p.strength)
        return p

    def fill(self, cand: Candidate, points: Sequence[SweepPoint]) -> None:
        """Measure the training fit and cross-validated effect of points shown without them."""
        for p in points:
            if p.measured != "cv" and (p.effect is None or (cand.fold_fixes and p.cv_reduction is None)):
                self._attach(cand, p, measure=True)

    def complete(self, cand: Candidate, points: Sequence[SweepPoint]) -> None:
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

def _descend(bench: Bench, cand: Candidate, grid: Sequence[float], floor: float | None) -> SweepPoint | None:
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
        p.over = bench.budget.over(p, _CHEAP)  # the cross-validated reduction is known now: does it overshoot?
        if p.over:
            continue
        bench.complete(cand, [p])
        if p.within_budget:
            break
    cand.points.sort(key=lambda p: p.strength)
    return _best(cand.points, cand.fix.n_parameters)

def _cv_point(c: Candidate, s: float, eff: dict[str, Any] | None, red: float | None) -> SweepPoint:
    """A point of which only the cross-validated effect was measured."""
    nan = float("nan")
    return SweepPoint(strength=float(s), effect=None, reduction=nan, kl=nan, clean_agreement=nan, within_budget=False,
                      op=c.op, heads=c.heads, cv_effect=eff, cv_reduction=red, measured="cv", steps=c.steps,
                      rank=c.rank)

def _probe(bench: Bench, c: Candidate, grid: Sequence[float], bound: dict[int, float]) -> None:
    """Score a candidate, cross-validated, at its strongest grid strength: the most it is expected to remove."""
    eff, red = bench.cv(c, max(grid))
    bound[id(c)] = float("inf") if red is None else _capped(red)
    if red is not None:
        c.probe = _cv_point(c, max(grid), eff, red)

def choose(bench: Bench, cands: Sequence[Candidate], refine: int = REFINE_STEPS,
           strengths: Sequence[float] | None = None) -> tuple[Candidate | None, SweepPoint | None]:
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
    def grid(c: Candidate) -> tuple[float, ...]:
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
    best: tuple[Candidate, SweepPoint] | None = None
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
