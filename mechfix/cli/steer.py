"""``mechfix steer``: turn an attribution into a fix chosen by what carries over."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechfix.cli.checks import check_paths, named
from mechfix.textio import clean_nan
from mechfix.cli.common import (
    CapabilitiesOpt,
    FoldsOpt,
    JsonOpt,
    KindOpt,
    LayersOpt,
    NeutralOpt,
    OpOpt,
    PortableOpt,
    SeedOpt,
    StrengthsOpt,
    TopHeadsOpt,
    TrustOpt,
    emit_json,
    parse_floats,
    parse_ints,
    check_remote,
    progress_bars,
    app,
)
from mechfix.cli.options import BudgetOptions, LoraOptions, ModelOptions, ProbeOptions, with_groups
from mechfix.cli.views import (
    print_candidates,
    print_steer,
    print_sweep,
    training_summary,
)


def print_failed_sweep(exc, budget) -> None:
    """What steer measured before it found no fix within the budget (a GateError's detail), on stderr."""
    if exc.detail is None:
        return
    failed = failed_steer_summary(exc, budget)
    print_sweep(failed["sweep"], None, failed["budget"], "every point measured (training split)")
    if failed["candidates"]:
        print_candidates({"folds": failed["folds"], "by": "cross-validated reduction" if failed["folds"]
                          else "training-fit reduction", "candidates": failed["candidates"]})


def failed_steer_summary(exc, budget) -> dict[str, Any]:
    """``steer --json``'s one object when no fix fits: no artifact, the reason, and what was measured."""
    detail = exc.detail
    return clean_nan({
        "artifact": None, "sha256": None, "fix": None, "why": str(exc), "budget": budget.as_dict(),
        "sweep": [p.as_dict() for p in detail.sweep] if detail is not None else [],
        "candidates": [p.as_dict() for p in detail.search] if detail is not None and detail.search else [],
        "folds": detail.folds if detail is not None else None,
    })


def steer_summary(artifact) -> dict[str, Any]:
    m = artifact.manifest
    f = m["fix"]
    out = {"artifact": artifact.path, "sha256": artifact.sha256, **{k: f[k] for k in ("kind", "op", "site", "targets", "strength", "why")},
           "parameters": f.get("parameters"), "budget": m["budget"], "sweep": m["sweep"], "chosen": m["chosen"],
           "selection": m.get("selection")}
    if "training" in m:
        out["training"] = training_summary(m)
    if f.get("gate"):
        out["gate"] = f["gate"]
    return clean_nan(out)


def _fix_target(out: Path | None, stem: Path, kind: str) -> Path:
    """Where a fix is written: ``out``, or STEM.fix.safetensors (the folder STEM.lora for a LoRA fix)."""
    from mechfix.stages.pipeline import fix_path

    return out or fix_path(stem, kind)


def fix_outputs(target: Path, kind: str, name: str = "--out") -> tuple[dict[str, Path], dict[str, Path]]:
    """A fix's path as :func:`~mechfix.cli.checks.check_paths` takes it: ``(files, folders)``."""
    return ({}, {name: target}) if kind == "lora" else ({name: target}, {})


def check_lora_folder(target: Path, kind: str) -> None:
    """An existing folder at a LoRA fix's path must be an earlier adapter (it is replaced), nothing else."""
    if kind == "lora" and target.is_dir():
        from mechfix.artifacts import check_writable_dir

        check_writable_dir(target)


def _attribution_stem(att_path: Path) -> Path:
    """NAME of NAME.attr.safetensors, in the current folder (where steer writes by default)."""
    name = att_path.name
    return Path(name[: -len(".attr.safetensors")] if name.endswith(".attr.safetensors") else att_path.stem)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix steer conformity.attr.safetensors\n\n"
        "  mechfix steer conformity.attr.safetensors --kind vector --out conf.vec.safetensors\n\n"
        "  mechfix steer conformity.attr.safetensors --kind lora --out conformity.lora --rank 4 --steps 40\n\n"
        "  mechfix steer conformity.attr.safetensors --kind heads --op scale --top-heads 3 --max-kl 0.05 --json\n\n"
        "  mechfix steer conformity.attr.safetensors --gate probe --out conformity.gated.fix.safetensors\n\n"
        "  mechfix steer conformity.attr.safetensors --portable   # then: mechfix export FIX --format peft --out DIR\n\n"
        "  mechfix steer conformity.attr.safetensors --folds 8 --seed 1 --capabilities builtin --capabilities my-task.jsonl"
    )
)


