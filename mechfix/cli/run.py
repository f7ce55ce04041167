"""``mechfix run``: record, attribute, steer and verify in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechfix.cli.checks import check_paths, named
from mechfix.textio import clean_nan, write_text_atomic
from mechfix.cli.options import BudgetOptions, LoraOptions, ModelOptions, ProbeOptions, with_groups
from mechfix.cli.common import (
    BaselinesOpt,
    CapabilitiesOpt,
    ChatTemplateOpt,
    FoldsOpt,
    JsonOpt,
    JunitOpt,
    KindOpt,
    LayersOpt,
    MinReductionOpt,
    ModeOpt,
    NeutralOpt,
    OpOpt,
    PortableOpt,
    PromptFixOpt,
    ReplayOpt,
    SeedOpt,
    StyleOpt,
    TopHeadsOpt,
    TrustOpt,
    check_replay,
    emit_json,
    parse_ints,
    check_remote,
    app,
    progress_bars,
    err,
)
from mechfix.cli.record import pick_style, source_inputs
from mechfix.cli.steer import (
    steer_summary,
    check_lora_folder,
    fix_outputs,
    print_failed_sweep,
)
from mechfix.cli.views import (
    print_attribution,
    print_comparison,
    print_record_summary,
    print_run_summary,
    print_steer,
    print_verify,
)
from mechfix.defaults import (
    MIN_REDUCTION,
)
from mechfix.measure.verdict import why_failed


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix run recipes/conformity.yaml --out conformity/\n\n"
        "  mechfix run conformity --out runs/vec --kind vector --json\n\n"
        "  mechfix run conformity --out runs/lora --kind lora\n\n"
        "  mechfix run conformity --out runs/gated --gate probe\n\n"
        "  mechfix run conformity --out runs/base --baselines    (the fix beside a prompt and a protocol remedy)\n\n"
        "  mechfix run conformity --out runs/chat --style chat --chat-template gemma\n\n"
        "  mechfix run conformity --out runs/ci --junit runs/ci/verify.xml --max-kl 0.05"
    )
)


@with_groups
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a built-in recipe.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for every artifact (created if missing).")],
    kind: KindOpt = "heads",
    op: OpOpt = None,
    top_heads: TopHeadsOpt = 5,
    layers: LayersOpt = None,
    baseline: Annotated[str, typer.Option(help="Condition the fix pulls the pressure run towards: clean or control.")] = "clean",
    min_reduction: MinReductionOpt = MIN_REDUCTION,
    baselines: BaselinesOpt = False,
    prompt_fix: PromptFixOpt = None,
    budget: BudgetOptions = BudgetOptions(),
    junit: JunitOpt = None,
    neutral: NeutralOpt = None,
    capabilities: CapabilitiesOpt = None,
    folds: FoldsOpt = 5,
    lora: LoraOptions = LoraOptions(),
    portable: PortableOpt = False,
    probe: ProbeOptions = ProbeOptions(),
    seed: SeedOpt = 0,
    models: ModelOptions = ModelOptions(),
    mode: ModeOpt = None,
    replay: ReplayOpt = "all",
    style: StyleOpt = None,
    chat_template: ChatTemplateOpt = None,
    trust_remote_code: TrustOpt = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not write NAME.report.html (see `mechfix report`).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Record, attribute, steer and verify in one go; every artifact goes into --out.

    Writes NAME.rec.safetensors, NAME.attr.safetensors, NAME-heads.png,
    NAME.fix.safetensors (the folder NAME.lora for --kind lora),
    NAME.verify.json and NAME.report.html (the page `mechfix report` makes;
    --no-report leaves it out), then prints one summary. Exit codes as for verify.
    """
    from mechfix.measure import capabilities as caps
    from mechfix.errors import BadInputError
    from mechfix.scenario.recipe import load_recipe
    from mechfix.stages.pipeline import run as run_pipeline
    from mechfix.stages.pipeline import run_paths
    from mechfix.stages.steer import check_kind_op, check_portable
    from mechfix.stages.verify import junit_xml

    check_replay(replay)
    loaded = load_recipe(recipe, mode)
    name = loaded.recipe.name
    if baseline not in loaded.recipe.condition_names or baseline == "pressure":
        raise BadInputError(f"--baseline '{baseline}' is not a condition of recipe '{name}' other than pressure; use clean or control.")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"--out '{out_dir}' is a file; give a folder.")
    paths = run_paths(out_dir, name, kind, report=not no_report)
    files, folders = fix_outputs(paths["fix"], kind, "the fix")
    check_paths({**source_inputs(loaded, None, None, chat_template), "--neutral": neutral, "--prompt-fix": prompt_fix},
                {**{f"the {k}": p for k, p in paths.items() if k != "fix"}, **files, "--junit": junit}, folders,
                either=named("--capabilities", capabilities, skip="builtin"))
    check_lora_folder(paths["fix"], kind)
    layer_list = parse_ints(layers, "--layers")
    check_kind_op(kind, op)
    check_remote(models.remote, recipe=loaded.recipe, kind=kind, gate=probe.gate)
    gate = probe.settings(kind)
    if portable:
        check_portable(kind, op, gate)
    caps.load_tasks(capabilities)  # refused here, before the model loads
    if prompt_fix is not None:
        from mechfix.stages.remedies import instruction_text

        instruction_text(str(prompt_fix))
    limits = budget.budget()
    settings = lora.settings(seed)
    lm, batch_size = models.load(trust_remote_code)
    rendering = pick_style(lm, loaded, style, chat_template)
    model_name = lm.identity["name"]
    titles = {"record": "1/4 record", "attribute": "2/4 attribute", "steer": "3/4 steer", "verify": "4/4 verify"}

    def on_stage(stage: str, made) -> None:
        if made is None:
            err.rule(titles[stage])
        elif stage == "record":
            print_record_summary(clean_nan(made.manifest["summary"]), model_name, name, wrote=str(paths["record"]))
        elif stage == "attribute":
            print_attribution(clean_nan(made.manifest["summary"]), model_name, name,
                               wrote=f"{paths['attribution']} and {paths['plot']}")
        elif stage == "steer":
            print_steer(steer_summary(made))
        else:
            print_verify(made, f"{name}: held-out check of the {kind} fix")

    result = run_pipeline(loaded, out_dir, lm, kind=kind, op=op, top_heads=top_heads, layers=layer_list, baseline=baseline,
                          budget=limits, min_reduction=min_reduction, neutral=neutral, capabilities=capabilities,
                          folds=folds, seed=seed, lora=settings, gate=gate, portable=portable, batch_size=batch_size,
                          replay=replay, style=rendering, report=not no_report, baselines=baselines, prompt_fix=prompt_fix,
                          progress=progress_bars, on_stage=on_stage)
    rec_summary, att_summary = clean_nan(result.recording.manifest["summary"]), result.attribution.manifest["summary"]
    if result.steer_error is not None:
        # No fix to verify: the page still shows the diagnosis; a --json caller gets the run's one object (then exit 1).
        print_failed_sweep(result.steer_error, limits)
        _said_report(paths)
        if as_json:
            emit_json(_run_summary(rec_summary, att_summary, None, None, paths, why=f"steer: {result.steer_error}"))
        raise result.steer_error
    report = result.report
    if junit is not None:
        write_text_atomic(junit, junit_xml(report, f"mechfix.verify.{name}"))
    _said_report(paths)
    summary = _run_summary(rec_summary, att_summary, steer_summary(result.fix), report, paths)
    if as_json:
        emit_json(summary)
    else:
        print_run_summary(summary, name, model_name)
        if report.get("comparison"):
            print_comparison(report["comparison"], f"{name}: the fix beside the baselines on the same {report['heldout']} "
                             "held-out decisions")
    if not result.passed:
        raise typer.Exit(1)


