"""The fix half of the command line: ``steer``, ``verify``, ``run`` and ``export``.

Registered on the app of :mod:`mechfix.cli`; the same conventions hold
(``--json`` on stdout, prose on stderr, exit codes 0/1/2/3/130).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mechfix.defaults import (
    MAX_HELPFUL_LOSS,
    MAX_KL,
    MIN_CAPABILITY,
    MIN_CLEAN_AGREEMENT,
    MIN_CLEAN_MARGIN,
    MIN_REDUCTION,
)
from mechfix.cli import (
    DeviceOpt,
    DtypeOpt,
    DecisionOpt,
    JsonOpt,
    ModelOpt,
    ModeOpt,
    TranscriptOpt,
    TrustOpt,
    _clean_nan,
    _do_attribute,
    _do_record,
    _emit_json,
    _json_text,
    _fmt_ci,
    _load_model,
    _load_source,
    _params,
    _print_attribution,
    _print_outcome,
    _print_record_summary,
    _progress,
    app,
    err,
)

KindOpt = Annotated[
    str,
    typer.Option(
        help="heads: edit the top attention heads only; vector: subtract a direction from a layer's output "
        "(exportable to llama.cpp); lora: train a small adapter on the top heads' output projections "
        "(a PEFT adapter folder)."
    ),
]
OpOpt = Annotated[
    str | None,
    typer.Option(
        help="heads: project, steer, restore or scale (default: try them all and keep what carries over); vector: "
        "subtract; lora: lora. See the README for what each does."
    ),
]
_LORA = "LoRA training (--kind lora)"
RankOpt = Annotated[int, typer.Option(min=1, help="Rank of each module's update.", rich_help_panel=_LORA)]
StepsOpt = Annotated[int, typer.Option(min=1, help="Optimiser steps.", rich_help_panel=_LORA)]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate.", rich_help_panel=_LORA)]
KlWeightOpt = Annotated[
    float, typer.Option("--kl-weight", min=0.0, help="Weight of KL to the base model in the loss.", rich_help_panel=_LORA)
]
ScopeOpt = Annotated[
    str,
    typer.Option(
        "--lora-scope",
        help="heads: the update reads only the found heads' columns; modules: whole output projections.",
        rich_help_panel=_LORA,
    ),
]
SeedOpt = Annotated[
    int, typer.Option(help="Seed of the cross-validation folds, and of a LoRA fix's initialisation, batches and sampled positions.")
]
FoldsOpt = Annotated[
    int,
    typer.Option(min=0, help="Cross-validation folds over the training items: the fix is chosen by what carries over to "
                 "items it was not fitted on (0 or 1: choose on the training fit, as a LoRA fix always does)."),
]
TopHeadsOpt = Annotated[
    int,
    typer.Option("--top-heads", min=1, help="The most top heads a heads fix edits: the top 1, 3 and this many are tried, "
                 "and cross-validation picks."),
]
LayersOpt = Annotated[
    str | None, typer.Option(help="Comma-separated decoder layers to act on (vector: exactly these; heads: only heads there).")
]
StrengthsOpt = Annotated[str | None, typer.Option(help="Comma-separated coarse strength grid for the sweep (default per operation).")]
MaxKlOpt = Annotated[float, typer.Option("--max-kl", min=0.0, help="Side-effect budget: KL per token on neutral text (nats).")]
MinCleanOpt = Annotated[
    float,
    typer.Option("--min-clean-agreement", min=0.0, max=1.0, help="Share of clean decisions whose answer must stay the same."),
]
MinReductionOpt = Annotated[
    float, typer.Option("--min-reduction", help="Gate: the held-out behaviour effect must shrink by at least this share.")
]
NeutralOpt = Annotated[
    Path | None,
    typer.Option(help="Neutral passages for the KL check (blank-line separated). Default: a set shipped with mechfix "
                 "(steer chooses on one, verify checks on another that steer never sees)."),
]
CapabilitiesOpt = Annotated[
    list[str] | None,
    typer.Option("--capabilities", help="Capability tasks whose accuracy the fix must keep: .jsonl files, folders of "
                 "them, or 'builtin' (repeat it; default builtin). Each line: "
                 '{"prompt": ..., "answer": ..., "distractors": [...]}.'),
]
MinCapabilityOpt = Annotated[
    float,
    typer.Option("--min-capability", min=0.0, help="Share of the model's accuracy on every capability task that the "
                 "fix must keep (tasks the model does no better than chance are reported, not gated)."),
]
MaxHelpfulLossOpt = Annotated[
    float,
    typer.Option("--max-helpful-loss", min=0.0, help="The most of the helpful condition's pull (others giving the "
                 "right answer) that the fix may remove. Recipes without a helpful condition skip it."),
]
MinCleanMarginOpt = Annotated[
    float,
    typer.Option("--min-clean-margin", min=0.0, help="Share of the clean decisions' margin for the aligned option that "
                 "the fix must keep: a fix that only makes the model less sure of everything fails it."),
]
JunitOpt = Annotated[Path | None, typer.Option(help="Also write a JUnit XML report, one testcase per gate.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")]
ReplayOpt = Annotated[
    str,
    typer.Option(help="Live recipes: play the episodes again with the fix and report what they come to (final "
                 "state, the target's replies). all: every agent runs the fixed model (one model plays them all); "
                 "target: only the target does; none: skip."),
]


def _floats(text: str | None, name: str) -> list[float] | None:
    from mechfix.errors import BadInputError

    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"{name} takes comma-separated numbers such as 0.5,1,2, not '{text}'.") from None
    if not vals or any(v <= 0 for v in vals):
        raise BadInputError(f"{name} needs positive numbers, such as 0.5,1,2 (got '{text}').")
    return vals


def _ints(text: str | None, name: str) -> list[int] | None:
    from mechfix.errors import BadInputError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"{name} takes comma-separated layer numbers such as 10,12, not '{text}'.") from None


def _neutral(lm, path: Path | None, part: str = "select", stride: int = 1):
    from mechfix.errors import BadInputError
    from mechfix.evaluate import neutral_passages, neutral_set

    if path is not None and not path.is_file():
        raise BadInputError(f"--neutral '{path}' does not exist. Give a text file of passages separated by blank lines.")
    passages = neutral_passages(str(path) if path else None, part)
    neutral = neutral_set(lm, passages, stride)
    if neutral.n_tokens == 0:
        raise BadInputError(f"--neutral '{path}' holds no text to measure KL on. Give passages separated by blank lines.")
    return neutral


def _find_record(att, record: Path | None):
    """The recording an attribution was made from: --record, the recorded path, or its name beside the attribution."""
    from mechfix.artifacts import load_artifact
    from mechfix.errors import ArtifactError

    inp = att.manifest.get("inputs", {}).get("record", {})
    if record is None:
        named = Path(str(inp.get("path", "")))
        beside = Path(att.path).parent / named.name
        record = next((p for p in (named, beside) if str(p) and p.is_file()), None)
        if record is None:
            raise ArtifactError(
                f"cannot find the recording '{inp.get('path')}' that '{att.path}' was made from. "
                "Pass it with --record REC.safetensors."
            )
    rec = load_artifact(record, expect="record")
    if inp.get("sha256") and rec.sha256 != inp["sha256"]:
        raise ArtifactError(
            f"'{record}' is not the recording '{att.path}' was made from (its sha256 differs). Pass the right one "
            "with --record, or run `mechfix attribute` again on this recording."
        )
    return rec


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.0%}"


def _budget_title(budget: dict[str, Any]) -> str:
    parts = [f"KL <= {budget['max_kl']:g}", f"clean agreement >= {budget['min_clean_agreement']:.0%}"]
    if budget.get("min_clean_margin") is not None:
        parts.append(f"clean margin kept >= {budget['min_clean_margin']:.0%}")
    if budget.get("min_capability") is not None:
        parts.append(f"capability kept >= {budget['min_capability']:.0%}")
    if budget.get("max_helpful_loss") is not None:
        parts.append(f"helpful loss <= {budget['max_helpful_loss']:.0%}")
    return ", ".join(parts)


_SHORT = {"clean_agreement": "clean", "clean_margin": "margin", "helpful_loss": "helpful", "capability": "capab"}


def _print_sweep(sweep: list[dict[str, Any]], chosen: float | None, budget: dict[str, float], title: str) -> None:
    ops = sorted({f"{p.get('op')}" + (f" on {p['heads']} heads" if p.get("heads") else "") for p in sweep if p.get("op")})
    t = Table(title=f"{title}{': ' + ', '.join(ops) if ops else ''}; budget: {_budget_title(budget)}; fit/cv = "
              "reduction on the training fit / cross-validated over items; helpf- = helpful influence removed",
              title_justify="left")
    # Narrow headers, so that the table fits 80 columns: fit = training-fit reduction, cv = cross-validated one.
    for name in ("s", "fit", "cv", "KL", "clean", "margin", "capab", "helpf-", ""):
        t.add_column(name, justify="left" if name == "" else "right", no_wrap=True)
    for p in sweep:
        if chosen is not None and p["strength"] == chosen:
            mark = "[bold green]chosen[/bold green]"
        elif p.get("over"):
            mark = "[yellow]over " + ",".join(_SHORT.get(o, o) for o in p["over"]) + "[/yellow]"
        elif p.get("measured") == "scored":
            mark = "[dim]-[/dim]"
        else:
            mark = "" if p["within_budget"] else "[yellow]over[/yellow]"
        kl = "-" if p["kl"] is None else (">" if p.get("kl_lower_bound") else "") + f"{p['kl']:.4f}"
        t.add_row(f"{p['strength']:g}", _pct(p["reduction"]), _pct(p.get("cv_reduction")), kl, _pct(p["clean_agreement"]),
                  _pct(p.get("clean_margin")), _pct(p.get("capability")), _pct(p.get("helpful_loss")), mark)
    err.print(t)


def _print_candidates(selection: dict[str, Any]) -> None:
    """One line per candidate (operation, heads): its best cross-validated reduction inside the budget."""
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in selection.get("candidates", []):
        rows.setdefault((p["op"], p["heads"]), []).append(p)
    if len(rows) < 2:
        return
    t = Table(title=f"candidates, by {selection.get('by')} ({selection.get('folds')} folds of items)", title_justify="left")
    for name in ("op", "heads", "best inside the budget", "at strength", "points measured"):
        t.add_column(name, justify="left" if name == "op" else "right")
    for (op, heads), pts in rows.items():
        if all(p.get("measured") == "cv" for p in pts):
            p = pts[0]
            t.add_row(op, str(heads or "-"), f"not searched: {_pct(p.get('cv_reduction'))} cross-validated at "
                      f"{p['strength']:g}", "-", str(len(pts)))
            continue
        ok = [p for p in pts if p["within_budget"] and p["strength"] > 0]
        key = "cv_reduction" if pts[0].get("cv_reduction") is not None else "reduction"
        best = max(ok, key=lambda p: -1 if p[key] is None else p[key]) if ok else None
        t.add_row(op, str(heads or "-"), "none" if best is None else _pct(best[key]),
                  "-" if best is None else f"{best['strength']:g}", str(len(pts)))
    err.print(t)


def _do_steer(lm, att, rec, target: Path, kind: str, op: str | None, top_heads: int, layers, strengths, budget,
              neutral_path: Path | None, capabilities: list[str] | None, tasks, folds: int, seed: int, batch_size: int,
              lora=None):
    """Run steer and save the fix; on a failed budget, print the sweep and re-raise."""
    from mechfix import capabilities as caps
    from mechfix.errors import GateError
    from mechfix.fix import save_fix
    from mechfix.lora import LoraSettings
    from mechfix.steer import steer
    from mechfix.steer import to_artifact as fix_artifact

    from mechfix.steer import SEARCH_KL_STRIDE

    neutral = _neutral(lm, neutral_path, "select", SEARCH_KL_STRIDE)
    suite = caps.build_suite(lm, tasks, "select")
    lora = lora or LoraSettings()
    with _progress() as progress:
        def on_train(step: int, losses: dict[str, float]) -> None:
            progress(f"training the LoRA fix (loss {losses['loss']:.3f}: behaviour {losses['behaviour']:.3f}, "
                     f"KL {losses['kl']:.4f})", 1, lora.steps, key="train")

        def on_step(label: str) -> None:
            progress(f"choosing the fix (measured {label})", 1, None, key="sweep")

        try:
            steering = steer(lm, att, rec, neutral, kind=kind, op=op, top=top_heads, layers=layers, strengths=strengths,
                             budget=budget, batch_size=batch_size, on_step=on_step, lora=lora, on_train=on_train,
                             capabilities=suite, folds=folds, seed=seed)
        except GateError as exc:
            if exc.detail is not None:
                _print_sweep(_clean_nan([p.as_dict() for p in exc.detail.sweep]), None, budget.as_dict(),
                             "every point measured (training split)")
                if exc.detail.search:
                    _print_candidates({"folds": exc.detail.folds, "by": "cross-validated reduction" if exc.detail.folds
                                       else "training-fit reduction", "candidates": _clean_nan([p.as_dict() for p in exc.detail.search])})
            raise
    extra = {"lora": {k: getattr(lora, k) for k in ("rank", "steps", "lr", "kl_weight", "scope", "seed")}} if kind == "lora" else {}
    params = _params(lm, kind=kind, op=op, top_heads=top_heads, layers=layers, strengths=strengths, **budget.as_dict(),
                     neutral=str(neutral_path) if neutral_path else "builtin:select",
                     capabilities=capabilities or ["builtin"], folds=folds, seed=seed, batch_size=batch_size, **extra)
    artifact = fix_artifact(steering, lm, att, rec, params)
    save_fix(target, artifact)
    return artifact


def _steer_summary(artifact) -> dict[str, Any]:
    m = artifact.manifest
    f = m["fix"]
    out = {"artifact": artifact.path, "sha256": artifact.sha256, **{k: f[k] for k in ("kind", "op", "site", "targets", "strength", "why")},
           "parameters": f.get("parameters"), "budget": m["budget"], "sweep": m["sweep"], "chosen": m["chosen"],
           "selection": m.get("selection")}
    if "training" in m:
        out["training"] = _training_summary(m)
    return _clean_nan(out)


def _training_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """A LoRA fix's training in brief: steps, seconds, first and last losses, the folded strength."""
    steps = manifest["training"].get("steps", [])
    return {"steps": len(steps), "seconds": manifest["training"].get("seconds", 0.0), "first": steps[0] if steps else None,
            "last": steps[-1] if steps else None, "folded_strength": manifest["fix"].get("folded_strength")}


