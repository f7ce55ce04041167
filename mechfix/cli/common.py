"""What every command shares: the consoles, the app, the options, JSON output, progress bars and loading."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mechfix import __version__
from mechfix.textio import json_text
from mechfix.untrusted import visible


class SafeConsole(Console):
    """A console for text from strangers: control characters are shown, never sent; markup only where asked.

    Everything mechfix prints may hold what an agent wrote or an artifact says.
    Every string this console renders (a line, a table cell, a rule's title) has
    its control characters written out (:func:`mechfix.untrusted.visible`), so an
    escape sequence cannot clear the screen, retitle the window or plant a link;
    and rich markup is off unless a call passes ``markup=True`` (mechfix's own
    styled lines, with any data in them put through :func:`shown`), so a name
    such as ``[/]`` or ``[link=...]`` is printed as it is and never breaks a table.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(markup=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any):
        return super().render_str(visible(text), **kwargs)


def shown(text: Any) -> str:
    """Untrusted text for a line printed with ``markup=True``: control characters visible, markup escaped."""
    from rich.markup import escape

    return escape(visible(text))


def styled(markup: str):
    """mechfix's own styled text (``[green]pass[/green]``) for a table cell, where markup is otherwise off."""
    from rich.text import Text

    return Text.from_markup(markup)


err = SafeConsole(stderr=True)

out = SafeConsole()

app = typer.Typer(
    name="mechfix",
    help=(
        "Diagnose and repair misaligned behaviour of multi-agent LLM systems inside the model.\n\n"
        "Pipeline: record -> attribute -> steer -> verify; `run` chains all four.\n\n"
        "Example:  mechfix run recipes/conformity.yaml --out conformity/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

ModeOpt = Annotated[
    str | None,
    typer.Option(help="score or generate: run the recipe in this mode instead of its own (generate suits instruct models)."),
]

StyleOpt = Annotated[
    str | None,
    typer.Option(
        "--style",
        help="text: the recipe's text layout (base models); chat: each decision as its agent saw it, through the "
        "model's chat template. Default: chat when the model has a chat template (or --chat-template), else text; "
        "verify renders as the fix's recording was.",
    ),
]

ChatTemplateOpt = Annotated[
    str | None,
    typer.Option("--chat-template", help="Give the model a chat template: chatml, llama3, gemma, mistral, or a Jinja file."),
]

TranscriptOpt = Annotated[
    Path | None,
    typer.Option(help="Replay conversations you already have instead of a recipe: OpenAI-style messages "
                 "(.json/.jsonl) or an Inspect AI log (.eval/.json). Needs --decision."),
]

DecisionOpt = Annotated[
    Path | None,
    typer.Option(help="With --transcript: a YAML file naming the target message, the options and the edits "
                 "that make the clean (and control) condition."),
]

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face id, local model folder or .gguf file. Default: the embedded Gemma 3 270M (offline).",
    ),
]

DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N. Default: cuda when present.")]

DtypeOpt = Annotated[
    str | None, typer.Option(help="float32, bfloat16 or float16. Default: bfloat16 on cuda, float32 on cpu.")
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]

_SCALE = "Big models (GPUs, device maps, NDIF)"

BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        help="hooks: PyTorch hooks (the default here: fastest); nnsight: the same passes as nnsight traces, the path "
        "--remote takes (default with --remote), KL on neutral text included. LoRA training, live generation and gate "
        "fitting run on hooks.",
        rich_help_panel=_SCALE,
    ),
]

RemoteOpt = Annotated[
    bool,
    typer.Option(
        "--remote",
        help="Run on NDIF through nnsight: --model names a model NDIF hosts by its hub id; the key comes from "
        "NDIF_API_KEY or nnsight's config. Every pass is a trace there, a fix's edits travel inside them; not for "
        "live recipes, generate mode, LoRA training or probe gates.",
        rich_help_panel=_SCALE,
    ),
]

DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Shard the model through accelerate: auto (every GPU, then CPU, then disk), balanced, sequential, or a "
        "JSON file (or object) of module name to device. Replaces --device.",
        rich_help_panel=_SCALE,
    ),
]

TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Let the model's own Python code run.")]

KindOpt = Annotated[
    str,
    typer.Option(
        help="heads: edit the top attention heads only; vector: subtract a direction from a layer's output "
        "(exportable to llama.cpp); lora: train a small adapter on attention output projections: those that "
        "carry the behaviour at every position when the recipe is token-aligned, else the top heads' "
        "(a PEFT adapter folder)."
    ),
]

OpOpt = Annotated[
    str | None,
    typer.Option(
        help="heads: project, ablate, steer, restore or scale (default: try them all and keep what carries over; ablate and scale export as weights); vector: "
        "subtract; lora: lora. The manual's steer page says what each does."
    ),
]

_LORA = "LoRA training (--kind lora)"