def _said_report(paths: dict[str, Path]) -> None:
    """Say where the run's page went (none when --no-report)."""
    if "report" in paths:
        err.print(f"wrote {paths['report']}", highlight=False)


def _run_summary(rec: dict, att: dict, steer_s: dict | None, report: dict | None, paths: dict[str, Path],
                 why: str | None = None) -> dict[str, Any]:
    """The run's one JSON object; ``steer_s`` and ``report`` are None when steer found no fix (``why`` says why)."""
    top = [e["component"] for e in att["top"][:5]]
    written = {k: str(v) for k, v in paths.items() if report is not None or Path(v).exists()}  # no fix: what exists
    return clean_nan({
        "passed": bool(report and report["passed"]),
        "behaviour": {"effect": rec["effect"], "rate": rec["rate"]["rate"], "control_effect": rec.get("control_effect"),
                      "harm": rec.get("harm"), "help": rec.get("help")},
        "top_components": top,
        "fix": {k: steer_s.get(k) for k in ("kind", "op", "targets", "strength", "parameters")} if steer_s else None,
        "verify": {k: report.get(k) for k in ("before", "after", "reduction", "kl", "clean_agreement", "clean_margin", "helpful",
                                              "harm", "help", "overshoot", "control_change", "anti_steerable", "gates",
                                              "probe", "comparison")} if report else None,
        "capabilities_kept": (report.get("capabilities") or {}).get("kept") if report else None,
        "steer": {"chosen": steer_s.get("chosen"), "by": (steer_s.get("selection") or {}).get("by")} if steer_s else None,
        **({"live_outcome": {k: report["live_outcome"][k] for k in ("before", "after")}}
           if report and report.get("live_outcome") else {}),
        "artifacts": written,
        "why": why if report is None else (None if report["passed"] else why_failed(report)),
    })