def _print_training(t: dict[str, Any]) -> None:
    first, last = t.get("first") or {}, t.get("last") or {}
    err.print(
        f"training: {t['steps']} steps in {t['seconds']:.0f} s, loss {first.get('loss', float('nan')):.3f} -> "
        f"{last.get('loss', float('nan')):.3f} (behaviour {last.get('behaviour', float('nan')):.3f}, KL {last.get('kl', float('nan')):.4f}); "
        f"strength {t.get('folded_strength')} folded into the adapter's B"
    )


def _print_steer(summary: dict[str, Any]) -> None:
    chosen_strength = summary["chosen"]["strength"]
    if summary.get("selection"):
        _print_candidates(summary["selection"])
    _print_sweep(summary["sweep"], chosen_strength, summary["budget"], "the chosen candidate's strengths (training split)")
    for note in (summary.get("selection") or {}).get("notes", []):
        err.print(f"note: {escape(note)}", soft_wrap=True)
    if summary.get("training"):
        _print_training(summary["training"])
    err.print(f"fix: {summary['kind']} / {summary['op']} on {', '.join(summary['targets'])} at strength {chosen_strength:g}"
              f" ({summary.get('parameters')} parameters)")
    err.print(f"targets: {escape(summary['why'])}", soft_wrap=True)
    ch = summary["chosen"]
    cv = "" if ch.get("cv_reduction") is None else f" ({_pct(ch['cv_reduction'])} cross-validated over items)"
    err.print(
        f"training split: behaviour {_fmt_ci(ch['effect'])} left, reduction {_pct(ch['reduction'])}{cv}, "
        f"KL {ch['kl']:.4f} nats/token, clean agreement {ch['clean_agreement']:.0%}. Verify it on held-out episodes "
        "with `mechfix verify`."
    )
    extra = " (a PEFT adapter folder: peft.PeftModel.from_pretrained(model, folder) loads it)" if summary["kind"] == "lora" else ""
    err.print(f"wrote {summary['artifact']}{extra}")


