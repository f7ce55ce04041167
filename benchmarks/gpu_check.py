"""A GPU check that needs no download: the four stages on a large model's shape, timed, with peak memory.

    python benchmarks/gpu_check.py                                # Gemma 3 12B's text shape, bf16, cuda
    python benchmarks/gpu_check.py --backend nnsight              # the same through nnsight traces
    python benchmarks/gpu_check.py --shape tiny --device cpu      # a smoke test of the script itself

The model is randomly initialised with the shape of a real large model (Gemma 3
12B's text decoder by default: 48 layers, 16 heads of 256, 3840 wide, 12B
parameters, in bf16) and uses the embedded model's tokenizer (Gemma 3's, read
from the converted embedded checkpoint, or ``--tokenizer DIR``). It runs
record, attribute (the whole default: estimates and exact patching of the top
10 and every residual stream), steer and verify on the conformity recipe's 128
decisions (pressure, clean, control, helpful x 32 items), and prints one JSON object:
seconds per stage, peak GPU memory per stage, batch size, and what steer and
verify concluded. Random weights carry no behaviour, so steer may find no fix
within its budget; verify then checks a fixed heads fix (project on the top 3
heads, strength 1) so that its cost is measured all the same.

Targets on one H200: the whole ``attribute`` in under 60 s; the script in under
8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

SHAPES = {
    # Gemma 3 12B (text decoder), from its published config.
    "gemma3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                       rope_theta=1_000_000.0, max_position_embeddings=131072),
    # The same family, small enough for a CPU (to check the script).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=512),
}


def _tokenizer(folder: str | None):
    from transformers import AutoTokenizer

    if folder is None:
        from mechfix.models import _checkpoint_for_gguf, embedded_gguf

        folder = str(_checkpoint_for_gguf(embedded_gguf(), None))
    return AutoTokenizer.from_pretrained(folder)


def build(shape: str, device: str, dtype: torch.dtype, tokenizer: str | None):
    """A randomly initialised Gemma 3 text model of ``shape``, on ``device``, wrapped for mechfix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechfix.models import wrap_model

    tok = _tokenizer(tokenizer)
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return wrap_model(model, tok, name=f"random {shape} ({dtype})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-12b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backend", default="hooks", choices=["hooks", "nnsight"])
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--tokenizer", default=None, help="A folder with the Gemma 3 tokenizer (default: the embedded model's).")
    args = ap.parse_args()

    import mechfix
    from mechfix.cli.common import parse_batch_size, resolve_batch_size
    from mechfix.engine.backends import use_backend
    from mechfix.errors import GateError
    from mechfix.fixes.fix import Fix, fix_from_artifact
    from mechfix.scenario.recipe import load_recipe

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here. Run it on a GPU, or try --shape tiny --device cpu.")
    out: dict = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "backend": args.backend,
                 "gpu": torch.cuda.get_device_name(0) if cuda else None}
    seconds: dict[str, float] = {}
    peak: dict[str, float] = {}

    def stage(name: str):
        class _Timer:
            def __enter__(self):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if cuda:
                    torch.cuda.synchronize()
                    peak[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                seconds[name] = round(time.perf_counter() - self.t, 2)

        return _Timer()

    start = time.perf_counter()
    with stage("build"):
        lm = use_backend(build(args.shape, args.device, getattr(torch, args.dtype), args.tokenizer), args.backend)
    out["parameters_billion"] = round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 2)
    batch = resolve_batch_size(lm, parse_batch_size(args.batch_size))
    out["batch_size"] = batch
    loaded = load_recipe("conformity")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with stage("record"):
            rec = mechfix.record(loaded, lm, batch_size=batch, out=folder / "c.rec.safetensors")
        out["decisions"] = len(rec.tensors["split"]) * len(rec.manifest["conditions"])
        with stage("attribute"):
            att = mechfix.attribute(rec, lm, batch_size=batch, out=folder / "c.attr.safetensors")
        top = att.manifest["summary"]["top"][:3]
        out["attribute_top"] = [t["component"] for t in top]
        with stage("steer"):
            try:
                fix = fix_from_artifact(mechfix.steer(att, rec, lm, batch_size=batch, out=folder / "c.fix.safetensors"))
                out["steer"] = f"{fix.op} on {', '.join(fix.targets)} at strength {fix.strength:g}"
            except GateError as exc:
                out["steer"] = f"no fix within the budget ({str(exc)[:160]})"
                fix = None
        if fix is None:
            heads = [tuple(int(x) for x in t["component"][1:].split(".H")) for t in top if ".H" in t["component"]]
            fix = Fix(op="project", layers=[la for la, _ in heads], heads=[h for _, h in heads],
                      vectors=torch.randn(len(heads), lm.head_dim), means=torch.zeros(len(heads), lm.head_dim),
                      strength=1.0, model=lm.identity)
        with stage("verify"):
            report = mechfix.verify(loaded, fix, lm, batch_size=batch)
        out["verify_passed"] = report["passed"]
    out["seconds"] = seconds
    out["peak_gpu_gib"] = peak or None
    out["total_seconds"] = round(time.perf_counter() - start, 1)
    out["targets"] = {"attribute_seconds": "< 60 on one H200", "total_seconds": "< 480"}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