RankOpt = Annotated[int, typer.Option(min=1, help="Rank each module's update is trained at; steer offers it at this rank and at half, and cross-validation picks.", rich_help_panel=_LORA)]

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

_GATE = "Probe gate (--gate probe: act only under pressure)"

PortableOpt = Annotated[
    bool,
    typer.Option(
        "--portable",
        help="Keep only fixes that export exactly as weights (`mechfix export --format peft|hf`): heads operations "
        "ablate and scale, or a LoRA fix; the rest are left out, and steer says which and why.",
    ),
]

GateOpt = Annotated[
    str,
    typer.Option(
        "--gate",
        help="none: the fix edits every position; probe: only the positions where a linear probe of the residual "
        "stream (fitted on the training split) says the agent is under pressure.",
        rich_help_panel=_GATE,
    ),
]

GateLayerOpt = Annotated[
    int | None,
    typer.Option("--gate-layer", min=0, help="The decoder layer whose output the probe reads (default: chosen by "
                 "cross-validation among the layers before the fix).", rich_help_panel=_GATE),
]

GateCleanOpt = Annotated[
    float,
    typer.Option("--gate-max-clean", min=0.0, max=1.0, help="False-alarm budget: the most of the baseline decisions "
                 "(training split) the probe may fire on.", rich_help_panel=_GATE),
]

GateNeutralOpt = Annotated[
    float,
    typer.Option("--gate-max-neutral", min=0.0, max=1.0, help="False-alarm budget: the most of the neutral-text tokens "
                 "the probe may fire on.", rich_help_panel=_GATE),
]


def gate_settings(gate: str, layer: int | None, max_clean: float, max_neutral: float, kind: str = "heads"):
    """The probe gate steer fits (None for ``--gate none``).

    Raises:
        BadInputError: For another ``--gate`` value, a gate layer without ``--gate probe``, or a gated LoRA fix.
    """
    from mechfix.errors import BadInputError
    from mechfix.fixes.gate import GateSettings

    if gate not in ("none", "probe"):
        raise BadInputError(f"--gate must be none or probe, not '{gate}'.")
    if gate == "none":
        if layer is not None:
            raise BadInputError("--gate-layer needs --gate probe.")
        return None
    if kind == "lora":
        raise BadInputError(
            "--gate probe does not go with --kind lora: a LoRA fix is saved as a PEFT adapter, which every engine "
            "applies at every position, so a gate could not travel with it. Gate a heads or vector fix (--kind heads).")
    return GateSettings(layer=layer, max_clean_fire=max_clean, max_neutral_fire=max_neutral)


SeedOpt = Annotated[
    int, typer.Option(help="Seed of the cross-validation folds, and of a LoRA fix's initialisation, batches and sampled positions.")
]

FoldsOpt = Annotated[
    int,
    typer.Option(min=0, help="Cross-validation folds over the training items: the fix is chosen by what carries over to "
                 "items it was not fitted on (0 or 1: choose on the training fit). A LoRA fix trains an adapter per fold, "
                 "so it uses at most 3."),
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

MaxOvershootOpt = Annotated[
    float,
    typer.Option("--max-overshoot", min=0.0, help="The most of the pressure's pull the fix may turn into a push the "
                 "other way (held out, as a share of the pull): past it the agent rejects the others' answer even "
                 "when it would be right."),
]

BaselinesOpt = Annotated[
    bool,
    typer.Option("--baselines", help="Also measure two remedies a user would try first, with the same gates, side by "
                 "side with the fix: an instruction in the target's own text (--prompt-fix replaces the shipped one) "
                 "and, where the recipe allows it, a protocol: the target states its answer before the others speak."),
]

PromptFixOpt = Annotated[
    Path | None,
    typer.Option("--prompt-fix", metavar="FILE", help="The prompt remedy's instruction (a text file; {target} names the "
                 "target agent), instead of the shipped one. Implies --baselines."),
]

JunitOpt = Annotated[Path | None, typer.Option(help="Also write a JUnit XML report, one testcase per gate.")]

BatchOpt = Annotated[
    str,
    typer.Option(help="Sequences per forward pass, or auto: on a GPU the largest batch whose activations fit its free "
                 "memory (for 512-token prompts), 16 on a CPU. A batch that runs out of memory is split and retried."),
]

# The prompt length auto batch sizes are worked out for (longer prompts rely on the out-of-memory backoff).
AUTO_BATCH_TOKENS = 512


def parse_batch_size(text: str | int) -> int | None:
    """``--batch-size``: a positive number, or None for auto.

    Raises:
        BadInputError: For anything else.
    """
    from mechfix.errors import BadInputError

    if str(text).strip().lower() == "auto":
        return None
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise BadInputError(f"--batch-size takes a positive whole number or auto, not '{text}'.")
    return value


def resolve_batch_size(lm, parsed: int | None) -> int:
    """The batch size to run: the number given, or :func:`mechfix.engine.forward.auto_batch_size`."""
    from mechfix.engine.forward import auto_batch_size

    return parsed if parsed is not None else auto_batch_size(lm, AUTO_BATCH_TOKENS)

ReplayOpt = Annotated[
    str,
    typer.Option(help="Live recipes: play the episodes again with the fix and report what they come to (final "
                 "state, the target's replies). all: every agent runs the fixed model (one model plays them all); "
                 "target: only the target does; none: skip."),
]


def _version(value: bool) -> None:
    if value:
        print(f"mechfix {__version__}")
        raise typer.Exit()


# Whether an unexpected failure prints its traceback on the terminal (``mechfix --debug`` or MECHFIX_DEBUG=1).
DEBUG = {"on": False}


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="On an unexpected failure (exit 3), print the full traceback here too.")
    ] = False,
) -> None:
    DEBUG["on"] = DEBUG["on"] or debug