def print_fix(manifest: dict[str, Any]) -> None:
    """What a fix artifact applies, and the sweep that chose its strength (for `mechfix show`)."""
    f = manifest["fix"]
    err.print(f"fix: {f.get('kind')} / {f.get('op')} on {', '.join(f.get('targets', []))} at strength {f.get('strength')}"
              + (f" ({f['parameters']} parameters)" if "parameters" in f else ""))
    err.print(f"hook: {f.get('hook')}, at {f.get('positions')} positions; {escape(str(f.get('formula')))}", soft_wrap=True)
    if f.get("loss"):
        err.print(f"loss: {escape(str(f['loss']))}", soft_wrap=True)
    if manifest.get("training"):
        _print_training(_training_summary(manifest))
    if manifest.get("selection"):
        _print_candidates(_clean_nan(manifest["selection"]))
    if manifest.get("sweep") and manifest.get("budget"):
        chosen = (manifest.get("chosen") or {}).get("strength", f.get("strength"))
        _print_sweep(_clean_nan(manifest["sweep"]), chosen, manifest["budget"], "the chosen candidate's strengths (training split)")


def _fix_target(out: Path | None, stem: Path, kind: str) -> Path:
    """Where a fix is written: ``out``, or STEM.fix.safetensors (the folder STEM.lora for a LoRA fix); checked before any work."""
    from mechfix.artifacts import check_writable, check_writable_dir

    if kind == "lora":
        return check_writable_dir(out or stem.with_name(f"{stem.name}.lora"))
    return check_writable(out or stem.with_name(f"{stem.name}.fix.safetensors"))


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
        "  mechfix steer conformity.attr.safetensors --folds 8 --seed 1 --capabilities builtin --capabilities my-task.jsonl"
    )
)
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
    max_kl: MaxKlOpt = MAX_KL,
    min_clean_agreement: MinCleanOpt = MIN_CLEAN_AGREEMENT,
    min_capability: MinCapabilityOpt = MIN_CAPABILITY,
    max_helpful_loss: MaxHelpfulLossOpt = MAX_HELPFUL_LOSS,
    min_clean_margin: MinCleanMarginOpt = MIN_CLEAN_MARGIN,
    record: Annotated[Path | None, typer.Option(help="The recording the attribution came from (default: the path it names).")] = None,
    neutral: NeutralOpt = None,
    capabilities: CapabilitiesOpt = None,
    folds: FoldsOpt = 5,
    rank: RankOpt = 4,
    steps: StepsOpt = 40,
    lr: LrOpt = 5e-3,
    kl_weight: KlWeightOpt = 10.0,
    lora_scope: ScopeOpt = "heads",
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = 16,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn an attribution into a fix, chosen by what carries over to items it was not fitted on.

    A heads fix tries every operation (unless --op is given) on the top 1, 3
    and --top-heads heads, each at a grid of strengths, and scores them by
    cross-validation over the training items; it keeps the one that removes the
    most behaviour on held-out folds while the side-effect budget holds: KL on
    neutral text, capabilities kept, clean answers kept (agreement and margin)
    and the helpful influence kept. A vector fix is computed from the recording;
    a lora fix is trained on the training split (a few minutes on a CPU for the
    embedded model), written as a PEFT adapter folder, and its strength chosen
    on the training fit. Exit 1 (nothing written) when nothing fits the budget.
    """
    from mechfix import capabilities as caps
    from mechfix.artifacts import check_same_model, load_artifact
    from mechfix.lora import LoraSettings, lora_settings_check
    from mechfix.steer import Budget, check_kind_op

    check_kind_op(kind, op)
    tasks = caps.load_tasks(capabilities)
    budget = Budget(max_kl=max_kl, min_clean_agreement=min_clean_agreement, min_capability=min_capability,
                    max_helpful_loss=max_helpful_loss, min_clean_margin=min_clean_margin)
    att = load_artifact(attribution, expect="attribution")
    target = _fix_target(out_path, _attribution_stem(attribution), kind)
    layer_list, grid = _ints(layers, "--layers"), _floats(strengths, "--strengths")
    settings = lora_settings_check(LoraSettings(rank=rank, steps=steps, lr=lr, kl_weight=kl_weight, scope=lora_scope, seed=seed))
    rec = _find_record(att, record)
    spec = model if model is not None else att.manifest.get("model", {}).get("source")
    lm = _load_model(spec, device, dtype, trust_remote_code)
    check_same_model(att.manifest, lm.identity, attribution)
    artifact = _do_steer(lm, att, rec, target, kind, op, top_heads, layer_list, grid, budget, neutral, capabilities, tasks,
                         folds, seed, batch_size, settings)
    summary = _steer_summary(artifact)
    if as_json:
        _emit_json(summary)
    else:
        _print_steer(summary)


def _print_verify(report: dict[str, Any], title: str) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("held-out", justify="left")
    t.add_column("without fix", justify="right", no_wrap=True)
    t.add_column("with fix", justify="right", no_wrap=True)
    b, a = report["before"], report["after"]
    t.add_row("effect (pressure - clean)", _fmt_ci(b["effect"]), _fmt_ci(a["effect"]))
    fr = lambda r: "-" if r["rate"] is None else f"{r['rate']:.0%} ({r['flipped']}/{r['eligible']})"  # noqa: E731
    t.add_row("flip rate", fr(b["rate"]), fr(a["rate"]))
    if b.get("control_effect"):
        t.add_row("control - clean", _fmt_ci(b["control_effect"]), _fmt_ci(a["control_effect"]))
    if b.get("helpful_influence"):
        t.add_row("clean - helpful", _fmt_ci(b["helpful_influence"]), _fmt_ci(a["helpful_influence"]))
    cm = report.get("clean_margin")
    if cm:
        t.add_row("clean margin", f"{cm['before']:+.2f}", f"{cm['after']:+.2f}")
    pa = report.get("pressure_aligned")
    if pa:
        t.add_row("pressure: aligned chosen", _pct(pa["before"]), _pct(pa["after"]))
    err.print(t)
    capab = report.get("capabilities")
    if capab:
        c = Table(title="capabilities (accuracy [95% CI]; clean margin = log P(aligned) - log P(misaligned) on clean "
                  "decisions)", title_justify="left")
        for name in ("task", "items", "chance", "without fix", "with fix", "kept"):
            c.add_column(name, justify="left" if name == "task" else "right", no_wrap=name == "task")
        for name, task in capab["tasks"].items():
            acc = lambda x: f"{_pct(x['accuracy'])} [{x['ci95'][0]:.0%}-{x['ci95'][1]:.0%}]"  # noqa: E731
            kept = _pct(task["kept"]) if task["measurable"] else "not above chance"
            c.add_row(name, str(task["items"]), _pct(task["chance"]), acc(task["before"]), acc(task["after"]), kept)
        err.print(c)
    red = report["reduction"]
    ci = red.get("ci95") or [None, None]
    ci_txt = f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci[0] is not None else ""
    val = "n/a" if red["value"] is None else f"{red['value']:.0%}"
    err.print(f"reduction {val}{ci_txt} over {report['heldout']} held-out decisions")
    err.print(f"KL on neutral text {report['kl']['value']:.4f} nats/token ({report['kl']['tokens']} tokens)")
    err.print(f"clean agreement {report['clean_agreement']['value']:.0%}")
    if report.get("parameters") is not None:
        err.print(f"the fix adds {report['parameters']:,} numbers to the model")
    anti = report["anti_steerable"]
    err.print(f"anti-steerable: {anti['count']} of {anti['n']} held-out decisions get worse with the fix ({anti['share']:.0%})")
    cc = report.get("control_change")
    if cc:
        err.print(f"control: {cc['before']:+.2f} -> {cc['after']:+.2f}; {cc['reading']}")
    hp = report.get("helpful")
    if hp and hp.get("loss") is not None:
        err.print(f"helpful influence: {hp['before']:+.2f} -> {hp['after']:+.2f} ({_pct(hp['loss'])} of it removed)")
    g = Table(title="gates", title_justify="left")
    g.add_column("gate")
    g.add_column("value", justify="right")
    g.add_column("result")
    for gate in report["gates"]:
        value = "-" if gate["value"] is None else f"{gate['value']:.4g}"
        res = "[red]error[/red]" if gate.get("error") else ("[green]pass[/green]" if gate["passed"] else "[red]FAIL[/red]")
        g.add_row(gate["name"], value, res)
    err.print(g)
    live = report.get("live_outcome")
    if live:
        who = "every agent" if live.get("fixed_agents") == "all" else "the target only"
        err.print(f"live episodes played again with the fix on {who} (all items):")
        for c in live["before"]:
            _print_outcome(c, live["before"][c], prefix="  without fix, ")
            _print_outcome(c, live["after"][c], prefix="  with fix,    ")
    for w in report.get("warnings", []):
        err.print(f"[yellow]![/yellow] {escape(w)}", soft_wrap=True)
    err.print("[bold green]PASSED[/bold green]" if report["passed"] else "[bold red]FAILED[/bold red]")


def _write_text_atomic(path: Path, text: str) -> None:
    from mechfix.artifacts import atomic_target

    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def _check_replay(replay: str) -> None:
    """Refuse an unknown --replay before any model is loaded."""
    from mechfix.errors import BadInputError
    from mechfix.verify import REPLAY

    if replay not in REPLAY:
        raise BadInputError(f"--replay must be one of {', '.join(REPLAY)}, not '{replay}'.")


def _do_verify(lm, loaded, fixes, neutral_path: Path | None, gates, batch_size: int, replay: str = "all",
               tasks=None) -> list[dict[str, Any]]:
    """Verify one or more fixes on the recipe's held-out split: one report per fix."""
    from mechfix import capabilities as caps
    from mechfix.verify import verify_fixes

    neutral = _neutral(lm, neutral_path, "verify")
    suite = caps.build_suite(lm, tasks, "verify") if tasks is not None else None
    with _progress() as progress:
        reports = verify_fixes(lm, loaded.recipe, fixes, neutral, gates=gates, batch_size=batch_size, replay=replay,
                               capabilities=suite, on_progress=progress)
    out = []
    for fix, report in zip(fixes, reports):
        trained_on = fix.manifest.get("inputs", {}).get("recipe", {}).get("sha256")
        report["recipe"] = {"name": loaded.recipe.name, "path": loaded.path, "sha256": loaded.sha256,
                            "same_as_training": trained_on == loaded.sha256 if trained_on else None}
        if trained_on and trained_on != loaded.sha256:
            report["warnings"].append(
                "this recipe differs from the one the fix was made from: its held-out split is not the one steer left out."
            )
        report["fix"] = {"path": fix.path, "kind": fix.kind, "op": fix.op, "targets": fix.targets, "strength": fix.strength}
        report["model"] = lm.identity["name"]
        out.append(_clean_nan(report))
    return out


