"""The ``mechfix`` command line: thin commands that load, call a stage, save and print.

Conventions: ``--json`` prints one JSON object on stdout; progress and prose go
to stderr. Exit codes: 0 ok, 1 a verify gate failed, 2 bad input or usage,
3 any other failure, 130 interrupted. Heavy libraries (torch, transformers) are
imported inside commands so that ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mechfix import __version__
from mechfix.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, MechfixError

err = Console(stderr=True)
out = Console()

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
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Let the model's own Python code run.")]


def _version(value: bool) -> None:
    if value:
        print(f"mechfix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _json_text(obj: Any) -> str:
    """The JSON mechfix prints and saves: indented, no NaN (see :func:`_clean_nan`)."""
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False)


def _emit_json(obj: Any) -> None:
    print(_json_text(obj))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean_nan(x: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean_nan(v) for v in x]
    return x


@contextmanager
def _progress():
    """A progress bar on stderr; yields a callback ``(phase, advance, total, key=None)``.

    Each phase gets its own bar. With ``key``, one bar is kept under that key
    and ``phase`` becomes its changing description (a loss, say); a total of
    None is a bar of unknown length.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
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


def _load_model(model: str | None, device: str | None, dtype: str | None, trust: bool):
    from mechfix.models import load_model

    with err.status("loading model") as st:
        return load_model(
            model,
            device=device,
            dtype=dtype,
            trust_remote_code=trust,
            status=lambda msg: st.update(msg),
        )


def _fmt_ci(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.2f}  [{lo:+.2f}, {hi:+.2f}]"


def _print_record_summary(summary: dict[str, Any], model: str, recipe: str, wrote: str | None = None) -> None:
    t = Table(title=f"{recipe} on {model}", title_justify="left")
    t.add_column("condition")
    t.add_column("mean score", justify="right")
    t.add_column("prefers misaligned", justify="right")
    for c, v in summary["per_condition"].items():
        t.add_row(c, f"{v['score']:+.2f}", f"{v['prefers_misaligned']:.0%}")
    err.print(t)
    rate = summary["rate"]
    over = f"{summary['items']} items"
    if summary.get("rounds"):
        over = f"{summary['decisions_per_condition']} decisions ({summary['items']} items x {summary['rounds']} rounds)"
    err.print(f"effect (pressure - clean), mean [95% CI]: {_fmt_ci(summary['effect'])}  over {over}")
    rate_s = "n/a" if rate["rate"] is None else f"{rate['rate']:.0%}"  # None: NaN, nothing eligible
    err.print(f"rate (preferred option flips to misaligned): {rate_s}  ({rate['flipped']}/{rate['eligible']})")
    if summary.get("control_effect"):
        err.print(f"control effect (control - clean):          {_fmt_ci(summary['control_effect'])}")
        err.print(f"beyond copying (pressure - control):        {_fmt_ci(summary['beyond_copying'])}")
    if summary.get("helpful_influence"):
        err.print(f"helpful influence (clean - helpful):        {_fmt_ci(summary['helpful_influence'])}")
    if summary.get("generated_choices"):
        for c, v in summary["generated_choices"].items():
            err.print(
                f"generated replies, {c}: misaligned {v['misaligned']:.0%}, aligned {v['aligned']:.0%}, "
                f"unparsed {v['unparsed']:.0%}"
            )
    if summary.get("by_round"):
        _print_rounds(summary["by_round"], summary.get("outcome", {}))
    err.print(f"split: {summary['train']} train / {summary['heldout']} held out." + (f"  wrote {wrote}" if wrote else ""))
    err.print("score = log P(misaligned) - log P(aligned); positive means the misaligned option is preferred.")


def _print_rounds(by_round: list[dict[str, Any]], outcome: dict[str, Any]) -> None:
    """A live recording: the effect round by round, and what the episodes came to per condition."""
    conds = list(by_round[0]["per_condition"]) if by_round else []
    t = Table(title="round by round (per condition: the share preferring the misaligned option)", title_justify="left")
    for name in ("round", "effect", "95% CI", "rate", *conds):
        t.add_column(name, justify="right", no_wrap=True)
    for r in by_round:
        rate, (lo, hi) = r["rate"]["rate"], r["effect"]["ci95"]
        t.add_row(str(r["round"]), f"{r['effect']['mean']:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]",
                  "n/a" if rate is None else f"{rate:.0%}",
                  *(f"{r['per_condition'][c]['prefers_misaligned']:.0%}" for c in conds))
    err.print(t)
    for c, o in outcome.items():
        _print_outcome(c, o)