def emit_json(obj: Any) -> None:
    print(json_text(obj))


@contextmanager
def progress_bars():
    """A progress bar on stderr; yields a callback ``(phase, advance, total, key=None)``.

    Each phase gets its own bar. With ``key``, one bar is kept under that key
    and ``phase`` becomes its changing description (a loss, say); a total of
    None is a bar of unknown length.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}", markup=False),  # descriptions may name what a user gave
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, advance: int, total: int | None, key: str | None = None) -> None:
            name = key or phase
            if name not in tasks:
                tasks[name] = bar.add_task(phase, total=total)
            bar.update(tasks[name], advance=advance, description=phase)

        yield update


def check_remote(remote: bool, *, recipe=None, kind: str | None = None, gate: str | None = None, fixes=()) -> None:
    """Refuse, before any work, what a run on NDIF cannot do: every pass must be a trace there.

    Generating text (live recipes, generate mode), training a LoRA fix and fitting or reading a probe gate run
    the model outside a trace.

    Raises:
        BadInputError: Naming the part and what to do instead.
    """
    from mechfix.errors import BadInputError

    if not remote:
        return
    where = " Run it where the weights are (on a GPU: --device-map auto)."
    if recipe is not None and (recipe.rounds is not None or recipe.mode == "generate"):
        raise BadInputError(f"recipe '{recipe.name}' writes turns with the model (a live recipe, or --mode generate), "
                            "and --remote runs scored decisions only: generation is not a trace." + where)
    if kind == "lora":
        raise BadInputError("--kind lora trains an adapter, which runs here and not on NDIF (--remote). Use --kind heads "
                            "or vector with --remote, or train the LoRA fix where the weights are.")
    if gate == "probe":
        raise BadInputError("--gate probe fits a probe on layer activations read outside a trace, which --remote "
                            "cannot do." + where)
    for fix in fixes:
        if fix.gate is not None:
            raise BadInputError(f"{fix.path or 'the fix'} is gated: verify reads its probe outside a trace, which "
                                "--remote cannot do." + where)


def load_command_model(
    model: str | None,
    device: str | None,
    dtype: str | None,
    trust: bool,
    *,
    backend: str | None = None,
    remote: bool = False,
    device_map: str | None = None,
):
    """Load the model for a command (locally, sharded, or on NDIF) and set its backend.

    Every option is checked before anything loads.

    Raises:
        BadInputError: For options that do not go together, or a model that cannot be reached.
    """
    from mechfix.errors import BadInputError
    from mechfix.models import load_model, load_remote, parse_device_map
    from mechfix.engine.backends import check_backend, use_backend

    check_backend(backend, remote)
    if device is not None and device_map is not None:
        raise BadInputError("give --device (one device) or --device-map (shard across devices), not both.")
    if remote:
        if device is not None or device_map is not None or dtype is not None:
            raise BadInputError("--remote runs on NDIF's GPUs: leave out --device, --device-map and --dtype.")
        with err.status("reaching NDIF") as st:
            return use_backend(load_remote(model, status=lambda msg: st.update(shown(msg))))
    placed = parse_device_map(device_map)
    with err.status("loading model") as st:
        lm = load_model(
            model,
            device=device,
            dtype=dtype,
            trust_remote_code=trust,
            status=lambda msg: st.update(shown(msg)),
            device_map=placed,
        )
    return use_backend(lm, backend)


def parse_floats(text: str | None, name: str) -> list[float] | None:
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


def parse_ints(text: str | None, name: str) -> list[int] | None:
    from mechfix.errors import BadInputError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"{name} takes comma-separated layer numbers such as 10,12, not '{text}'.") from None


def check_replay(replay: str) -> None:
    """Refuse an unknown --replay before any model is loaded."""
    from mechfix.errors import BadInputError
    from mechfix.stages.verify import REPLAY

    if replay not in REPLAY:
        raise BadInputError(f"--replay must be one of {', '.join(REPLAY)}, not '{replay}'.")
