"""``mechfix report``: one offline HTML page that shows a run's diagnosis and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechfix.cli.checks import check_paths
from mechfix.textio import write_text_atomic
from mechfix.cli.common import JsonOpt, emit_json, app, err


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix report conformity/ --out conformity.html\n\n"
        "  mechfix report conformity/conformity.attr.safetensors conformity/conformity.fix.safetensors\n\n"
        "  mechfix verify conformity --fix a.fix.safetensors --compare b.fix.safetensors --json > cmp.verify.json\n\n"
        "  mechfix report conformity/ cmp.verify.json --out compare.html --json"
    )
)
def report(
    paths: Annotated[list[Path], typer.Argument(help="A run's folder (as `mechfix run --out` writes it), or its artifacts "
                                                "and verify reports (NAME.verify.json).", show_default=False)],
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="The HTML file to write (default: NAME.report.html "
                                                  "in the first folder given, or beside the first file; NAME is the "
                                                  "recipe's name, reduced to a safe file name).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML page: summary and gates, behaviour per item, attribution map, who carries it, the fix.

    The page holds everything inline (plotly.js included, about 5 MB): it opens
    offline, makes no network request, follows the light or dark theme and
    prints. Sections whose artifact was not given say which file would fill them.
    """
    from mechfix.artifacts import ADAPTER_WEIGHTS
    from mechfix.report import collect, render
    from mechfix.untrusted import file_stem, inside

    # The page may go inside a folder it reads (the run's own folder): only the files read must not be overwritten.
    check_paths(either={f"PATH {p}": p for p in paths})
    run = collect(paths)
    if out_path is None:
        first = paths[0]
        folder = first if first.is_dir() and not (first / ADAPTER_WEIGHTS).is_file() else first.parent
        # The recipe's name comes from the artifacts' own metadata: data, never a path.
        out_path = inside(folder, f"{file_stem(run.name)}.report.html")
    check_paths(either={f"PATH {s.path}": s.path for s in run.sources}, outputs={"--out": out_path})
    html = render(run)
    write_text_atomic(out_path, html)
    kinds = [s.kind for s in run.sources]
    if as_json:
        emit_json({"report": str(out_path), "bytes": len(html.encode("utf-8")), "inputs": [str(s.path) for s in run.sources],
                    "kinds": kinds})
    else:
        err.print(f"wrote {out_path} ({len(html.encode('utf-8')) / 2**20:.1f} MB; from {len(kinds)} inputs: "
                  f"{', '.join(sorted(set(kinds)))})", highlight=False)
