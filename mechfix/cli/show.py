"""``mechfix show``: print an artifact's manifest and tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mechfix.cli.checks import check_paths
from mechfix.textio import clean_nan
from mechfix.cli.common import JsonOpt, emit_json, app, err, shown
from mechfix.cli.views import print_attribution, print_record_summary


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

    check_paths(either={"PATH": path})
    kind, manifest, table = read_header(path)
    if as_json:
        emit_json(
            clean_nan(
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
    err.print(f"[bold]{shown(path)}[/bold]: {shown(kind)} artifact, schema {shown(manifest.get('schema'))}, made "
              f"{shown(manifest.get('created'))}", markup=True)
    err.print(
        f"model: {model.get('name')} ({model.get('architecture')}, config {str(model.get('config_hash'))[:12]}, "
        f"weights {str(model.get('weights_fingerprint'))[:12]})"
    )
    for name, inp in manifest.get("inputs", {}).items():
        err.print(f"input {name}: {inp.get('path')} (sha256 {str(inp.get('sha256'))[:12]})")
    if manifest.get("params"):
        err.print("params: " + ", ".join(f"{k}={v}" for k, v in manifest["params"].items()))
    style = manifest.get("style")
    if style:
        err.print(f"style: {style.get('name')}" + (f", chat template {style.get('template')} (sha256 "
                                                  f"{str(style.get('template_sha256'))[:12]})" if style.get("name") == "chat" else ""))
    if manifest.get("libraries"):
        err.print("libraries: " + ", ".join(f"{k} {v}" for k, v in manifest["libraries"].items()))
    if kind == "fix" and "fix" in manifest:
        from mechfix.cli.views import print_fix

        print_fix(manifest)
    elif kind == "attribution" and "summary" in manifest:
        print_attribution(clean_nan(manifest["summary"]), str(model.get("name")), str(manifest.get("recipe")))
    elif "summary" in manifest and "recipe" in manifest:
        print_record_summary(clean_nan(manifest["summary"]), str(model.get("name")), manifest["recipe"].get("name", "?"))
    # A live recording keeps every episode whole: show those, not each round's decision point.
    live = manifest.get("live", {}).get("episodes")
    said = {c: [e["transcript"] for e in eps] for c, eps in live.items()} if live else manifest.get("transcripts", {})
    for cond, texts in said.items():
        for text in texts[:transcripts]:
            err.rule(f"transcript: {cond}")
            err.print(text, highlight=False)
    t = Table(title="tensors", title_justify="left")
    t.add_column("name")
    t.add_column("dtype")
    t.add_column("shape")
    for k, (d, s) in table.items():
        t.add_row(k, d, "x".join(map(str, s)) or "scalar")
    err.print(t)
