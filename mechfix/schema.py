"""What each kind of artifact must hold, as data, and the check that an artifact holds it.

:func:`check_artifact` runs on every load (:func:`mechfix.artifacts.load_artifact`),
so a stage never starts on an artifact with a manifest key or tensor missing,
or with shapes that disagree with its manifest: the user gets one message
naming what is wrong and the command that makes a good one.

Shapes are written with letters bound from the manifest and the artifact
itself: ``L`` layers, ``H`` heads, ``D`` head width, ``W`` hidden width (the
manifest's ``shape``), ``N`` decisions (the length of ``split``), ``K``
options, ``T`` any length, ``F`` fix targets; an integer is a fixed size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from mechfix.errors import ArtifactError

# Manifest keys each kind needs, with their JSON types.
MANIFEST_KEYS: dict[str, dict[str, type]] = {
    "record": {"model": dict, "recipe": dict, "conditions": list, "options": list, "shape": dict, "summary": dict,
               "positions": str},
    "attribution": {"model": dict, "inputs": dict, "shape": dict, "summary": dict, "params": dict},
    "fix": {"model": dict, "fix": dict, "shape": dict},
}
# Keys each manifest's ``shape`` needs.
SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "record": ("layers", "heads", "head_dim", "hidden"),
    "attribution": ("layers", "heads"),
    "fix": ("layers", "heads", "head_dim", "hidden"),
}
_LETTER_OF_SHAPE = {"layers": "L", "heads": "H", "head_dim": "D", "hidden": "W"}

# Tensors each kind needs, by name ("{c}" is every recorded condition) and shape.
RECORD_TENSORS: dict[str, tuple[str | int, ...]] = {
    "split": ("N",),
    "tokens/{c}": ("N", "T"),
    "lengths/{c}": ("N",),
    "scores/{c}": ("N", "K"),
}
# A decision-position recording's activations, when the site was kept.
RECORD_ACTS: dict[str, tuple[str | int, ...]] = {
    "acts/{c}/resid": ("N", "L", "W"),
    "acts/{c}/mlp": ("N", "L", "W"),
    "acts/{c}/heads": ("N", "L", "H", "D"),
}
ATTRIBUTION_TENSORS: dict[str, tuple[str | int, ...]] = {
    "heads": ("L", "H"),
    "resid": ("L",),
    "mlp": ("L",),
    "attn": ("L",),
}
# A vector or heads fix (a LoRA fix holds PEFT's tensors instead, checked where it is read).
FIX_TENSORS: dict[str, tuple[str | int, ...]] = {
    "vectors": ("F", "V"),
    "means": ("F", "V"),
    "layers": ("F",),
    "heads": ("F2",),
}
MAKE = {"record": "mechfix record", "attribution": "mechfix attribute", "fix": "mechfix steer"}


def check_artifact(kind: str, manifest: Mapping[str, Any], table: Mapping[str, tuple[str, Sequence[int]]], path: str) -> None:
    """Refuse an artifact that lacks what its kind needs, or whose shapes disagree with its manifest.

    Args:
        kind: ``record``, ``attribution`` or ``fix``.
        manifest: Its manifest.
        table: Its tensors' (dtype, shape), by name.
        path: For messages.

    Raises:
        ArtifactError: Naming what is missing or inconsistent and the command that makes a good artifact.
    """
    problems = _problems(kind, manifest, table)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ArtifactError(
            f"'{path}' is not a complete {kind} artifact: {shown}. It was changed or cut short after it was written; "
            f"make it again with `{MAKE[kind]}`."
        )


def _problems(kind: str, manifest: Mapping[str, Any], table: Mapping[str, tuple[str, Sequence[int]]]) -> list[str]:
    out = [f"manifest key '{k}' is missing" if k not in manifest else f"manifest key '{k}' is not a {t.__name__}"
           for k, t in MANIFEST_KEYS[kind].items() if not isinstance(manifest.get(k), t)]
    if out:
        return out
    shape = manifest["shape"]
    bad = [k for k in SHAPE_KEYS[kind] if not isinstance(shape.get(k), int) or shape[k] < 1]
    if bad:
        return [f"manifest shape lacks {', '.join(bad)}"]
    sizes: dict[str, int] = {_LETTER_OF_SHAPE[k]: shape[k] for k in SHAPE_KEYS[kind]}
    if kind == "record":
        conds = manifest["conditions"]
        if not conds or not all(isinstance(c, str) for c in conds):
            return ["manifest 'conditions' is empty"]
        sizes["K"] = len(manifest["options"])
        want = {name.format(c=c): dims for c in conds for name, dims in RECORD_TENSORS.items()}
        if manifest["positions"] == "decision":
            # Only the sites that were kept: a site is kept for every condition or for none.
            want.update({name.format(c=c): dims for c in conds for name, dims in RECORD_ACTS.items()
                         if name.format(c=conds[0]) in table or name.format(c=c) in table})
        return _match(want, table, sizes)
    if kind == "attribution":
        return _match(ATTRIBUTION_TENSORS, table, sizes)
    fix = manifest["fix"]
    if fix.get("kind") == "lora":
        return [] if any("lora_A" in k for k in table) else ["the adapter's lora_A/lora_B tensors are missing"]
    if "layers" in table:
        sizes["F"] = (list(table["layers"][1]) or [0])[0]
    sizes["V"] = shape["head_dim"] if fix.get("kind") == "heads" else shape["hidden"]
    sizes["F2"] = sizes.get("F", 0) if fix.get("kind") == "heads" else 0
    want = dict(FIX_TENSORS)
    if fix.get("gate") is not None:
        # A gated fix's probe reads the residual stream.
        want["gate/weight"] = ("W",)
        sizes["W"] = shape["hidden"]
    return _match(want, table, sizes)


def _match(want: Mapping[str, tuple[str | int, ...]], table: Mapping[str, tuple[str, Sequence[int]]],
           sizes: dict[str, int]) -> list[str]:
    """The tensors in ``want`` that are missing or of the wrong shape; letters bind on first sight (``T`` never)."""
    out = []
    if "N" not in sizes and "split" in table and table["split"][1]:
        sizes["N"] = table["split"][1][0]
    for name, dims in want.items():
        if name not in table:
            out.append(f"tensor '{name}' is missing")
            continue
        got = list(table[name][1])
        if len(got) != len(dims):
            out.append(f"tensor '{name}' has {len(got)} dimensions, not {len(dims)}")
            continue
        for d, g in zip(dims, got):
            if d == "T":
                continue
            expect = d if isinstance(d, int) else sizes.setdefault(d, g)
            if g != expect:
                out.append(f"tensor '{name}' has shape {got}, which disagrees with the manifest ({_SAY.get(str(d), d)} {expect})")
                break
    return out


_SAY = {"N": "decisions", "L": "layers", "H": "heads", "D": "head width", "W": "hidden width", "K": "options",
        "F": "fix targets", "F2": "fix targets", "V": "vector width"}


# ---- verify reports (JSON, read back by `mechfix report`) --------------------------------------------------------
# A verify report is JSON anyone can write; the report page reads these fields, so they are checked before it does.

@lru_cache(maxsize=1)
def _verify_models():
    from pydantic import BaseModel, ConfigDict, model_validator

    class _Open(BaseModel):
        model_config = ConfigDict(extra="allow")

    class Gate(_Open):
        name: str
        passed: bool
        metric: str | None = None
        op: str | None = None
        threshold: float | None = None
        value: float | None = None
        error: str | None = None

        @model_validator(mode="after")
        def _said(self):
            if not self.passed and self.error is None and None in (self.metric, self.op, self.threshold, self.value):
                raise ValueError(f"failed gate '{self.name}' needs metric, op, threshold and value, or an error")
            return self

    class Ungated(_Open):
        reduction: float | None = None
        kl: float

    class Row(_Open):  # one fix (or baseline) of `verify --compare`/`--baselines`, as verdict.comparison_rows writes it
        fix: str | None = None
        kind: str
        op: str | None = None
        parameters: int | None = None
        reduction: float | None = None
        reduction_ci95: list[float | None] | None = None
        kl: float | None = None
        clean_agreement: float | None = None
        control_before: float | None = None
        control_after: float | None = None
        anti_steerable: float | None = None
        ungated: Ungated | None = None
        passed: bool | None = None
        not_applicable: str | None = None  # a baseline the recipe does not allow: why (nothing was measured)

        @model_validator(mode="after")
        def _control(self):
            if (self.control_before is None) != (self.control_after is None):
                raise ValueError("control_before and control_after come together")
            if self.not_applicable is None and (self.kl is None or self.passed is None):
                raise ValueError("a measured row needs kl and passed (a baseline that does not apply says why in "
                                 "not_applicable)")
            return self

    class Value(_Open):
        value: float | None = None
        ci95: list[float | None] | None = None

    class Share(_Open):
        share: float | None = None

    class FixRef(_Open):
        path: str | None = None
        kind: str
        op: str | None = None
        targets: list[str] = []
        sha256: str | None = None

    class Scores(_Open):
        before: list[float | None]
        after: list[float | None]

    class PerItem(_Open):
        rows: list[tuple[int, int]]
        scores: dict[str, Scores]

        @model_validator(mode="after")
        def _lengths(self):
            for c, s in self.scores.items():
                if not len(s.before) == len(s.after) == len(self.rows):
                    raise ValueError(f"per_item scores of '{c}' do not have one before and one after per row")
            return self

    class Report(_Open):
        passed: bool
        gates: list[Gate]
        error: str | None = None
        fix: FixRef | None = None
        model: str | dict | None = None
        heldout: int | None = None
        reduction: Value | None = None
        kl: Value | None = None
        clean_agreement: Value | None = None
        anti_steerable: Share | None = None
        warnings: list[str] = []
        per_item: PerItem | None = None
        comparison: list[Row] | None = None
        live_outcome: dict | None = None

        @model_validator(mode="after")
        def _measured(self):
            if self.error is None:
                missing = [k for k in ("fix", "reduction", "kl", "clean_agreement", "anti_steerable")
                           if getattr(self, k) is None]
                if missing:
                    raise ValueError(f"a report without 'error' needs {', '.join(missing)}")
            return self

    return Report


def check_verify_report(data: Any, where: str) -> dict[str, Any]:
    """A verify report read back from JSON, checked field by field like an artifact's manifest.

    Raises:
        ArtifactError: Naming the first fields that are missing or of the wrong type.
    """
    from pydantic import ValidationError

    try:
        _verify_models().model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'the report'}: {e['msg']}" for e in exc.errors()[:3])
        raise ArtifactError(
            f"'{where}' looks like a verify report but does not hold one ({problems}). Give the NAME.verify.json that "
            "`mechfix run` writes, or save one with `mechfix verify ... --json > NAME.verify.json`.") from None
    return data
