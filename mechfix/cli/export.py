"""``mechfix export``: write a vector fix as a llama.cpp control vector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechfix.cli.checks import check_paths
from mechfix.cli.common import JsonOpt, _emit_json, app, err


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
    check_paths(outputs={"--out": out_path}, either={"FIX": fix_path})
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
