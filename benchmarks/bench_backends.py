"""The nnsight backend against the hooks backend, from one run.

    python benchmarks/bench_backends.py [--model M] [--repeats 3] [--threads 1] [--stages record,atp,both,exact]

One process, one model (the embedded Gemma 3 270M by default), both backends on
the same weights, runs interleaved so that machine load hits both alike:

- record:  ``record`` of the conformity recipe (96 decisions: scores and the
           three sites at the decision position);
- atp:     ``attribute(method="atp")``: attribution patching of every component
           (baseline and pressure runs on cached prefixes, one backward), with the
           per-speaker split and the per-position pass;
- both:    the whole default ``attribute`` (estimates, then exact patching of the
           top 10 and of every layer's residual stream);
- exact:   ``attribute(method="exact")``: exact patching of all components.

The nnsight runs are also repeated with ``trace_prefixes`` off, the shape a
remote (NDIF) run takes: every tail reruns its whole prompt, because nothing
outlives a remote request. That measures the compute a remote run asks for, not
the network.

Targets: nnsight / hooks <= 1.1 for record and atp. The script also reports the
largest difference between the backends' numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mechfix.stages.attribute import attribute  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.scenario.recipe import load_recipe  # noqa: E402
from mechfix.stages.record import record, to_artifact  # noqa: E402
from mechfix.engine.backends import use_backend  # noqa: E402


def _max_diff(a, b) -> float:
    diffs = [float((a.pressure - b.pressure).abs().max())]
    diffs += [float((a.atp[k] - b.atp[k]).abs().max()) for k in a.atp]
    diffs += [float((a.exact[c] - b.exact[c]).abs().max()) for c in a.exact]
    return max(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stages", default="record,atp,both,exact",
                    help="Comma-separated stages to time (exact, every component patched, is the longest).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hooks = load_model(args.model)
    nn = use_backend(dataclasses.replace(hooks), "nnsight")  # the same weights, traced
    whole = use_backend(dataclasses.replace(hooks), "nnsight")
    whole.trace_prefixes = False  # as on NDIF
    loaded = load_recipe("conformity")
    rec = to_artifact(record(hooks, loaded.recipe), hooks, loaded, {})
    every = {
        "record": lambda lm: record(lm, loaded.recipe),
        "atp": lambda lm: attribute(lm, rec, method="atp"),
        "both": lambda lm: attribute(lm, rec, method="both"),
        "exact": lambda lm: attribute(lm, rec, method="exact"),
    }
    stages = {name: every[name] for name in args.stages.split(",")}
    backends = {"hooks": hooks, "nnsight": nn, "nnsight_whole_sequences": whole}
    times: dict[str, dict[str, list[float]]] = {s: {b: [] for b in backends} for s in stages}
    results: dict[str, dict[str, object]] = {s: {} for s in stages}
    for _ in range(args.repeats):
        for stage, fn in stages.items():
            for name, lm in backends.items():
                t = time.perf_counter()
                results[stage][name] = fn(lm)
                times[stage][name].append(time.perf_counter() - t)
    med = {s: {b: statistics.median(v) for b, v in per.items()} for s, per in times.items()}
    rec_diff = max(
        (float((results["record"]["hooks"].scores[c] - results["record"][b].scores[c]).abs().max())
         for b in ("nnsight", "nnsight_whole_sequences") for c in results["record"]["hooks"].scores),
        default=None,
    ) if "record" in results else None
    print(json.dumps({
        "model": hooks.identity["name"],
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds": {s: {b: round(v, 2) for b, v in per.items()} for s, per in med.items()},
        "nnsight_over_hooks": {s: round(per["nnsight"] / per["hooks"], 3) for s, per in med.items()},
        "whole_sequences_over_hooks": {s: round(per["nnsight_whole_sequences"] / per["hooks"], 3) for s, per in med.items()},
        "max_abs_diff": {
            "record_scores": rec_diff,
            **{s: max(_max_diff(results[s]["hooks"], results[s][b]) for b in ("nnsight", "nnsight_whole_sequences"))
               for s in stages if s != "record"},
        },
        "targets": {"record": "<= 1.1", "atp": "<= 1.1"},
    }, indent=2))


if __name__ == "__main__":
    main()
