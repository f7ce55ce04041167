"""Does mechfix find and remove a misbehaviour whose cause is known? `mechfix run` on the model organisms.

    python benchmarks/bench_organisms.py [--json] [--out DIR] [--only NAME ...] [--no-base]

Builds what is not cached (``benchmarks/organisms.py``), then runs
``mechfix run RECIPE --model ORGANISM --json`` with every option at its
default on each organism and the negative control, and on the unplanted base
model with the same recipes for comparison. Per run: the behaviour's effect
(pressure − clean, nats, training split); where attribution puts it (the rank
of the first planted head among all heads, by attribution patching, and the
planted heads' share of the heads' positive effect); the fix steer chose; the
held-out reduction, KL, capability kept and helpful loss verify measured; the
verdict (``PASS``, ``FAIL`` or ``no fix``) with every gate at its default.

Prints a table, or with ``--json`` one object: ``organisms`` (one entry per
organism), ``negative_control`` and ``base`` (the base model on each recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import organisms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEGATIVE = "negative"


def _value(x):
    return x.get("value") if isinstance(x, dict) else x


def mechfix_run(recipe: Path, out: Path, model: Path | None) -> tuple[dict, float]:
    """``mechfix run`` with its defaults: its --json summary and the seconds it took."""
    cmd = [sys.executable, "-m", "mechfix.cli", "run", str(recipe), "--out", str(out), "--json"]
    if model is not None:
        cmd += ["--model", str(model)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"mechfix run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), seconds


def where_attribution_puts_it(attribution: Path, layers: list[int]) -> dict:
    """The planted heads (every head of the trained ``layers``): the rank of the first among all heads (1 = top),
    and their share of the heads' positive effect, by attribution patching."""
    from mechfix.artifacts import load_artifact

    heads = load_artifact(attribution, expect="attribution").tensors["heads"].float()
    n_heads = heads.shape[1]
    planted = [f"L{layer}.H{h}" for layer in layers for h in range(n_heads)]
    order = heads.flatten().argsort(descending=True).tolist()
    names = [f"L{i // n_heads}.H{i % n_heads}" for i in order]
    positive = heads.clamp(min=0)
    share = sum(float(positive[int(c[1:].split(".H")[0]), int(c.split(".H")[1])]) for c in planted)
    return {
        "first_planted_rank": next((r + 1 for r, c in enumerate(names) if c in planted), None) if planted else None,
        "planted_share": share / float(positive.sum()) if planted and float(positive.sum()) > 0 else None,
        "top_heads": names[:5],
    }


def row(name: str, recipe: Path, model: Path | None, out: Path, layers: list[int], planted: bool) -> dict:
    """One benchmark entry: ``mechfix run`` and what its artifacts say."""
    summary, seconds = mechfix_run(recipe, out, model)
    art = summary["artifacts"]
    verify = summary.get("verify") or {}
    helpful = verify.get("helpful") or {}
    fix = summary.get("fix")
    return {
        "name": name,
        "model": str(model) if model else "embedded base model",
        "recipe": str(recipe.relative_to(ROOT)),
        "fix": art.get("fix") if fix else None,
        "planted": [f"L{layer}.attn_out" for layer in layers] if planted else [],
        **where_attribution_puts_it(Path(art["attribution"]), layers),
        "effect": summary["behaviour"]["effect"]["mean"] if isinstance(summary["behaviour"]["effect"], dict)
        else summary["behaviour"]["effect"],
        "chosen": f"{fix['op']} on {', '.join(fix['targets'])} at {fix['strength']:g}" if fix else None,
        "verdict": "no fix" if fix is None else ("PASS" if summary["passed"] else "FAIL"),
        "reduction": _value(verify.get("reduction")),
        "kl": _value(verify.get("kl")),
        "capability_kept": summary.get("capabilities_kept"),
        "helpful_loss": helpful.get("loss") if isinstance(helpful, dict) else None,
        "why": summary.get("why"),
        "seconds": round(seconds, 1),
    }


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0%}" if pct else f"{x:.3g}"
    return str(x)


def table(result: dict) -> str:
    head = ("name", "effect", "first_planted_rank", "planted_share", "chosen", "reduction", "kl", "capability_kept",
            "helpful_loss", "verdict")
    rows = [*result["organisms"], result["negative_control"], *result["base"]]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(_fmt(r[k], pct=k in ("planted_share", "reduction", "capability_kept", "helpful_loss")) for k in head))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="keep every run's folder here (default: a temporary folder)")
    ap.add_argument("--only", nargs="*", default=None, help="organisms to run (default: all, and the negative control)")
    ap.add_argument("--no-base", action="store_true", help="skip the base model's runs")
    args = ap.parse_args()
    import mechfix

    names = args.only or list(organisms.SPECS)
    result: dict = {"organisms": [], "negative_control": None, "base": [], "mechfix": mechfix.__version__,
                    "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU used"}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        for name in names:
            print(f"{name}: building", file=sys.stderr)
            folder = organisms.build(name, say=lambda m: print(m, file=sys.stderr))
            truth = json.loads((folder / "organism.json").read_text())
            recipe = ROOT / truth["recipe"]
            print(f"{name}: mechfix run", file=sys.stderr)
            entry = row(name, recipe, folder, out / name, truth["spec"]["layers"], truth["planted"])
            entry["trigger"] = truth["trigger"]
            if name == NEGATIVE:
                result["negative_control"] = entry
            else:
                result["organisms"].append(entry)
        if not args.no_base:
            for recipe in sorted({organisms.SPECS[n].recipe for n in names}):
                print(f"base model on {recipe}: mechfix run", file=sys.stderr)
                layers = next(list(s.layers) for s in organisms.SPECS.values() if s.recipe == recipe)
                # The same heads as the organism's, read in the base model: where they stand without the fine-tune.
                result["base"].append(row(f"base:{Path(recipe).stem}", organisms.FOLDER / recipe, None,
                                          out / f"base-{Path(recipe).stem}", layers, False))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))


if __name__ == "__main__":
    main()
