"""``mechfix verify``: prove a fix on held-out items, against every gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechfix.cli.checks import check_paths, named
from mechfix.textio import write_text_atomic
from mechfix.cli.options import BudgetOptions, ModelOptions, with_groups
from mechfix.cli.common import (
    BaselinesOpt,
    CapabilitiesOpt,
    ChatTemplateOpt,
    DecisionOpt,
    JsonOpt,
    JunitOpt,
    MinReductionOpt,
    ModeOpt,
    NeutralOpt,
    PromptFixOpt,
    ReplayOpt,
    StyleOpt,
    TranscriptOpt,
    TrustOpt,
    check_replay,
    emit_json,
    check_remote,
    progress_bars,
    app,
)
from mechfix.cli.record import load_source, pick_style, source_inputs
from mechfix.cli.views import print_comparison, print_verify
from mechfix.defaults import (
    MIN_REDUCTION,
)


def _check_styles(fixes, rendering, recipe: str | None, fix_path: Path) -> None:
    """Refuse to verify a fix on renderings of another style or template than its own (unless asked for)."""
    from mechfix.scenario.chat import recorded_style, style_mismatch
    from mechfix.errors import BadInputError

    for f in fixes:
        made = recorded_style(f.manifest)
        why = style_mismatch(made, rendering)
        if why:
            hint = f"--style {made.get('name', 'text')}" + (
                f" --chat-template {str(made['template']).removeprefix('file:')}" if made.get("name") == "chat" and made.get("template") not in (None, "model") else "")
            raise BadInputError(
                f"{why} ({f.path}). Verify it as it was made: mechfix verify {recipe or '...'} --fix {fix_path} {hint}; "
                "or add --allow-style-mismatch to test how it transfers.")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix verify recipes/conformity.yaml --fix conformity.fix.safetensors\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --min-reduction 0.5 --max-kl 0.1 --junit verify.xml\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --model ./new-revision --json\n\n"
        "  mechfix verify conformity --fix conformity.lora --compare conformity.fix.safetensors --compare conf.vec.safetensors\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --baselines    (beside a prompt and a protocol remedy)\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --prompt-fix my-instruction.txt\n\n"
        "  mechfix verify commons-live --fix commons-live.lora --replay target    (live: replay with only the target fixed)\n\n"
        "  mechfix verify conformity --fix conformity.fix.safetensors --capabilities builtin --capabilities my-task.jsonl "
        "--min-capability 0.95 --max-helpful-loss 0.1"
    )
)


@with_groups
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
    baselines: BaselinesOpt = False,
    prompt_fix: PromptFixOpt = None,
    min_reduction: MinReductionOpt = MIN_REDUCTION,
    budget: BudgetOptions = BudgetOptions(),
    junit: JunitOpt = None,
    neutral: NeutralOpt = None,
    capabilities: CapabilitiesOpt = None,
    models: ModelOptions = ModelOptions(),
    mode: ModeOpt = None,
    transcript: TranscriptOpt = None,
    decision: DecisionOpt = None,
    replay: ReplayOpt = "all",
    style: StyleOpt = None,
    chat_template: ChatTemplateOpt = None,
    allow_style_mismatch: Annotated[
        bool, typer.Option("--allow-style-mismatch", help="Verify on renderings of another style or template than the "
                           "fix was made on (a transfer test); refused otherwise.")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prove a fix on held-out episodes: behaviour before/after, side effects, and pass/fail gates.

    Exit 0 when every gate passes, 1 when one fails, 2 on bad input (including
    a fix made for another model than the one given, reported as such). The
    gates: the behaviour's reduction, KL on neutral text steer never saw, clean
    agreement, the clean margin kept (no flattening), accuracy kept on the
    capability tasks (verify's two thirds of them), the helpful influence kept
    (recipes with a helpful condition), and no overshoot (the fix must not
    push the agent away from the others' answer further than it stands alone).
    The report also splits the decisions by what the model answers alone:
    harm (right -> wrong under pressure) and help (wrong -> right when helped).
    With --compare, every fix is measured on the same decisions and a table
    puts them side by side; --baselines adds a prompt and a protocol remedy as
    columns. With a live recipe, the episodes are also played again with the
    fix (see --replay).
    """
    from mechfix.measure import capabilities as caps
    from mechfix.artifacts import check_same_model
    from mechfix.scenario.chat import recorded_style
    from mechfix.errors import ArtifactError, BadInputError
    from mechfix.fixes.fix import load_fix
    from mechfix.stages.verify import error_report, junit_xml

    if fix_path is None:
        raise BadInputError("--fix is required: the fix to verify (a .safetensors file from `mechfix steer`, or a LoRA fix's folder).")
    check_replay(replay)
    loaded = load_source(recipe, transcript, decision, mode)
    check_paths({**source_inputs(loaded, transcript, decision, chat_template), "--neutral": neutral, "--prompt-fix": prompt_fix},
                {"--junit": junit},
                either={"--fix": fix_path, **named("--compare", compare), **named("--capabilities", capabilities, skip="builtin")})
    fix = load_fix(fix_path)
    caps.load_tasks(capabilities)  # refused here, before the model loads
    if prompt_fix is not None:
        from mechfix.stages.remedies import instruction_text

        instruction_text(str(prompt_fix))
    others = [load_fix(p) for p in compare or []]
    check_remote(models.remote, recipe=loaded.recipe, fixes=[fix, *others])
    gates = budget.gates(min_reduction)
    lm, batch_size = models.load(trust_remote_code, default=fix.model.get("source"))
    suite = f"mechfix.verify.{loaded.recipe.name}"
    try:
        check_same_model(fix.manifest, lm.identity, fix_path)
    except ArtifactError as exc:
        report = error_report(f"model mismatch: {exc}", gates)
        if junit is not None:
            write_text_atomic(junit, junit_xml(report, suite))
        if as_json:
            emit_json(report)
        raise
    for other in others:
        check_same_model(other.manifest, lm.identity, other.path or "a --compare fix")
    rendering = pick_style(lm, loaded, style, chat_template, recorded_style(fix.manifest))
    if not allow_style_mismatch:
        _check_styles([fix, *others], rendering, recipe, fix_path)
    from mechfix.stages.pipeline import verify_all, with_comparison

    with progress_bars() as progress:
        report = with_comparison(*verify_all(loaded, [fix, *others], lm, gates=gates, neutral=neutral,
                                             capabilities=capabilities, batch_size=batch_size, replay=replay,
                                             style=rendering, on_progress=progress, baselines=baselines,
                                             prompt_fix=prompt_fix))
    if junit is not None:
        write_text_atomic(junit, junit_xml(report, suite))
    if as_json:
        emit_json(report)
    else:
        print_verify(report, f"{loaded.recipe.name} on {lm.identity['name']}: {fix.kind} fix ({fix.op} on {', '.join(fix.targets)}, strength {fix.strength:g})")
        if report.get("comparison"):
            print_comparison(report["comparison"], f"{loaded.recipe.name}: fixes side by side on the same {report['heldout']} held-out decisions")
    if not report["passed"]:
        raise typer.Exit(1)
