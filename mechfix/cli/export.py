"""``mechfix export``: take a fix to where models are served (a llama.cpp control vector, a PEFT adapter, merged weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechfix.cli.checks import check_paths
from mechfix.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, TrustOpt, emit_json, load_command_model, progress_bars, app, err


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mechfix export conformity.vec.safetensors --out conformity.gguf\n\n"
        "  llama-cli -m model.gguf --control-vector conformity.gguf\n\n"
        "  mechfix export conformity.fix.safetensors --format peft --out conformity-adapter\n\n"
        "  vllm serve MODEL --enable-lora --lora-modules conformity=conformity-adapter\n\n"
        "  mechfix export conformity.fix.safetensors --format hf --out gemma-fixed --json"
    )
)


def export(
    fix_path: Annotated[Path, typer.Argument(help="A fix artifact (from `mechfix steer`), or a LoRA fix folder.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="File (gguf) or folder (peft, hf) to write.")],
    fmt: Annotated[
        str,
        typer.Option("--format", help="gguf: a llama.cpp control vector (vector fixes). peft: a PEFT LoRA adapter "
                     "folder (heads fixes of ablate or scale; LoRA fixes). hf: a transformers checkpoint with the fix "
                     "merged (heads fixes of ablate, scale, steer or restore; LoRA fixes)."),
    ] = "gguf",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a fix in a format an engine loads, exactly as mechfix applies it, or refuse (exit 2).

    gguf needs no model. peft and hf read the model's attention output
    projections (the fix's model, or --model), write the folder, and check the
    export on a probe text before saying so: the largest logit difference
    between the fix applied by mechfix and the exported weights is reported.
    A fix that no format reproduces exactly (a rectified `project` heads fix, a
    gated fix, a vector fix as weights, a constant term as an adapter) is
    refused with what would be lost and what to use instead.
    """
    from mechfix.artifacts import check_same_model, check_writable_dir
    from mechfix.errors import BadInputError
    from mechfix.stages.export import FORMATS, check_export, check_exported, write_gguf, write_hf, write_peft
    from mechfix.fixes.fix import load_fix

    if fmt not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    check_paths(outputs={"--out": out_path} if fmt == "gguf" else {}, folders={} if fmt == "gguf" else {"--out": out_path},
                either={"FIX": fix_path})
    fix = load_fix(fix_path)
    check_export(fix, fmt)
    if fmt == "gguf":
        _gguf(fix, write_gguf(fix, out_path), as_json)
        return
    check_writable_dir(out_path, "hf" if fmt == "hf" else "lora")
    spec = model if model is not None else fix.model.get("source")
    lm = load_command_model(spec, device, dtype, trust_remote_code)
    check_same_model({"model": fix.model}, lm.identity, fix_path)
    with progress_bars() as progress:
        progress(f"writing the {fmt} export", 1, None, key="export")
        if fmt == "peft":
            art = write_peft(lm, fix, out_path)
            info: dict[str, Any] = {"sha256": art.sha256, "rank": art.manifest["fix"]["rank"],
                                    "modules": [m["module"] for m in art.manifest["fix"]["modules"]]}
            exported = load_fix(out_path)
        else:
            record = write_hf(lm, fix, out_path)
            info = {"merged": record["merged"], "config_changed": record["config_changed"]}
            exported = None
        progress("checking the export on a probe text", 1, None, key="check")
        info.update(check_exported(lm, fix, exported))
    info = {"path": str(out_path), "format": fmt, "from": str(fix_path), "kind": fix.kind, "op": fix.op,
            "targets": fix.targets, "strength": fix.strength, **info}
    if as_json:
        emit_json(info)
        return
    what = f"{fix.kind} fix ({fix.op} on {', '.join(fix.targets)}, strength {fix.strength:g})"
    if fmt == "peft":
        err.print(f"wrote {out_path}: a PEFT LoRA adapter (rank {info['rank']}) on {', '.join(info['modules'])}, "
                  f"the {what} with its strength folded in.")
        err.print(f"load it with peft.PeftModel.from_pretrained(model, '{out_path}'), serve it with "
                  f"`vllm serve MODEL --enable-lora --lora-modules fix={out_path}`, or check it with "
                  f"`mechfix verify RECIPE --fix {out_path}`.")
    else:
        err.print(f"wrote {out_path}: a transformers checkpoint with the {what} merged into "
                  f"{', '.join(m['module'] for m in info['merged'])}"
                  + (f" (config: {', '.join(f'{k} = {v}' for k, v in info['config_changed'].items())})" if info["config_changed"] else "")
                  + f". Load it with AutoModelForCausalLM.from_pretrained('{out_path}').")
    err.print(f"checked on a {info['check_tokens']}-token probe text: the fix moves logits by up to "
              f"{info['fix_effect']:.3g}; the export reproduces them within {info['max_abs_diff']:.2g}.")


def _gguf(fix, path: Path, as_json: bool) -> None:
    from mechfix.artifacts import sha256_file

    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("controlvector.model_hint")
    info = {"path": str(path), "sha256": sha256_file(path), "format": "gguf", "layers": fix.layers,
            "strength": fix.strength, "model_hint": field.contents() if field is not None else None}
    if as_json:
        emit_json(info)
    else:
        err.print(f"wrote {path}: llama.cpp control vector for {info['model_hint']} ({', '.join(fix.targets)}, "
                  f"strength {fix.strength:g} baked in). Use it with `llama-cli --control-vector {path}`.")
