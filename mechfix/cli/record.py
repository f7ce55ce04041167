"""``mechfix record``: run a recipe (or replay a transcript) and save option scores and activations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechfix.cli.checks import check_paths
from mechfix.textio import clean_nan
from mechfix.cli.options import ModelOptions, with_groups
from mechfix.cli.common import (
    ChatTemplateOpt,
    DecisionOpt,
    JsonOpt,
    ModeOpt,
    StyleOpt,
    TranscriptOpt,
    TrustOpt,
    emit_json,
    check_remote,
    progress_bars,
    app,
)
from mechfix.cli.views import print_record_summary


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix record recipes/conformity.yaml\n\n"
        "  mechfix record conformity --out conf.rec.safetensors --json\n\n"
        "  mechfix record my.yaml --model Qwen/Qwen2.5-0.5B-Instruct --all-positions\n\n"
        "  mechfix record sycophancy --model ./my-instruct-model --mode generate\n\n"
        "  mechfix record commons-live    (a live recipe: every turn generated, four rounds)\n\n"
        "  mechfix record --transcript chats.jsonl --decision decision.yaml --out chats.rec.safetensors\n\n"
        "  mechfix record conformity --model Qwen/Qwen2.5-0.5B-Instruct --style chat\n\n"
        "  mechfix record conformity --chat-template gemma --style chat    (a base model given a template)\n\n"
        "  mechfix record conformity --model ./llama-70b-instruct --device-map auto    (sharded over the GPUs)\n\n"
        "  mechfix record conformity --remote --model meta-llama/Llama-3.1-70B-Instruct    (on NDIF; needs NDIF_API_KEY)"
    )
)


@with_groups
def record(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe file, or the name of a built-in recipe (see `mechfix recipes`).")
    ] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Artifact to write. Default: NAME.rec.safetensors here.")
    ] = None,
    models: ModelOptions = ModelOptions(),
    all_positions: Annotated[
        bool, typer.Option("--all-positions", help="Keep activations at every position, not only the decision.")
    ] = False,
    act_dtype: Annotated[
        str | None,
        typer.Option("--act-dtype", help="float32, float16 or bfloat16: the dtype activations are saved in. Default: "
                     "float16 on a GPU, float32 on a CPU. With --all-positions they stream to disk as they come."),
    ] = None,
    mode: ModeOpt = None,
    transcript: TranscriptOpt = None,
    decision: DecisionOpt = None,
    style: StyleOpt = None,
    chat_template: ChatTemplateOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run every recipe item under every condition; save option scores and activations.

    Prints the behaviour effect (pressure - clean) with a 95% bootstrap
    interval, the flip rate, and the control effect. With --transcript and
    --decision, the conversations in the transcript are the items. A live
    recipe (one with a rounds block) is played round by round, every open
    turn written by the model; each round's decision is scored and recorded,
    and the whole episodes are kept in the artifact.
    """
    loaded = load_source(recipe, transcript, decision, mode)
    target = out_path or Path(f"{loaded.recipe.name}.rec.safetensors")
    check_paths(source_inputs(loaded, transcript, decision, chat_template), {"--out": target})
    check_remote(models.remote, recipe=loaded.recipe)
    models.batch()
    dtype_of_acts = parse_act_dtype(act_dtype)
    lm, batch_size = models.load(trust_remote_code)
    from mechfix.stages.pipeline import record as run_record

    rendering = pick_style(lm, loaded, style, chat_template)
    with progress_bars() as progress:
        artifact = run_record(loaded, lm, batch_size=batch_size, all_positions=all_positions, style=rendering,
                              act_dtype=dtype_of_acts, out=target, on_progress=progress)
    summary = clean_nan(artifact.manifest["summary"])
    if as_json:
        emit_json(
            {
                "artifact": str(target),
                "sha256": artifact.sha256,
                "model": lm.identity["name"],
                "recipe": loaded.recipe.name,
                "decisions": len(artifact.tensors["split"]) * len(artifact.manifest["conditions"]),
                "conditions": artifact.manifest["conditions"],
                **summary,
                "rate": summary["rate"]["rate"],
                "flips": {k: summary["rate"][k] for k in ("flipped", "eligible")},
            }
        )
    else:
        print_record_summary(summary, lm.identity["name"], loaded.recipe.name, wrote=str(target))


def source_inputs(loaded, transcript: Path | None, decision: Path | None,
                  chat_template: str | None = None) -> dict[str, Path | None]:
    """The files a recipe or transcript (and a chat template file) were read from, for :func:`~mechfix.cli.checks.check_paths`.

    Every file mechfix reads is an input: no output may be written over it.
    """
    from mechfix.scenario.templates import template_file

    # A template file is an input; a name that is no file is left to resolve_template, which lists the built-ins.
    path = template_file(chat_template)
    template = {"--chat-template": path} if path is not None else {}
    if transcript is not None:
        return {"--transcript": transcript, "--decision": decision, **template}
    items = {"the recipe's items file": Path(loaded.items_path)} if loaded.items_path else {}
    return {"RECIPE": Path(loaded.path), **items, **template}


def load_source(recipe: str | None, transcript: Path | None, decision: Path | None, mode: str | None):
    """The recipe to run: a recipe file or built-in name, or a transcript with its decision file."""
    from mechfix.errors import BadInputError
    from mechfix.scenario.recipe import load_recipe

    if transcript is None and decision is None:
        if recipe is None:
            raise BadInputError("give a RECIPE (a file or a built-in name, see `mechfix recipes`), or --transcript with --decision.")
        return load_recipe(recipe, mode)
    if recipe is not None or transcript is None or decision is None:
        raise BadInputError(
            "give either a RECIPE, or --transcript FILE together with --decision FILE (not both). "
            "Example: mechfix record --transcript chat.json --decision decision.yaml"
        )
    if mode == "generate":
        raise BadInputError("--mode generate does not apply to --transcript: the conversation is replayed as it happened.")
    from mechfix.scenario.transcript import load_transcript

    return load_transcript(transcript, decision)


def pick_style(lm, loaded, style: str | None, chat_template: str | None, made: dict | None = None):
    """The rendering style of a command (see :func:`mechfix.scenario.chat.choose_style`); says so when it is chat."""
    from mechfix.scenario.chat import choose_style
    from mechfix.cli.common import err

    chosen = choose_style(lm.tokenizer, loaded.recipe, style, chat_template, made)
    if chosen.name == "chat":
        err.print(f"style: chat, through chat template {chosen.template.name}")
    return chosen


def parse_act_dtype(text: str | None):
    """``--act-dtype``: a torch dtype, or None for the default.

    Raises:
        BadInputError: For another name.
    """
    from mechfix.engine.actstore import ACT_DTYPES
    from mechfix.errors import BadInputError

    if text is None:
        return None
    if text not in ACT_DTYPES:
        raise BadInputError(f"--act-dtype must be one of {', '.join(ACT_DTYPES)}, not '{text}'.")
    return ACT_DTYPES[text]