@with_groups
def steer(
    attribution: Annotated[Path, typer.Argument(help="An attribution artifact (from `mechfix attribute`).")],
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Fix to write. Default: NAME.fix.safetensors here (a folder NAME.lora for --kind lora).")
    ] = None,
    kind: KindOpt = "heads",
    op: OpOpt = None,
    top_heads: TopHeadsOpt = 5,
    layers: LayersOpt = None,
    strengths: StrengthsOpt = None,
    budget: BudgetOptions = BudgetOptions(),
    record: Annotated[Path | None, typer.Option(help="The recording the attribution came from (default: the path it names).")] = None,
    neutral: NeutralOpt = None,
    capabilities: CapabilitiesOpt = None,
    folds: FoldsOpt = 5,
    lora: LoraOptions = LoraOptions(),
    portable: PortableOpt = False,
    probe: ProbeOptions = ProbeOptions(),
    seed: SeedOpt = 0,
    models: ModelOptions = ModelOptions(),
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn an attribution into a fix, chosen by what carries over to items it was not fitted on.

    A heads fix tries every operation (unless --op is given; with --portable
    only ablate and scale, which `mechfix export` writes as weights) on the top 1, 3
    and --top-heads heads, each at a grid of strengths, and scores them by
    cross-validation over the training items; it keeps the one that removes the
    most behaviour on held-out folds while the side-effect budget holds: KL on
    neutral text, capabilities kept, clean answers kept (agreement and margin)
    and the helpful influence kept, with no overshoot. A vector fix is computed
    from the recording; a lora fix is trained on the training split with every
    recorded condition as a label (pressure pulled back to the clean answer,
    the helpful pull kept, clean and control unchanged), once on the whole
    split and once per fold (at most 3), and its steps, rank (--rank or half of
    it) and strength are chosen by the same cross-validation; it is written as a PEFT adapter folder. With --gate probe, every candidate edits only where a
    linear probe says the agent is under pressure (see the manual's tutorial
    "A gated fix"). Exit 1 (nothing written) when nothing fits the budget.
    """
    from mechfix.measure import capabilities as caps
    from mechfix.artifacts import check_same_model, load_artifact
    from mechfix.stages.pipeline import find_recording
    from mechfix.stages.steer import check_kind_op, check_portable

    check_kind_op(kind, op)
    check_remote(models.remote, kind=kind, gate=probe.gate)
    gate = probe.settings(kind)
    if portable:
        check_portable(kind, op, gate)
    caps.load_tasks(capabilities)  # refused here, before the model loads
    target = _fix_target(out_path, _attribution_stem(attribution), kind)
    files, folders = fix_outputs(target, kind)
    check_paths({"ATTRIBUTION": attribution, "--record": record, "--neutral": neutral}, files, folders,
                either=named("--capabilities", capabilities, skip="builtin"))
    check_lora_folder(target, kind)
    att = load_artifact(attribution, expect="attribution")
    limits = budget.budget()
    layer_list, grid = parse_ints(layers, "--layers"), parse_floats(strengths, "--strengths")
    settings = lora.settings(seed)
    rec = find_recording(att, record)
    lm, batch_size = models.load(trust_remote_code, default=att.manifest.get("model", {}).get("source"))
    check_same_model(att.manifest, lm.identity, attribution)
    from mechfix.errors import GateError
    from mechfix.stages.pipeline import steer as run_steer

    try:
        with progress_bars() as progress:
            artifact = run_steer(att, rec, lm, kind=kind, op=op, top_heads=top_heads, layers=layer_list, strengths=grid,
                                 budget=limits, neutral=neutral, capabilities=capabilities, folds=folds, seed=seed,
                                 batch_size=batch_size, lora=settings, gate=gate, portable=portable, out=target,
                                 on_progress=progress)
    except GateError as exc:
        print_failed_sweep(exc, limits)
        if as_json:  # a --json caller still gets one object on stdout (then exit 1, the reason on stderr)
            emit_json(failed_steer_summary(exc, limits))
        raise
    summary = steer_summary(artifact)
    if as_json:
        emit_json(summary)
    else:
        print_steer(summary)
