"""Does mechfix find and remove a misbehaviour whose cause is known? `mechfix run` on the model organisms.

    python benchmarks/bench_organisms.py [--json] [--out DIR] [--only NAME ...] [--no-base] [--no-lora] [--save FILE]

Builds what is not cached (``benchmarks/organisms.py``), then runs
``mechfix run RECIPE --model ORGANISM --json`` with every option at its
default on each organism and the negative control, and on the unplanted base
model with the same recipes for comparison. Per run: the behaviour's effect
(pressure − clean, nats, every item); where attribution puts it (the rank of
the first planted head among all heads and of the first planted layer's
attention output among all layers', by attribution patching, and their share of
the positive effect, at the decision position and summed over every position);
the fix steer chose; the
held-out reduction, KL, capability kept and helpful loss verify measured; the
verdict (``PASS``, ``FAIL`` or ``no fix``) with every gate at its default.

With ``--kind lora`` too (unless ``--no-lora``): the same run with a lora fix,
whose modules steer picks by restoring each layer's attention output at every
position (exact; ``*_restored``: the rank of the first planted layer there).

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


def mechfix_run(recipe: Path, out: Path, model: Path | None, kind: str = "heads") -> tuple[dict, float]:
    """``mechfix run`` with its defaults (and ``--kind``): its --json summary and the seconds it took."""
    cmd = [sys.executable, "-m", "mechfix.cli", "run", str(recipe), "--out", str(out), "--json"]
    if kind != "heads":
        cmd += ["--kind", kind]
    if model is not None:
        cmd += ["--model", str(model)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"mechfix run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), seconds


def _ranking(effects, names: list[str], planted: list[str]) -> dict:
    """Rank of the first planted component by ``effects`` (1 = top), and the planted components' share of the
    positive effect."""
    flat = effects.flatten()
    order = flat.argsort(descending=True).tolist()
    positive = flat.clamp(min=0)
    share = sum(float(positive[names.index(c)]) for c in planted)
    return {
        "first_planted_rank": next((r + 1 for r, i in enumerate(order) if names[i] in planted), None),
        "planted_share": share / float(positive.sum()) if float(positive.sum()) > 0 else None,
        "top": [names[i] for i in order[:5]],
    }


def where_attribution_puts_it(attribution: Path, layers: list[int]) -> dict:
    """Where attribution patching puts the effect, against what was planted: the heads of the trained ``layers``
    (``planted``), and, one level up, those layers' attention outputs, the modules the update changed
    (``*_module``: their rank among every layer's attention output).

    At the decision position (what ``attribute`` ranks and steer reads), and, when the recipe's pressure and clean
    prompts are token-aligned, summed over every position (``*_all_positions``): a head's weights act at every
    position, and a planted head may do its work where the trigger is read rather than where the answer is given.
    """
    from mechfix.artifacts import load_artifact

    art = load_artifact(attribution, expect="attribution")
    n_layers, n_heads = art.tensors["heads"].shape
    heads = [f"L{i}.H{h}" for i in range(n_layers) for h in range(n_heads)]
    modules = [f"L{i}.attn" for i in range(n_layers)]
    planted = [f"L{layer}.H{h}" for layer in layers for h in range(n_heads)]
    planted_modules = [f"L{layer}.attn" for layer in layers]

    def both(per_head) -> dict:
        one = _ranking(per_head, heads, planted)
        up = _ranking(per_head.sum(1), modules, planted_modules)  # a layer's attention output: the sum of its heads
        return {"first_planted_rank": one["first_planted_rank"], "planted_share": one["planted_share"],
                "top_heads": one["top"], "first_planted_module_rank": up["first_planted_rank"],
                "planted_module_share": up["planted_share"]}

    out = {"planted": planted, **both(art.tensors["heads"].float())}
    if "positions/heads" in art.tensors:  # [N, T, L, H], zero past each prompt's end
        out.update({f"{k}_all_positions": v for k, v in both(art.tensors["positions/heads"].float().sum(1).mean(0)).items()})
    if "everywhere/attn" in art.tensors:  # [N, L]: exact, each layer's attention output restored at every position
        up = _ranking(art.tensors["everywhere/attn"].float().mean(0), modules, planted_modules)
        out.update({"first_planted_module_rank_restored": up["first_planted_rank"],
                    "planted_module_share_restored": up["planted_share"], "top_modules_restored": up["top"]})
    return out


def outcome(summary: dict, seconds: float) -> dict:
    """What a run's fix did: the fix chosen and verify's numbers and verdict."""
    verify = summary.get("verify") or {}
    helpful = verify.get("helpful") or {}
    fix = summary.get("fix")
    return {
        "fix": summary["artifacts"].get("fix") if fix else None,
        "chosen": f"{fix['op']} on {', '.join(fix['targets'])} at {fix['strength']:g}" if fix else None,
        "verdict": "no fix" if fix is None else ("PASS" if summary["passed"] else "FAIL"),
        "reduction": _value(verify.get("reduction")),
        "kl": _value(verify.get("kl")),
        "capability_kept": summary.get("capabilities_kept"),
        "helpful_loss": helpful.get("loss") if isinstance(helpful, dict) else None,
        "why": summary.get("why"),
        "seconds": round(seconds, 1),
    }


def row(name: str, recipe: Path, model: Path | None, out: Path, layers: list[int], lora: bool = False) -> dict:
    """One benchmark entry: ``mechfix run`` with its defaults and what its artifacts say; with ``lora``, also
    ``mechfix run --kind lora`` (its outcome under ``lora``)."""
    summary, seconds = mechfix_run(recipe, out, model)
    entry = {
        "name": name,
        "model": str(model) if model else "embedded base model",
        "recipe": str(recipe.relative_to(ROOT)),
        **where_attribution_puts_it(Path(summary["artifacts"]["attribution"]), layers),
        "effect": summary["behaviour"]["effect"]["mean"] if isinstance(summary["behaviour"]["effect"], dict)
        else summary["behaviour"]["effect"],
        **outcome(summary, seconds),
    }
    if lora:
        entry["lora"] = outcome(*mechfix_run(recipe, out.with_name(out.name + "-lora"), model, "lora"))
    return entry


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0%}" if pct else f"{x:.3g}"
    return str(x)


def table(result: dict) -> str:
    head = ("name", "effect", "first_planted_rank", "planted_share", "first_planted_rank_all_positions",
            "planted_share_all_positions", "first_planted_module_rank", "first_planted_module_rank_all_positions",
            "first_planted_module_rank_restored", "kind", "chosen", "reduction", "kl", "capability_kept", "helpful_loss",
            "verdict")
    rows = [r for r in (*result["organisms"], result["negative_control"], *result["base"]) if r is not None]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        # One line per fix kind run: the defaults' (heads), then the lora run's beside the same attribution.
        for kind, fix in (("heads", r), *((("lora", r["lora"]),) if r.get("lora") else ())):
            cells = {**r, **fix, "kind": kind}
            lines.append(" | ".join(_fmt(cells.get(k), pct=k.startswith("planted_share") or k in ("reduction", "capability_kept", "helpful_loss"))
                                    for k in head))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="keep every run's folder here (default: a temporary folder)")
    ap.add_argument("--only", nargs="*", default=None, help="organisms to run (default: all, and the negative control)")
    ap.add_argument("--no-base", action="store_true", help="skip the base model's runs")
    ap.add_argument("--no-lora", action="store_true", help="skip the `mechfix run --kind lora` runs (minutes of training each)")
    ap.add_argument("--save", type=Path, default=None,
                    help="also write the JSON object to this file (the recorded results: benchmarks/organisms/results.json)")
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
            entry = row(name, recipe, folder, out / name, truth["spec"]["layers"], lora=not args.no_lora)
            if not truth["planted"]:  # the negative control: the same heads trained, nothing planted in them
                entry["planted"] = []
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
                entry = row(f"base:{Path(recipe).stem}", organisms.FOLDER / recipe, None, out / f"base-{Path(recipe).stem}", layers,
                            lora=not args.no_lora)
                entry["planted"] = []  # nothing planted: the ranks are those of the organisms' heads in the base model
                result["base"].append(entry)
        if args.save:
            # Paths a reader can follow on their own machine: the cache and the run folder by name.
            text = json.dumps(result, indent=2).replace(str(organisms.cache_root().parent), "$MECHFIX_CACHE")
            args.save.write_text(text.replace(str(out), "OUT") + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))


if __name__ == "__main__":
    main()
