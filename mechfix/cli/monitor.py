"""``mechfix monitor``: where a gated fix's probe says the target agent comes under pressure, message by message."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mechfix.cli.checks import check_paths
from mechfix.textio import clean_nan
from mechfix.cli.common import (
    BatchOpt,
    ChatTemplateOpt,
    DecisionOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    ModeOpt,
    TranscriptOpt,
    TrustOpt,
    emit_json,
    load_command_model,
    parse_batch_size,
    resolve_batch_size,
    progress_bars,
    app,
    err,
    styled,
)
from mechfix.cli.record import load_source, pick_style, source_inputs


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix monitor conformity --probe conformity.gated.fix.safetensors\n\n"
        "  mechfix monitor --transcript chats.jsonl --decision decision.yaml --probe conformity.gated.fix.safetensors "
        "--condition pressure --max-rate 0.1\n\n"
        "  mechfix monitor conformity --probe gated.fix.safetensors --json > monitor.json"
    )
)


def monitor(
    recipe: Annotated[str | None, typer.Argument(help="Recipe file, or the name of a built-in recipe.")] = None,
    probe: Annotated[Path, typer.Option("--probe", help="A gated fix (from `mechfix steer --gate probe`): its probe is used.")] = ...,
    condition: Annotated[
        list[str] | None,
        typer.Option("--condition", help="Conditions to monitor (repeat; default all). For a transcript, 'pressure' is "
                     "the conversation as it happened."),
    ] = None,
    max_rate: Annotated[
        float | None,
        typer.Option("--max-rate", min=0.0, max=1.0, help="Exit 1 when more than this share of the conversations is "
                     "flagged at its decision (for CI)."),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Conversations listed in the table (all are in --json).")] = 20,
    transcript: TranscriptOpt = None,
    decision: DecisionOpt = None,
    mode: ModeOpt = None,
    chat_template: ChatTemplateOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = "auto",
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score the target agent's view of every conversation with a gated fix's probe, message by message.

    The probe is read where it was fitted, at the target's opened turn: at the
    decision (flagged when it fires there), and at the decision as it would
    have been after each message, so each message gets the rise it caused.
    Forward passes run only up to the probe's layer (no generation for
    scripted recipes and transcripts). Conversations are rendered in the style
    the probe's fix was made on (text, or the target's chat). Exit 0, or 1 when --max-rate is given
    and more conversations are flagged than it allows; 2 on bad input.
    """
    from mechfix.artifacts import check_same_model
    from mechfix.scenario.chat import recorded_style, style_mismatch
    from mechfix.errors import BadInputError
    from mechfix.fixes.fix import load_fix
    from mechfix.stages.monitor import probe_of, score_episodes, summary
    from mechfix.stages.record import decision_requests

    loaded = load_source(recipe, transcript, decision, mode)
    check_paths({**source_inputs(loaded, transcript, decision, chat_template), "--probe": probe})
    fix = load_fix(probe)
    gate = probe_of(fix)
    conds = condition or loaded.recipe.condition_names
    unknown = [c for c in conds if c not in loaded.recipe.condition_names]
    if unknown:
        raise BadInputError(f"--condition {', '.join(unknown)} is not a condition of '{loaded.recipe.name}' "
                            f"(it has {', '.join(loaded.recipe.condition_names)}).")
    batch = parse_batch_size(batch_size)
    lm = load_command_model(model if model is not None else fix.model.get("source"), device, dtype, trust_remote_code)
    batch_size = resolve_batch_size(lm, batch)
    check_same_model({"model": fix.model}, lm.identity, str(probe))
    # The probe reads conversations rendered as the ones it was fitted on.
    made = recorded_style(fix.manifest)
    rendering = pick_style(lm, loaded, None, chat_template, made)
    why = style_mismatch(made, rendering)
    if why:
        raise BadInputError(f"{why}: the probe would read a kind of text it was not fitted on. Give --chat-template "
                            "the template the fix was made with.")
    with progress_bars() as progress:
        rendered = decision_requests(lm, loaded.recipe, style=rendering)
        episodes = [ep for c in conds for ep in rendered.episodes[c]]
        scores = score_episodes(lm, fix, episodes, batch_size,
                                on_batch=lambda k: progress("scoring the target's view", k, len(episodes)),
                                recipe=loaded.recipe, style=rendering)
    for s, (item, rnd) in zip(scores, [row for _ in conds for row in rendered.rows]):
        if rendered.live is not None:
            s.meta["round"] = rnd
    result = {"recipe": loaded.recipe.name, "probe": {"path": str(probe), "layer": gate.layer, "threshold": gate.threshold},
              **summary(scores), "max_rate": max_rate, "conversations_scored": [s.as_dict() for s in scores]}
    over = max_rate is not None and result["flagged_rate"] is not None and result["flagged_rate"] > max_rate
    result["passed"] = not over
    if as_json:
        emit_json(clean_nan(result))
    else:
        _print_monitor(result, scores, top)
    if over:
        raise typer.Exit(1)


def _print_monitor(result: dict, scores, top: int) -> None:
    t = Table(title=f"{result['recipe']}: the probe (L{result['probe']['layer']}, threshold {result['probe']['threshold']:.3g}) "
              "on the target's view", title_justify="left")
    for name in ("item", "condition", "at decision", "flagged", "raised most by (rise)"):
        t.add_column(name, justify="right" if name in ("item", "at decision") else "left")
    for s in scores[:top]:
        raisers = "; ".join(f"{r.text[:40]} (+{r.rise:.2f})" for r in s.raisers(2)) or "-"
        item = str(s.meta.get("item")) + (f" r{s.meta['round']}" if "round" in s.meta else "")
        t.add_row(item, str(s.meta.get("condition")), f"{s.decision:+.2f}", styled("[red]yes[/red]") if s.flagged else "no", raisers)
    err.print(t)
    if len(scores) > top:
        err.print(f"({len(scores) - top} more conversations in --json)")
    sp = Table(title="by speaker: how much their messages raise the probe's score", title_justify="left")
    for name in ("speaker", "messages", "mean rise", "raised it most in"):
        sp.add_column(name, justify="left" if name == "speaker" else "right")
    for name, row in result["by_speaker"].items():
        sp.add_row(name, str(row["messages"]), f"{row['mean_rise']:+.2f}", f"{row['top_raiser']} conversation(s)")
    err.print(sp)
    rates = ", ".join(f"{c} {v['flagged']}/{v['conversations']}" for c, v in result["by_condition"].items())
    err.print(f"flagged at the decision: {result['flagged']} of {result['conversations']} ({rates})")
    if result["max_rate"] is not None:
        verdict = "[green]within[/green]" if result["passed"] else "[red]over[/red]"
        err.print(f"{verdict} --max-rate {result['max_rate']:g} (flagged rate {result['flagged_rate']:.0%})", markup=True)