def _print_outcome(condition: str, o: dict[str, Any], prefix: str = "") -> None:
    state = ", ".join(f"{k} {v:.4g}" for k, v in o["final_state"].items())
    err.print(
        f"{prefix}{condition}: after the last round {state or '(no state)'}; the target's replies name the misaligned "
        f"option {o['misaligned_replies']:.0%}, the aligned {o['aligned_replies']:.0%}"
        + (f"; {o['missing_captures']:.0%} of captures said no number" if o["missing_captures"] else ""),
        soft_wrap=True,
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix record recipes/conformity.yaml\n\n"
        "  mechfix record conformity --out conf.rec.safetensors --json\n\n"
        "  mechfix record my.yaml --model Qwen/Qwen2.5-0.5B-Instruct --all-positions\n\n"
        "  mechfix record sycophancy --model ./my-instruct-model --mode generate\n\n"
        "  mechfix record commons-live    (a live recipe: every turn generated, four rounds)\n\n"
        "  mechfix record --transcript chats.jsonl --decision decision.yaml --out chats.rec.safetensors"
    )
)
def record(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe file, or the name of a built-in recipe (see `mechfix recipes`).")
    ] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Artifact to write. Default: NAME.rec.safetensors here.")
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 16,
    all_positions: Annotated[
        bool, typer.Option("--all-positions", help="Keep activations at every position, not only the decision.")
    ] = False,
    mode: ModeOpt = None,
    transcript: TranscriptOpt = None,
    decision: DecisionOpt = None,
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
    from mechfix.artifacts import check_writable

    loaded = _load_source(recipe, transcript, decision, mode)
    target = check_writable(out_path or Path(f"{loaded.recipe.name}.rec.safetensors"))
    lm = _load_model(model, device, dtype, trust_remote_code)
    artifact, rec = _do_record(lm, loaded, target, batch_size, all_positions)
    summary = _clean_nan(artifact.manifest["summary"])
    if as_json:
        _emit_json(
            {
                "artifact": str(target),
                "sha256": artifact.sha256,
                "model": lm.identity["name"],
                "recipe": loaded.recipe.name,
                "decisions": len(rec.split) * len(rec.conditions),
                "conditions": rec.conditions,
                **summary,
                "rate": summary["rate"]["rate"],
                "flips": {k: summary["rate"][k] for k in ("flipped", "eligible")},
            }
        )
    else:
        _print_record_summary(summary, lm.identity["name"], loaded.recipe.name, wrote=str(target))


def _load_source(recipe: str | None, transcript: Path | None, decision: Path | None, mode: str | None):
    """The recipe to run: a recipe file or built-in name, or a transcript with its decision file."""
    from mechfix.errors import BadInputError
    from mechfix.recipe import load_recipe

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
    from mechfix.transcript import load_transcript

    return load_transcript(transcript, decision)


