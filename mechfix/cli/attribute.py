"""``mechfix attribute``: rank heads and MLPs by their causal share of the recorded behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechfix.cli.checks import check_paths
from mechfix.textio import clean_nan
from mechfix.cli.options import ModelOptions, with_groups
from mechfix.cli.common import (
    JsonOpt,
    TrustOpt,
    emit_json,
    progress_bars,
    app,
)
from mechfix.cli.views import print_attribution


def _default_attr_path(recording: Path) -> Path:
    name = recording.name
    stem = name[: -len(".rec.safetensors")] if name.endswith(".rec.safetensors") else recording.stem
    return Path(f"{stem}.attr.safetensors")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix attribute conformity.rec.safetensors\n\n"
        "  mechfix attribute conformity.rec.safetensors --out conf.attr.safetensors --plot heads.png\n\n"
        "  mechfix attribute conformity.rec.safetensors --method exact --baseline control --json\n\n"
        "  mechfix attribute conformity.rec.safetensors --backend nnsight    (the same, as nnsight traces)\n\n"
        "  mechfix attribute conformity.rec.safetensors --remote    (a recording made with --remote, on NDIF again)"
    )
)


@with_groups
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
    models: ModelOptions = ModelOptions(),
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank attention heads and MLPs by their causal share of the recorded behaviour.

    Uses the training split only. Re-opens the recorded model (or --model,
    which must be the same model) and refuses a recording of another model.
    """
    from mechfix.artifacts import check_same_model, load_artifact
    from mechfix.stages.attribute import METHODS
    from mechfix.errors import BadInputError

    if method not in METHODS:
        raise BadInputError(f"--method must be one of {', '.join(METHODS)}, not '{method}'.")
    target = out_path or _default_attr_path(recording)
    check_paths({"RECORDING": recording}, {"--out": target, "--plot": plot})
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise BadInputError(f"--plot '{plot}' needs a .png, .pdf or .svg suffix.")
    rec = load_artifact(recording, expect="record")
    conditions = rec.manifest.get("conditions", [])
    if baseline not in conditions or baseline == "pressure":
        raise BadInputError(
            f"--baseline '{baseline}' is not a condition of '{recording}' other than pressure "
            f"(it has {', '.join(conditions)}). Use clean or control."
        )
    lm, batch_size = models.load(trust_remote_code, default=rec.manifest.get("model", {}).get("source"))
    check_same_model(rec.manifest, lm.identity, recording)
    from mechfix.stages.pipeline import attribute as run_attribute

    with progress_bars() as progress:
        artifact = run_attribute(rec, lm, method=method, top=top, baseline=baseline, batch_size=batch_size, out=target,
                                 plot=plot, on_progress=progress)
    summary = clean_nan(artifact.manifest["summary"])
    recipe_name = str(artifact.manifest.get("recipe"))
    if as_json:
        emit_json({"artifact": str(target), "sha256": artifact.sha256, "model": lm.identity["name"],
                    "recipe": recipe_name, "plot": str(plot) if plot else None, **summary})
    else:
        print_attribution(summary, lm.identity["name"], recipe_name, wrote=str(target) + (f" and {plot}" if plot else ""))
