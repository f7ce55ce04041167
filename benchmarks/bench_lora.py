"""How long a LoRA fix takes to train, and what it costs in memory, measured in one run.

    python benchmarks/bench_lora.py ATTR.safetensors [--record REC.safetensors] [--steps 40] [--only-lower-layers]

Trains, on the attribution's recording's training split, with the same modules and settings:

1. one adapter with the pressure term and KL on the baseline prompts and
   neutral text only (the LoRA fix as mechfix trained it before the labelled
   objective: one training, strength chosen on the training fit);
2. the labelled fix as ``mechfix steer --kind lora`` trains it now: every
   recorded condition as a label (helpful pull kept, control and capability
   prompts kept), on the whole split and on each cross-validation fold
   (:data:`mechfix.stages.lora.LORA_FOLDS`), with snapshots;
3. the labelled fix's whole-split adapter twice more, one after the other, with the
   layers below the adapter run once per sequence
   (:class:`mechfix.engine.layerskip.RowSkip`, as training does) and with
   every layer run at every step, from the same base-model targets.

It reports the times and their ratios, the time per step of each, a
training step against one plain forward pass (no gradient) over the same
decisions, and the process's peak resident memory before and after.

Target: training the embedded model's conformity fix (1.) in at most 300 s
on a 2-core CPU ("a few minutes at most"); the labelled fix's ratio to it is
reported, not bounded: it is what a user pays for a fix chosen on unseen items.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mechfix.artifacts import load_artifact  # noqa: E402
from mechfix.stages.attribute import decisions_from_record  # noqa: E402
from mechfix.measure.evaluate import neutral_set  # noqa: E402
from mechfix.engine.batches import Request  # noqa: E402
from mechfix.engine.forward import option_scores  # noqa: E402
from mechfix.fixes.adapter import lora_targets  # noqa: E402
from mechfix.measure import capabilities as caps  # noqa: E402
from mechfix.measure.crossval import fold_masks, item_folds, row_items  # noqa: E402
from mechfix.engine.layerskip import RowSkip  # noqa: E402
from mechfix.stages.lora import LORA_FOLDS, LoraSettings, _kl_set, lora_candidates, train_lora, train_lora_steps  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.stages.steer import pick_targets  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _unlabelled_and_labelled(lm, rec, dec, reqs, baseline, conds, targets, neutral, settings, keep) -> dict:
    """1. and 2.: the unlabelled adapter's training, the labelled fix's (whole split and folds), and their ratio."""
    forward = []
    for _ in range(3):
        t = time.perf_counter()
        with torch.inference_mode():
            option_scores(lm, reqs["pressure"][: settings.batch])
            option_scores(lm, reqs[baseline][: settings.batch])
        forward.append(time.perf_counter() - t)
    mem_before = _peak_mib()
    t = time.perf_counter()
    _, log = train_lora(lm, targets, reqs["pressure"], reqs[baseline], neutral, settings)
    total = time.perf_counter() - t
    per_step = total / settings.steps
    fwd = statistics.median(forward)
    folds = fold_masks(item_folds(row_items(rec, dec.items), LORA_FOLDS, 0), int(rec.tensors["split"].shape[0]), dec.items)
    t = time.perf_counter()
    _, labelled_log = lora_candidates(lm, "lora", targets, reqs, baseline, neutral, settings, folds, keep)
    labelled = time.perf_counter() - t
    return {
        "train_s": round(total, 1),
        "per_step_s": round(per_step, 3),
        "forward_s": round(fwd, 3),
        "step_over_forward": round(per_step / fwd, 2),
        "loss_first_last": [round(log.steps[0]["loss"], 4), round(log.steps[-1]["loss"], 4)],
        "peak_rss_mib_before": round(mem_before),
        "peak_rss_mib_after": round(_peak_mib()),
        "target_train_s": 300,
        "labelled": {
            "conditions": conds,
            "folds": len(folds),
            "capability_prompts": len(keep),
            "train_s": round(labelled, 1),
            "whole_split_s": round(labelled_log.seconds, 1),
            "per_step_s": round(labelled_log.seconds / settings.steps, 3),
            "over_unlabelled": round(labelled / total, 2),
            "step_over_unlabelled_step": round(labelled_log.seconds / total, 2),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attribution", help="an attribution artifact (from mechfix attribute or run)")
    ap.add_argument("--record", default=None, help="its recording (default: the name it records, beside it)")
    ap.add_argument("--steps", type=int, default=LoraSettings.steps)
    ap.add_argument("--top-heads", type=int, default=5)
    ap.add_argument("--only-lower-layers", action="store_true", help="run only 3. (the lower layers kept or not)")
    args = ap.parse_args()
    att = load_artifact(args.attribution, expect="attribution")
    rec_path = args.record or str(Path(args.attribution).parent / Path(att.manifest["inputs"]["record"]["path"]).name)
    rec = load_artifact(rec_path, expect="record")
    lm = load_model(att.manifest["model"].get("source"))
    baseline = att.manifest.get("params", {}).get("baseline", "clean")
    conds = ["pressure", baseline] + [c for c in ("helpful", "control") if f"tokens/{c}" in rec.tensors and c != baseline]
    dec = decisions_from_record(rec, lm.tokenizer, conds, split=0)
    reqs = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in conds}
    layers, heads, _ = pick_targets(att, "heads", args.top_heads)
    targets = lora_targets(lm, layers, heads)
    neutral = neutral_set(lm)
    settings = LoraSettings(steps=args.steps)

    suite = caps.build_suite(lm, caps.load_tasks(None), "select")
    keep = [r.prompt for rs in suite.requests.values() for r in rs]
    out: dict = {"model": lm.identity["name"], "device": str(lm.device), "threads": torch.get_num_threads(),
                 "modules": [m.module for m in targets],
                 "settings": {"rank": settings.rank, "steps": settings.steps, "batch": settings.batch}}
    if not args.only_lower_layers:
        out.update(_unlabelled_and_labelled(lm, rec, dec, reqs, baseline, conds, targets, neutral, settings, keep))
    # 3. The whole split's labelled training with and without the lower layers kept per sequence.
    # The base model's KL targets are computed once for each, untimed, as lora_candidates does: with the lower
    # layers kept, that pass keeps every prompt's and passage's lower layers on the way.
    control = reqs.get("control") if baseline != "control" else None
    start = min(m.layer for m in targets)
    skip_times: dict[str, float] = {}
    for name, first in (("kept_per_sequence_s", start), ("every_layer_s", 0)):
        skip = RowSkip(lm, first)
        kl = _kl_set(lm, [r.prompt for r in reqs[baseline]], [r.prompt for r in control] if control else None, keep,
                     neutral, settings.topk, skip)
        t = time.perf_counter()
        train_lora_steps(lm, targets, reqs["pressure"], reqs[baseline], neutral, settings, helpful=reqs.get("helpful"),
                         control=control, keep=keep, kl_set=kl, skip=skip)
        skip_times[name] = round(time.perf_counter() - t, 1)
    out["lower_layers"] = {
        "first_adapted_layer": start,
        "layers": lm.n_layers,
        **skip_times,
        "kept_over_every_layer": round(skip_times["kept_per_sequence_s"] / skip_times["every_layer_s"], 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