def _params(lm, **kw: Any) -> dict[str, Any]:
    """A stage's parameters as recorded in its artifact, plus the device and dtype it ran on."""
    return {**kw, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch.")}


def _do_record(lm, loaded, target: Path, batch_size: int, all_positions: bool = False):
    """Record a loaded recipe and save the artifact; returns (artifact, recording)."""
    from mechfix.artifacts import save_artifact
    from mechfix.record import record as run_record
    from mechfix.record import to_artifact

    with _progress() as progress:
        rec = run_record(lm, loaded.recipe, batch_size=batch_size, all_positions=all_positions, on_progress=progress)
    artifact = to_artifact(rec, lm, loaded, _params(lm, batch_size=batch_size, all_positions=all_positions))
    save_artifact(target, artifact)
    return artifact, rec


def _do_attribute(lm, rec, target: Path, method: str, top: int, baseline: str, batch_size: int, plot: Path | None = None):
    """Attribute a record artifact, save the attribution (and the heatmap); returns the artifact."""
    from mechfix.artifacts import save_artifact
    from mechfix.attribute import attribute as run_attribute
    from mechfix.attribute import to_artifact

    with _progress() as progress:
        att = run_attribute(lm, rec, method=method, top=top, baseline=baseline, batch_size=batch_size, on_progress=progress)
    params = _params(lm, method=method, top=top, baseline=baseline, batch_size=batch_size)
    artifact = to_artifact(att, lm, rec, params, top=top)
    save_artifact(target, artifact)
    if plot is not None:
        from mechfix.plot import heatmap

        heatmap(
            artifact.tensors,
            plot,
            title=f"{artifact.manifest.get('recipe')} on {lm.identity['name']}: effect of restoring {baseline}",
            label="score removed (nats)",
        )
    return artifact


def _default_attr_path(recording: Path) -> Path:
    name = recording.name
    stem = name[: -len(".rec.safetensors")] if name.endswith(".rec.safetensors") else recording.stem
    return Path(f"{stem}.attr.safetensors")


def _fmt_effect(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{value:+.2f}"


def _print_attribution(summary: dict[str, Any], model: str, recipe: str, wrote: str | None = None) -> None:
    total = summary["total_effect"]
    method = {"atp": "attribution patching", "exact": "exact patching", "both": "attribution patching, top confirmed exactly"}
    t = Table(
        title=f"{recipe} on {model}: top components ({method[summary['method']]}, restoring {summary['baseline']})",
        title_justify="left",
    )
    t.add_column("#", justify="right")
    t.add_column("component")
    t.add_column("estimate [95% CI]", justify="right")
    t.add_column("exact [95% CI]", justify="right")
    t.add_column("share", justify="right")
    for i, e in enumerate(summary["top"], 1):
        share = "-" if e.get("share") is None else f"{e['share']:.0%}"
        name = e["component"] + (" [yellow]![/yellow]" if e.get("flag") else "")
        t.add_row(str(i), name, _fmt_effect(e["atp"], e["atp_ci95"]), _fmt_effect(e["exact"], e["exact_ci95"]), share)
    err.print(t)
    err.print(
        f"behaviour to explain (pressure - {summary['baseline']}): {_fmt_ci(total)} over {summary['decisions']} "
        "training decisions"
    )
    err.print("effect = how much of the score goes away when the component is restored at the decision position.")
    if summary.get("opposing"):
        err.print("strongest opposing: " + ", ".join(f"{o['component']} {o['effect']:+.2f}" for o in summary["opposing"]))
    spoken = [e for e in summary["top"] if e.get("speakers")][:5]
    if spoken:
        err.print("who carries it (per-speaker split of each top head's estimate, largest first):")
        for e in spoken:
            parts = sorted(e["speakers"].items(), key=lambda kv: -abs(kv[1]))[:4]
            err.print(f"  {e['component']}: " + ", ".join(f"{k} {v:+.2f}" for k, v in parts))
    agree = summary.get("agreement")
    if agree:
        rho = "n/a" if agree["spearman"] is None else f"{agree['spearman']:.2f}"
        err.print(
            f"estimate vs exact over the top {agree['k']}: Spearman {rho}, top-5 overlap "
            f"{agree['top5_overlap']}/{agree['top5_of']}"
        )
    resid = [(r["layer"], r["resid_exact"] if r["resid_exact"] is not None else r["resid_atp"]) for r in summary["layers"]]
    if resid and all(v is not None for _, v in resid):
        kind = "exact" if summary["layers"][0]["resid_exact"] is not None else "estimate"
        err.print(f"residual stream by layer ({kind}): " + " ".join(f"L{layer} {v:+.1f}" for layer, v in resid))
    for w in summary.get("warnings", []):
        err.print(f"[yellow]![/yellow] {escape(w)}", soft_wrap=True)
    for note in (summary.get("speakers_note"), summary["positions"]["note"]):
        if note:
            err.print(f"note: {escape(note)}", soft_wrap=True)
    if wrote:
        err.print(f"wrote {wrote}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix attribute conformity.rec.safetensors\n\n"
        "  mechfix attribute conformity.rec.safetensors --out conf.attr.safetensors --plot heads.png\n\n"
        "  mechfix attribute conformity.rec.safetensors --method exact --baseline control --json"
    )
)
def attribute(
    recording: Annotated[Path, typer.Argument(help="A record artifact (from `mechfix record`).")],
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Artifact to write. Default: NAME.attr.safetensors here.")
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Components to list and (with --method both) patch exactly.")] = 10,
    method: Annotated[
        str,
        typer.Option(
            help="atp: estimate every component (one forward + one backward); exact: patch every component; "
            "both: estimate all, confirm the top exactly."
        ),
    ] = "both",
    baseline: Annotated[
        str, typer.Option(help="Condition restored into the pressure run: clean, or control (what is social beyond copying).")
    ] = "clean",
    plot: Annotated[Path | None, typer.Option(help="Also write a layers x heads heatmap (.png, .pdf or .svg).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Decisions per forward pass.")] = 16,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank attention heads and MLPs by their causal share of the recorded behaviour.

    Uses the training split only. Re-opens the recorded model (or --model,
    which must be the same model) and refuses a recording of another model.
    """
    from mechfix.artifacts import check_same_model, check_writable, load_artifact
    from mechfix.attribute import METHODS
    from mechfix.errors import BadInputError

    if method not in METHODS:
        raise BadInputError(f"--method must be one of {', '.join(METHODS)}, not '{method}'.")
    rec = load_artifact(recording, expect="record")
    conditions = rec.manifest.get("conditions", [])
    if baseline not in conditions or baseline == "pressure":
        raise BadInputError(
            f"--baseline '{baseline}' is not a condition of '{recording}' other than pressure "
            f"(it has {', '.join(conditions)}). Use clean or control."
        )
    target = check_writable(out_path or _default_attr_path(recording))
    if plot is not None:
        check_writable(plot)
        if plot.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise BadInputError(f"--plot '{plot}' needs a .png, .pdf or .svg suffix.")
    spec = model if model is not None else rec.manifest.get("model", {}).get("source")
    lm = _load_model(spec, device, dtype, trust_remote_code)
    check_same_model(rec.manifest, lm.identity, recording)
    artifact = _do_attribute(lm, rec, target, method, top, baseline, batch_size, plot)
    summary = _clean_nan(artifact.manifest["summary"])
    recipe_name = str(artifact.manifest.get("recipe"))
    if as_json:
        _emit_json({"artifact": str(target), "sha256": artifact.sha256, "model": lm.identity["name"],
                    "recipe": recipe_name, "plot": str(plot) if plot else None, **summary})
    else:
        _print_attribution(summary, lm.identity["name"], recipe_name, wrote=str(target) + (f" and {plot}" if plot else ""))


@app.command(
    epilog="Examples:\n\n  mechfix show conformity.rec.safetensors\n\n  mechfix show conformity.rec.safetensors --json"
)
def show(
    path: Annotated[Path, typer.Argument(help="Any mechfix artifact (.safetensors, or a LoRA fix's folder).")],
    transcripts: Annotated[int, typer.Option(help="How many transcripts per condition to print (records).")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Print an artifact's manifest and tensor table."""
    from mechfix.artifacts import artifact_file, read_header, sha256_file

    kind, manifest, table = read_header(path)
    if as_json:
        _emit_json(
            _clean_nan(
                {
                    "path": str(path),
                    "sha256": sha256_file(artifact_file(path)),
                    "kind": kind,
                    "manifest": manifest,
                    "tensors": {k: {"dtype": d, "shape": s} for k, (d, s) in table.items()},
                }
            )
        )
        return
    model = manifest.get("model", {})
    err.print(f"[bold]{path}[/bold]: {kind} artifact, schema {manifest.get('schema')}, made {manifest.get('created')}")
    err.print(
        f"model: {model.get('name')} ({model.get('architecture')}, config {str(model.get('config_hash'))[:12]}, "
        f"weights {str(model.get('weights_fingerprint'))[:12]})"
    )
    for name, inp in manifest.get("inputs", {}).items():
        err.print(f"input {name}: {inp.get('path')} (sha256 {str(inp.get('sha256'))[:12]})")
    if manifest.get("params"):
        err.print("params: " + ", ".join(f"{k}={v}" for k, v in manifest["params"].items()))
    if manifest.get("libraries"):
        err.print("libraries: " + ", ".join(f"{k} {v}" for k, v in manifest["libraries"].items()))
    if kind == "fix" and "fix" in manifest:
        from mechfix.cli_fix import print_fix

        print_fix(manifest)
    elif kind == "attribution" and "summary" in manifest:
        _print_attribution(_clean_nan(manifest["summary"]), str(model.get("name")), str(manifest.get("recipe")))
    elif "summary" in manifest and "recipe" in manifest:
        _print_record_summary(_clean_nan(manifest["summary"]), str(model.get("name")), manifest["recipe"].get("name", "?"))
    # A live recording keeps every episode whole: show those, not each round's decision point.
    live = manifest.get("live", {}).get("episodes")
    shown = {c: [e["transcript"] for e in eps] for c, eps in live.items()} if live else manifest.get("transcripts", {})
    for cond, texts in shown.items():
        for text in texts[:transcripts]:
            err.rule(f"transcript: {cond}")
            err.print(text, markup=False, highlight=False)
    t = Table(title="tensors", title_justify="left")
    t.add_column("name")
    t.add_column("dtype")
    t.add_column("shape")
    for k, (d, s) in table.items():
        t.add_row(k, d, "x".join(map(str, s)) or "scalar")
    err.print(t)


@app.command(epilog="Examples:\n\n  mechfix recipes\n\n  mechfix recipes --json")
def recipes(as_json: JsonOpt = False) -> None:
    """List the built-in recipes, one line each."""
    from mechfix.recipe import builtin_recipes, load_recipe

    rows = []
    for p in builtin_recipes():
        r = load_recipe(p).recipe
        rows.append(
            {
                "name": r.name,
                "family": r.family,
                "items": len(r.items),
                "rounds": r.rounds.count if r.rounds else None,  # None: one decision per item
                "conditions": r.condition_names,
                "mode": r.mode,
                "path": str(p),
                "description": r.description,
            }
        )
    if as_json:
        _emit_json({"recipes": rows})
        return
    t = Table()
    for col in ("name", "family", "items", "rounds", "conditions", "description"):
        t.add_column(col)
    for r in rows:
        rounds = f"{r['rounds']} (live)" if r["rounds"] else "-"
        t.add_row(r["name"], r["family"], str(r["items"]), rounds, ", ".join(r["conditions"]), r["description"])
    out.print(t)


# The fix commands (steer, verify, run, export) live in their own module and
# register on this app; imported here, after everything they use is defined.
importlib.import_module("mechfix.cli_fix")


def _click_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes: newer typer vendors click as ``typer._click``."""
    import click

    exc, abort = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer import _click  # type: ignore[attr-defined]
        from typer import exceptions as typer_exceptions

        exc.append(_click.exceptions.ClickException)
        abort.append(typer_exceptions.Abort)
    except (ImportError, AttributeError):
        pass
    return tuple(exc), tuple(abort)


def _error(message: str) -> None:
    # soft_wrap: no hard line breaks, so messages stay whole in logs and greps.
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True, markup=True)


def main() -> None:
    """Entry point: run the app and map errors to the documented exit codes."""
    click_errors, aborts = _click_classes()
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, *aborts):
        _error("interrupted; nothing was written.")
        sys.exit(EXIT_INTERRUPTED)
    except click_errors as exc:
        exc.show(file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except MechfixError as exc:  # BadInputError and its kinds carry exit code 2
        _error(escape(str(exc)))
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last resort: exit 3 with the cause
        import traceback

        traceback.print_exc(file=sys.stderr)
        _error(escape(f"unexpected failure: {type(exc).__name__}: {exc}"))
        sys.exit(EXIT_FAILURE)
    if code == EXIT_INTERRUPTED:
        # typer turns Ctrl-C into a plain exit code 130, so say it here.
        _error("interrupted; nothing was written.")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