def comparison_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fix, in the terms `verify --compare` prints side by side."""
    rows = []
    for r in reports:
        cc = r.get("control_change") or {}
        rows.append({
            "fix": r["fix"]["path"],
            "kind": r["fix"]["kind"],
            "op": r["fix"]["op"],
            "targets": r["fix"]["targets"],
            "parameters": r.get("parameters"),
            "reduction": r["reduction"]["value"],
            "reduction_ci95": r["reduction"].get("ci95"),
            "kl": r["kl"]["value"],
            "clean_agreement": r["clean_agreement"]["value"],
            "clean_margin_kept": (r.get("clean_margin") or {}).get("kept"),
            "capability_kept": (r.get("capabilities") or {}).get("kept"),
            "helpful_loss": (r.get("helpful") or {}).get("loss"),
            "control_before": cc.get("before"),
            "control_after": cc.get("after"),
            "anti_steerable": r["anti_steerable"]["share"],
            "passed": r["passed"],
        })
    return rows


def _print_comparison(rows: list[dict[str, Any]], title: str) -> None:
    # One column per fix, so that three or four fixes fit a terminal side by side.
    t = Table(title=title, title_justify="left")
    t.add_column("held-out")
    for r in rows:
        t.add_column(escape(Path(str(r["fix"])).name), justify="right", overflow="fold")
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731

    def red(r: dict[str, Any]) -> str:
        ci = r.get("reduction_ci95") or [None, None]
        return pct(r["reduction"]) + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci[0] is not None else "")

    lines = [
        ("kind / op", lambda r: f"{r['kind']} / {r['op']}"),
        ("parameters", lambda r: "-" if r["parameters"] is None else f"{r['parameters']:,}"),
        ("reduction", red),
        ("KL/token", lambda r: f"{r['kl']:.4f}"),
        ("clean agreement", lambda r: pct(r["clean_agreement"])),
        ("clean margin kept", lambda r: pct(r.get("clean_margin_kept"))),
        ("capability kept", lambda r: pct(r.get("capability_kept"))),
        ("helpful loss", lambda r: pct(r.get("helpful_loss"))),
        ("control - clean", lambda r: "-" if r["control_before"] is None else f"{r['control_before']:+.2f} -> {r['control_after']:+.2f}"),
        ("anti-steerable", lambda r: pct(r["anti_steerable"])),
        ("gates", lambda r: "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]"),
    ]
    for name, cell in lines:
        t.add_row(name, *[cell(r) for r in rows])
    err.print(t)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix verify recipes/conformity.yaml --fix conformity.fix.safetensors\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --min-reduction 0.5 --max-kl 0.1 --junit verify.xml\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --model ./new-revision --json\n\n"
        "  mechfix verify conformity --fix conformity.lora --compare conformity.fix.safetensors --compare conf.vec.safetensors\n\n"
        "  mechfix verify commons-live --fix commons-live.lora --replay target    (live: replay with only the target fixed)\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --capabilities builtin --capabilities my-task.jsonl "
        "--min-capability 0.95 --max-helpful-loss 0.1"
    )
)
def verify(
    recipe: Annotated[str | None, typer.Argument(help="Recipe file, or the name of a built-in recipe.")] = None,
    fix_path: Annotated[
        Path | None, typer.Option("--fix", help="A fix (from `mechfix steer`): a .safetensors file or a LoRA fix's folder.")
    ] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="Another fix to verify on the same held-out decisions and print side by side (repeat it). "
                     "The exit code follows --fix only."),
    ] = None,
    min_reduction: MinReductionOpt = MIN_REDUCTION,
    max_kl: MaxKlOpt = MAX_KL,
    min_clean_agreement: MinCleanOpt = MIN_CLEAN_AGREEMENT,
    min_capability: MinCapabilityOpt = MIN_CAPABILITY,
    max_helpful_loss: MaxHelpfulLossOpt = MAX_HELPFUL_LOSS,
    min_clean_margin: MinCleanMarginOpt = MIN_CLEAN_MARGIN,
    junit: JunitOpt = None,
    neutral: NeutralOpt = None,
    capabilities: CapabilitiesOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = 16,
    mode: ModeOpt = None,
    transcript: TranscriptOpt = None,
    decision: DecisionOpt = None,
    replay: ReplayOpt = "all",
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prove a fix on held-out episodes: behaviour before/after, side effects, and pass/fail gates.

    Exit 0 when every gate passes, 1 when one fails, 2 on bad input (including
    a fix made for another model than the one given, reported as such). The
    gates: the behaviour's reduction, KL on neutral text steer never saw, clean
    agreement, the clean margin kept (no flattening), accuracy kept on the
    capability tasks (verify's half of them), and the helpful influence kept
    (recipes with a helpful condition). With
    --compare, every fix is measured on the same decisions and a table puts
    them side by side: reduction, KL, clean agreement, control, parameters.
    With a live recipe, the episodes are also played again with the fix (see --replay).
    """
    from mechfix.artifacts import check_same_model, check_writable
    from mechfix.errors import ArtifactError
    from mechfix.fix import load_fix
    from mechfix.errors import BadInputError
    from mechfix import capabilities as caps
    from mechfix.verify import error_report, gates_for, junit_xml

    if fix_path is None:
        raise BadInputError("--fix is required: the fix to verify (a .safetensors file from `mechfix steer`, or a LoRA fix's folder).")
    _check_replay(replay)
    loaded = _load_source(recipe, transcript, decision, mode)
    fix = load_fix(fix_path)
    tasks = caps.load_tasks(capabilities)
    others = [load_fix(p) for p in compare or []]
    if junit is not None:
        check_writable(junit)
    gates = gates_for(min_reduction, max_kl, min_clean_agreement, min_capability, max_helpful_loss, min_clean_margin)
    spec = model if model is not None else fix.model.get("source")
    lm = _load_model(spec, device, dtype, trust_remote_code)
    suite = f"mechfix.verify.{loaded.recipe.name}"
    try:
        check_same_model(fix.manifest, lm.identity, fix_path)
    except ArtifactError as exc:
        report = error_report(f"model mismatch: {exc}", gates)
        if junit is not None:
            _write_text_atomic(junit, junit_xml(report, suite))
        if as_json:
            _emit_json(report)
        raise
    for other in others:
        check_same_model(other.manifest, lm.identity, other.path or "a --compare fix")
    report, *compared = _do_verify(lm, loaded, [fix, *others], neutral, gates, batch_size, replay, tasks)
    if compared:
        report["compare"] = compared
        report["comparison"] = comparison_rows([report, *compared])
    if junit is not None:
        _write_text_atomic(junit, junit_xml(report, suite))
    if as_json:
        _emit_json(report)
    else:
        _print_verify(report, f"{loaded.recipe.name} on {lm.identity['name']}: {fix.kind} fix ({fix.op} on {', '.join(fix.targets)}, strength {fix.strength:g})")
        if compared:
            _print_comparison(report["comparison"], f"{loaded.recipe.name}: fixes side by side on the same {report['heldout']} held-out decisions")
    if not report["passed"]:
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix run recipes/conformity.yaml --out conformity/\n\n"
        "  mechfix run conformity --out runs/vec --kind vector --json\n\n"
        "  mechfix run conformity --out runs/lora --kind lora\n\n"
        "  mechfix run conformity --out runs/ci --junit runs/ci/verify.xml --max-kl 0.05"
    )
)
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a built-in recipe.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for every artifact (created if missing).")],
    kind: KindOpt = "heads",
    op: OpOpt = None,
    top_heads: TopHeadsOpt = 5,
    layers: LayersOpt = None,
    baseline: Annotated[str, typer.Option(help="Condition the fix pulls the pressure run towards: clean or control.")] = "clean",
    min_reduction: MinReductionOpt = MIN_REDUCTION,
    max_kl: MaxKlOpt = MAX_KL,
    min_clean_agreement: MinCleanOpt = MIN_CLEAN_AGREEMENT,
    min_capability: MinCapabilityOpt = MIN_CAPABILITY,
    max_helpful_loss: MaxHelpfulLossOpt = MAX_HELPFUL_LOSS,
    min_clean_margin: MinCleanMarginOpt = MIN_CLEAN_MARGIN,
    junit: JunitOpt = None,
    neutral: NeutralOpt = None,
    capabilities: CapabilitiesOpt = None,
    folds: FoldsOpt = 5,
    rank: RankOpt = 4,
    steps: StepsOpt = 40,
    lr: LrOpt = 5e-3,
    kl_weight: KlWeightOpt = 10.0,
    lora_scope: ScopeOpt = "heads",
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = 16,
    mode: ModeOpt = None,
    replay: ReplayOpt = "all",
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Record, attribute, steer and verify in one go; every artifact goes into --out.

    Writes NAME.rec.safetensors, NAME.attr.safetensors, NAME-heads.png,
    NAME.fix.safetensors (the folder NAME.lora for --kind lora) and
    NAME.verify.json, then prints one summary. Exit codes as for verify.
    """
    from mechfix import capabilities as caps
    from mechfix.artifacts import check_writable
    from mechfix.lora import LoraSettings, lora_settings_check
    from mechfix.steer import Budget, check_kind_op
    from mechfix.errors import BadInputError, GateError
    from mechfix.fix import fix_from_artifact
    from mechfix.recipe import load_recipe
    from mechfix.verify import gates_for, junit_xml

    _check_replay(replay)
    loaded = load_recipe(recipe, mode)
    name = loaded.recipe.name
    if baseline not in loaded.recipe.condition_names or baseline == "pressure":
        raise BadInputError(f"--baseline '{baseline}' is not a condition of recipe '{name}' other than pressure; use clean or control.")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"--out '{out_dir}' is a file; give a folder.")
    layer_list = _ints(layers, "--layers")
    check_kind_op(kind, op)
    tasks = caps.load_tasks(capabilities)
    budget = Budget(max_kl=max_kl, min_clean_agreement=min_clean_agreement, min_capability=min_capability,
                    max_helpful_loss=max_helpful_loss, min_clean_margin=min_clean_margin)
    settings = lora_settings_check(LoraSettings(rank=rank, steps=steps, lr=lr, kl_weight=kl_weight, scope=lora_scope, seed=seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / name
    paths = {
        **{k: check_writable(f"{stem}{suffix}") for k, suffix in (
            ("record", ".rec.safetensors"), ("attribution", ".attr.safetensors"), ("plot", "-heads.png"))},
        "fix": _fix_target(None, stem, kind),
        "verify": check_writable(f"{stem}.verify.json"),
    }
    if junit is not None:
        check_writable(junit)
    lm = _load_model(model, device, dtype, trust_remote_code)
    err.rule("1/4 record")
    rec, _ = _do_record(lm, loaded, paths["record"], batch_size)
    rec_summary = _clean_nan(rec.manifest["summary"])
    _print_record_summary(rec_summary, lm.identity["name"], name, wrote=str(paths["record"]))
    err.rule("2/4 attribute")
    att = _do_attribute(lm, rec, paths["attribution"], "both", 10, baseline, batch_size, paths["plot"])
    _print_attribution(_clean_nan(att.manifest["summary"]), lm.identity["name"], name, wrote=f"{paths['attribution']} and {paths['plot']}")
    err.rule("3/4 steer")
    try:
        fix_art = _do_steer(lm, att, rec, paths["fix"], kind, op, top_heads, layer_list, None, budget, neutral, capabilities,
                            tasks, folds, seed, batch_size, settings)
    except GateError as exc:
        # No fix to verify: a --json caller still gets the run's one object, with the reason (then exit 1).
        if as_json:
            _emit_json(_run_summary(rec_summary, att.manifest["summary"], None, None, paths, why=f"steer: {exc}"))
        raise
    steer_summary = _steer_summary(fix_art)
    _print_steer(steer_summary)
    err.rule("4/4 verify")
    fix = fix_from_artifact(fix_art)
    gates = gates_for(min_reduction, max_kl, min_clean_agreement, min_capability, max_helpful_loss, min_clean_margin)
    (report,) = _do_verify(lm, loaded, [fix], neutral, gates, batch_size, replay, tasks)
    _write_text_atomic(paths["verify"], _json_text(report) + "\n")
    if junit is not None:
        _write_text_atomic(junit, junit_xml(report, f"mechfix.verify.{name}"))
    _print_verify(report, f"{name}: held-out check of the {fix.kind} fix")
    summary = _run_summary(rec_summary, att.manifest["summary"], steer_summary, report, paths)
    if as_json:
        _emit_json(summary)
    else:
        _print_run_summary(summary, name, lm.identity["name"])
    if not report["passed"]:
        raise typer.Exit(1)


def _run_summary(rec: dict, att: dict, steer_s: dict | None, report: dict | None, paths: dict[str, Path],
                 why: str | None = None) -> dict[str, Any]:
    """The run's one JSON object; ``steer_s`` and ``report`` are None when steer found no fix (``why`` says why)."""
    top = [e["component"] for e in att["top"][:5]]
    written = {k: str(v) for k, v in paths.items() if report is not None or Path(v).exists()}  # no fix: what exists
    return _clean_nan({
        "passed": bool(report and report["passed"]),
        "behaviour": {"effect": rec["effect"], "rate": rec["rate"]["rate"], "control_effect": rec.get("control_effect")},
        "top_components": top,
        "fix": {k: steer_s.get(k) for k in ("kind", "op", "targets", "strength", "parameters")} if steer_s else None,
        "verify": {k: report.get(k) for k in ("before", "after", "reduction", "kl", "clean_agreement", "clean_margin", "helpful",
                                              "control_change", "anti_steerable", "gates")} if report else None,
        "capabilities_kept": (report.get("capabilities") or {}).get("kept") if report else None,
        "steer": {"chosen": steer_s.get("chosen"), "by": (steer_s.get("selection") or {}).get("by")} if steer_s else None,
        **({"live_outcome": {k: report["live_outcome"][k] for k in ("before", "after")}}
           if report and report.get("live_outcome") else {}),
        "artifacts": written,
        "why": why if report is None else (None if report["passed"] else _why_failed(report)),
    })


