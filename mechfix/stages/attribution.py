"""An attribution as the artifact keeps it: the ranked summary and the saved tensors.

:func:`summarize` ranks components with bootstrap intervals, compares the two
methods where both ran (a component whose estimates disagree by more than
:data:`DISAGREE_FACTOR` is flagged), and splits the top heads' effect by
speaker; :func:`to_artifact` lays it out for ``NAME.attr.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mechfix.artifacts import Artifact, new_manifest
from mechfix.models import LoadedModel
from mechfix.scenario.chat import recorded_style
from mechfix.measure.stats import bootstrap_ci_columns, mean_ci, spearman
from mechfix.stages.attribute import EXAMPLE_HEADS, KINDS, Attribution, Component, all_components, ranked

# Estimate and exact value disagree "by a large factor" beyond this ratio.
DISAGREE_FACTOR = 3.0
# Modules listed in the summary by their effect when restored at every position.
EVERYWHERE_TOP = 6

def _stat(x: torch.Tensor, lo: float, hi: float) -> dict[str, Any]:
    return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)]}

def summarize(att: Attribution, shape: tuple[int, int], top: int = 10, seed: int = 0) -> dict[str, Any]:
    """Ranking, intervals, agreement, per-speaker shares and warnings, as plain data.

    Args:
        att: The attribution.
        shape: ``(layers, heads)``.
        top: How many components the ``top`` list holds.
        seed: Bootstrap seed.
    """
    n_layers, n_heads = shape
    total = mean_ci(att.total.numpy(), seed)
    full_ranking = ranked(att, shape)
    comps = [c for c, _ in full_ranking[:top]]
    # The components that push the other way most (restoring them increases the score).
    opposing = [{"component": c.name, "effect": v} for c, v in reversed(full_ranking[-3:]) if v < 0]

    def per_decision(kind_source: str, c: Component) -> torch.Tensor | None:
        if kind_source == "exact":
            return att.exact.get(c)
        if not att.atp:
            return None
        x = att.atp[c.kind]
        return x[:, c.layer, c.head] if c.kind == "heads" else x[:, c.layer]

    def stats_for(source: str, cs: Sequence[Component]) -> list[dict[str, Any] | None]:
        cols = [per_decision(source, c) for c in cs]
        have = [x for x in cols if x is not None]
        if not have:
            return [None] * len(cs)
        lo, hi = bootstrap_ci_columns(torch.stack(have, 1).numpy(), seed=seed)
        it = iter(zip(lo, hi))
        return [None if x is None else _stat(x, *next(it)) for x in cols]

    atp_stats, exact_stats = stats_for("atp", comps), stats_for("exact", comps)
    # A share of a behaviour that is not there is meaningless: only divide when
    # the total's interval excludes zero.
    lo, hi = total["ci95"]
    denom = total["mean"] if (lo > 0 or hi < 0) else float("nan")
    top_list = []
    for c, a, e in zip(comps, atp_stats, exact_stats):
        entry: dict[str, Any] = {
            "component": c.name,
            "kind": c.kind,
            "layer": c.layer,
            "head": c.head,
            "atp": a["mean"] if a else None,
            "atp_ci95": a["ci95"] if a else None,
            "exact": e["mean"] if e else None,
            "exact_ci95": e["ci95"] if e else None,
            "share": (e or a)["mean"] / denom if (e or a) and np.isfinite(denom) else None,
            "speakers": None,
            "flag": _flag(a["mean"] if a else None, e["mean"] if e else None, total["mean"]),
        }
        if c.kind == "heads" and att.speakers is not None:
            split = att.speakers[:, c.layer, c.head].mean(0)
            entry["speakers"] = {name: float(v) for name, v in zip(att.speaker_names, split) if abs(float(v)) > 0}
        top_list.append(entry)
    both = [(t["atp"], t["exact"]) for t in top_list if t["atp"] is not None and t["exact"] is not None]
    agreement = None
    if both:
        a, e = np.array([x[0] for x in both]), np.array([x[1] for x in both])
        k5 = min(5, len(both))
        agreement = {
            "k": len(both),
            "spearman": _finite(spearman(a, e)),  # undefined (None) when one side is constant, e.g. no effect at all
            "top5_overlap": len(set(np.argsort(-a)[:k5]) & set(np.argsort(-e)[:k5])),
            "top5_of": k5,
        }
    layers = []
    for layer in range(n_layers):
        row: dict[str, Any] = {"layer": layer}
        for kind in ("attn", "mlp", "resid"):
            c = Component(kind, layer)
            a = per_decision("atp", c)
            e = per_decision("exact", c)
            row[f"{kind}_atp"] = float(a.mean()) if a is not None else None
            row[f"{kind}_exact"] = float(e.mean()) if e is not None else None
        layers.append(row)
    return {
        "method": att.method,
        "baseline": att.baseline,
        "decisions": len(att.items),
        "items": att.items,
        "total_effect": total,
        "top": top_list,
        "agreement": agreement,
        "opposing": opposing,
        "layers": layers,
        "speakers_note": att.speaker_note,
        "positions": {"aligned": att.positions is not None, "note": att.position_note},
        "everywhere": _everywhere(att),
        "warnings": [f"{t['component']}: {t['flag']}" for t in top_list if t["flag"]]
        + (
            []
            if np.isfinite(denom)
            else [
                f"the behaviour to explain (pressure - {att.baseline}) is not distinguishable from zero on the "
                "training split, so shares are not given and the ranking says little"
            ]
        ),
    }

def _everywhere(att: Attribution) -> dict[str, Any] | None:
    """The modules whose restoring at every position removes the most, best first (None when not measured)."""
    if att.everywhere is None:
        return None
    total = float(att.total.mean())
    rows = [(f"L{layer}.{kind}", float(v)) for kind, per in att.everywhere.items() for layer, v in enumerate(per.mean(0))]
    rows.sort(key=lambda r: -r[1])
    return {
        "metric": f"score drop when the module's output is restored from {att.baseline} at every prompt position",
        "top": [{"module": name, "effect": v, "share": v / total if total else None} for name, v in rows[:EVERYWHERE_TOP]],
    }


def _flag(atp: float | None, exact: float | None, total: float) -> str | None:
    """Say when the estimate and the exact value disagree in sign or by a large factor."""
    if atp is None or exact is None:
        return None
    floor = 0.02 * abs(total)  # differences among tiny effects are noise, not disagreement
    if max(abs(atp), abs(exact)) < floor:
        return None
    if atp * exact < 0 and min(abs(atp), abs(exact)) >= floor:
        return "estimate and exact effect differ in sign (saturated attention or cancellation)"
    small, big = sorted((abs(atp), abs(exact)))
    # A ratio, not the floor, decides: a value just under the floor beside one just over it agrees.
    if small == 0 or big / small > DISAGREE_FACTOR:
        which = "over" if abs(atp) > abs(exact) else "under"
        return f"the estimate {which}states the exact effect by more than {DISAGREE_FACTOR:g}x (saturated attention or cancellation)"
    return None

def to_artifact(att: Attribution, lm: LoadedModel, rec: Artifact, params: dict[str, Any], top: int = 10) -> Artifact:
    """Pack an attribution into an ``attribution`` artifact.

    Tensors: ``heads [L, H]``, ``attn``/``mlp``/``resid`` ``[L]`` (mean effect by the
    ranking method), their ``*_ci95`` (``[..., 2]``), ``speakers [L, H, S]`` (mean
    per-speaker split), ``per_decision/atp/KIND``, ``exact/values [U, N]`` for the
    components listed in the manifest's ``exact_components``, ``scores/pressure``,
    ``scores/baseline``, ``items``, and ``positions/*`` when the conditions are token-aligned
    (and ``everywhere/attn``, ``everywhere/mlp`` ``[N, L]`` when restoring at every position ran).
    """
    shape = (lm.n_layers, lm.n_heads)
    seed = int(rec.manifest.get("seed", 0) or 0)
    summary = summarize(att, shape, top=top, seed=seed)
    tensors: dict[str, torch.Tensor] = {
        "items": torch.tensor(att.items, dtype=torch.int32),
        "scores/pressure": att.pressure.float(),
        "scores/baseline": att.base.float(),
    }
    for kind in KINDS:
        if att.method == "exact":
            per = torch.stack([att.exact[c] for c in all_components(*shape, (kind,))], 1)
            per = per.reshape(len(att.items), *((shape[0], shape[1]) if kind == "heads" else (shape[0],)))
        else:
            per = att.atp[kind]
            tensors[f"per_decision/atp/{kind}"] = per.float()
        lo, hi = bootstrap_ci_columns(per.reshape(per.shape[0], -1).numpy(), seed=seed)  # as in the summary
        tensors[kind] = per.mean(0).float()
        tensors[f"{kind}_ci95"] = torch.from_numpy(np.stack([lo, hi], -1)).float().reshape(*per.shape[1:], 2)
    if att.speakers is not None:
        tensors["speakers"] = att.speakers.mean(0).float()
    units = list(att.exact)
    if units:
        tensors["exact/values"] = torch.stack([att.exact[u] for u in units]).float()
    if att.positions is not None:
        for k, v in att.positions.items():
            tensors[f"positions/{k}"] = v
    if att.everywhere is not None:
        for k, v in att.everywhere.items():
            tensors[f"everywhere/{k}"] = v.float()
    examples = None
    if att.example is not None:
        # The ranking's top heads only: every head at every token would be large on a big model with long prompts.
        heads = [c for c, _ in ranked(att, shape) if c.kind == "heads"][:EXAMPLE_HEADS]
        ex = att.example
        for c, t in ex.terms.items():
            tensors[f"examples/{c}"] = torch.stack([t[h.layer, h.head] for h in heads], 1).float()  # [T, k]
        examples = {
            "item": ex.item,
            "heads": [h.name for h in heads],
            "value": "what each head draws from each token, a_j (v_j . g), g the pressure run's gradient of the "
                     "score at the head's output; summed by speaker, pressure minus baseline is the split",
            "tokens": {c: [lm.tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in ids]
                       for c, ids in ex.prompts.items()},
            "speakers": ex.speakers,
        }
    manifest = new_manifest(
        "attribution",
        model=lm.identity,
        inputs={"record": {"path": rec.path, "sha256": rec.sha256}},
        recipe=rec.manifest.get("recipe", {}).get("name"),
        params=params,
        seed=rec.manifest.get("seed"),
        speakers=att.speaker_names,
        exact_components=[u.name for u in units],
        shape={"layers": shape[0], "heads": shape[1]},
        metric="score = log P(misaligned) - log P(aligned) under pressure; effect = score drop when the "
        f"component's decision-position activation is restored from {att.baseline}",
        summary=summary,
        style=recorded_style(rec.manifest),
        **({"examples": examples} if examples is not None else {}),
    )
    return Artifact(kind="attribution", manifest=manifest, tensors=tensors)

def _finite(x: float) -> float | None:
    """A number a manifest can hold: JSON has no NaN or infinity."""
    return x if np.isfinite(x) else None
