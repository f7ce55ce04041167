"""Gather a run's artifacts for the report: what each file is, what it holds, and how they chain.

Inputs are folders (every artifact, LoRA fix folder and verify report in
them) or files. Kinds are read from the files themselves, never from their
names. A record's activations are not read: the page shows scores, tokens and
manifests, and a recording can be gigabytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechfix.artifacts import ADAPTER_WEIGHTS, load_artifact, model_difference, sha256_file
from mechfix.errors import BadInputError
from mechfix.schema import check_verify_report
from mechfix.textio import load_json, read_text

# Tensors of a record artifact the page never shows (per-site activations, which make up nearly all of its size).
_SKIPPED = ("acts/", "positions/")


@dataclass
class Source:
    """One input: an artifact (``record``, ``attribution``, ``fix``) or a verify report (``verify``).

    Attributes:
        path: Where it was read from.
        kind: ``record``, ``attribution``, ``fix`` or ``verify``.
        sha256: Of the file (a LoRA fix: of its weights file).
        data: The manifest (artifacts) or the report (verify).
        tensors: Its tensors, but a recording's activations (artifacts only).
    """

    path: Path
    kind: str
    sha256: str
    data: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class RunFiles:
    """A run's inputs, sorted by kind.

    Attributes:
        record: The recording, if given.
        attribution: The attribution, if given.
        fixes: Fixes (one per ``steer``; more for a comparison).
        verify: Verify reports; a ``verify --compare`` report holds the others under ``compare``.
    """

    record: Source | None = None
    attribution: Source | None = None
    fixes: list[Source] = field(default_factory=list)
    verify: list[Source] = field(default_factory=list)

    @property
    def sources(self) -> list[Source]:
        return [s for s in (self.record, self.attribution) if s is not None] + self.fixes + self.verify

    @property
    def name(self) -> str:
        """The recipe's name, from whichever input says it."""
        for s in self.sources:
            recipe = s.data.get("recipe")
            if isinstance(recipe, dict) and recipe.get("name"):
                return str(recipe["name"])
            if isinstance(recipe, str) and recipe:
                return recipe
        return "mechfix"


def _is_verify(data: Any) -> bool:
    return isinstance(data, dict) and "gates" in data and "passed" in data


def _read_json(path: Path) -> dict[str, Any] | None:
    """A verify report's content, or None for any other JSON file."""
    try:  # bounded in size and depth like every JSON mechfix reads
        data = load_json(read_text(path, "verify report"))
    except (BadInputError, json.JSONDecodeError):
        return None
    return data if _is_verify(data) else None


def _artifact(path: Path) -> Source:
    art = load_artifact(path, skip=_SKIPPED)
    return Source(path, art.kind, art.sha256, art.manifest, art.tensors)


def _in_folder(folder: Path) -> list[Path]:
    """Artifacts, LoRA fix folders and verify reports directly inside ``folder``, by name."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (p / ADAPTER_WEIGHTS).is_file():
            found.append(p)
        elif p.is_file() and p.suffix == ".safetensors":
            found.append(p)
        elif p.is_file() and p.suffix == ".json" and _read_json(p) is not None:
            found.append(p)
    return found


def _one(path: Path) -> Source:
    if path.suffix == ".json":
        data = _read_json(path)
        if data is None:
            raise BadInputError(
                f"'{path}' is not a verify report (a JSON object with 'gates' and 'passed'). Give the NAME.verify.json "
                "that `mechfix run` writes, or save one with `mechfix verify ... --json > NAME.verify.json`."
            )
        return Source(path, "verify", sha256_file(path), check_verify_report(data, str(path)))
    return _artifact(path)


def collect(paths: Sequence[str | Path]) -> RunFiles:
    """Read the given folders and files into one run.

    Raises:
        BadInputError: For a missing path, a file that is neither an artifact nor a verify
            report, an empty folder, two recordings or attributions, or artifacts of different models.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise BadInputError(f"'{p}' does not exist. Give the folder `mechfix run --out` wrote, or its artifacts.")
        if p.is_dir() and not (p / ADAPTER_WEIGHTS).is_file():
            inside = _in_folder(p)
            if not inside:
                raise BadInputError(
                    f"'{p}' holds no mechfix artifact or verify report. Give the folder `mechfix run --out` wrote, "
                    "or the .safetensors artifacts and NAME.verify.json themselves."
                )
            files.extend(inside)
        else:
            files.append(p)
    run = RunFiles()
    seen: set[Path] = set()
    for p in files:
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        src = _one(p)
        if src.kind in ("record", "attribution"):
            if getattr(run, src.kind) is not None:
                raise BadInputError(
                    f"two {src.kind} artifacts were given ('{getattr(run, src.kind).path}' and '{p}'); a report shows "
                    "one run. Give the files of one run, or make one report per run."
                )
            setattr(run, src.kind, src)
        elif src.kind == "fix":
            run.fixes.append(src)
        else:
            run.verify.append(src)
    _check_one_model(run)
    return run


def _check_one_model(run: RunFiles) -> None:
    """Refuse artifacts made with different models: their numbers cannot sit on one page."""
    first: Source | None = None
    for s in run.sources:
        model = s.data.get("model")
        if s.kind == "verify" or not isinstance(model, dict):
            continue
        if first is None:
            first = s
        elif (key := model_difference(model, first.data["model"])) is not None:
            raise BadInputError(
                f"'{s.path}' was made with {model.get('name')} and '{first.path}' with {first.data['model'].get('name')} "
                f"(their {key.replace('_', ' ')}s differ): a report shows one model's run. Give the artifacts of one run."
            )


def chain(run: RunFiles) -> list[dict[str, Any]]:
    """The provenance chain: each input's sha256 and, for each input it was made from, whether it is here.

    Returns:
        One row per source: ``file``, ``kind``, ``sha256``, ``created`` and ``inputs``
        (``role``, ``path``, ``sha256`` and ``status``: ``given`` when a given file has that
        sha256, ``not given``, or ``differs`` when a given file of that kind has another).
    """
    by_sha = {s.sha256: s for s in run.sources}
    given = {s.kind: s for s in run.sources}
    rows = []
    for s in run.sources:
        inputs = []
        declared = dict(s.data.get("inputs") or {}) if s.kind != "verify" else {}
        if s.kind == "verify":
            fix = s.data.get("fix") or {}
            declared = {"fix": fix} if fix.get("path") else {}
            recipe = s.data.get("recipe") or {}
            if recipe.get("sha256"):
                declared["recipe"] = recipe
        for role, ref in declared.items():
            sha = ref.get("sha256")
            match = by_sha.get(sha) if sha else None
            if match is not None:
                status, shown = "given", match.name
            elif sha and role in given and given[role].sha256 != sha:
                status, shown = "differs", given[role].name
            else:
                status, shown = "not given", None
            inputs.append({"role": role, "path": ref.get("path"), "sha256": sha, "status": status, "file": shown})
        rows.append({"file": str(s.path), "kind": s.kind, "sha256": s.sha256,
                     "created": s.data.get("created"), "inputs": inputs})
    return rows