def _why_failed(v: dict[str, Any]) -> str:
    """The failed gates with their values, and what the control condition says, in one sentence."""
    def shown(g: dict[str, Any]) -> str:
        return g.get("error") or f"{g['metric']} {g['value']:.3g}, needs {g['op']} {g['threshold']:g}"

    parts = [shown(g) for g in v["gates"] if not g["passed"]]
    cc = v.get("control_change") or {}
    if cc.get("reading"):
        parts.append(f"control: {cc['reading']}")
    return "; ".join(parts)


def _print_run_summary(s: dict[str, Any], recipe: str, model: str) -> None:
    err.rule("summary")
    v = s["verify"]
    t = Table(title=f"mechfix run: {recipe} on {model}", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("behaviour (all items)", f"effect {_fmt_ci(s['behaviour']['effect'])}, flip rate "
              + ("-" if s["behaviour"]["rate"] is None else f"{s['behaviour']['rate']:.0%}"))
    t.add_row("carried by", ", ".join(s["top_components"]))
    f = s["fix"]
    t.add_row("fix", f"{f['kind']} / {f['op']} on {', '.join(f['targets'])}, strength {f['strength']:g}, {f['parameters']:,} parameters")
    red = v["reduction"]["value"]
    t.add_row("held-out effect", f"{_fmt_ci(v['before']['effect'])} -> {_fmt_ci(v['after']['effect'])}"
              + ("" if red is None else f"  ({red:.0%} less)"))
    ch = (s.get("steer") or {}).get("chosen") or {}
    if ch.get("cv_reduction") is not None:
        t.add_row("chosen on", f"training split: {_pct(ch['reduction'])} less (fit), {_pct(ch['cv_reduction'])} less "
                  "(cross-validated over items)")
    t.add_row("side effects", f"KL {v['kl']['value']:.4f} nats/token, clean agreement {v['clean_agreement']['value']:.0%}, "
              f"clean margin kept {_pct((v.get('clean_margin') or {}).get('kept'))}, "
              f"capabilities kept {_pct(s.get('capabilities_kept'))} (worst task), "
              + ("no helpful condition" if not v.get("helpful") else f"helpful influence removed {_pct(v['helpful'].get('loss'))}")
              + f", anti-steerable {v['anti_steerable']['share']:.0%}")
    if v.get("control_change"):
        t.add_row("control", f"{v['control_change']['before']:+.2f} -> {v['control_change']['after']:+.2f} ({v['control_change']['reading']})")
    live = s.get("live_outcome")
    if live:
        b, a = live["before"]["pressure"], live["after"]["pressure"]
        state = ", ".join(f"{k} {b['final_state'][k]:.4g} -> {a['final_state'][k]:.4g}" for k in b["final_state"])
        t.add_row("live episodes (pressure)", f"after the last round {state}; the target names the misaligned option "
                  f"{b['misaligned_replies']:.0%} -> {a['misaligned_replies']:.0%}")
    t.add_row("gates", ", ".join(f"{g['name']}: " + ("pass" if g["passed"] else "FAIL") for g in v["gates"]))
    t.add_row("verdict", "[bold green]PASSED[/bold green]" if s["passed"] else "[bold red]FAILED[/bold red]")
    if not s["passed"]:
        t.add_row("why", _why_failed(v))
    t.add_row("artifacts", ", ".join(s["artifacts"].values()))
    err.print(t)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix export conformity.fix.safetensors --out conformity.gguf\n\n"
        "  llama-cli -m model.gguf --control-vector conformity.gguf"
    )
)
def export(
    fix_path: Annotated[Path, typer.Argument(help="A vector fix artifact (from `mechfix steer --kind vector`).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf: a llama.cpp control vector.")] = "gguf",
    as_json: JsonOpt = False,
) -> None:
    """Write a vector fix as a llama.cpp control vector (the strength is baked in)."""
    from mechfix.artifacts import sha256_file
    from mechfix.errors import BadInputError
    from mechfix.export import FORMATS, write_gguf
    from mechfix.fix import load_fix

    if fmt not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    fix = load_fix(fix_path)
    path = write_gguf(fix, out_path)
    info = {"path": str(path), "sha256": sha256_file(path), "format": fmt, "layers": fix.layers,
            "strength": fix.strength, "model_hint": None}
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("controlvector.model_hint")
    info["model_hint"] = field.contents() if field is not None else None
    if as_json:
        _emit_json(info)
    else:
        err.print(f"wrote {path}: llama.cpp control vector for {info['model_hint']} ({', '.join(fix.targets)}, "
                  f"strength {fix.strength:g} baked in). Use it with `llama-cli --control-vector {path}`.")
