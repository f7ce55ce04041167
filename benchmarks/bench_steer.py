"""What choosing a fix by what carries over costs, against a sweep on the training fit, measured in one run.

    python benchmarks/bench_steer.py ATTR.safetensors [--record REC.safetensors]

Runs two steer configurations on the same attribution, model and machine:

- ``fit``: what steer did before cross-validation: one operation (``project``)
  on the top 5 heads, the strength chosen on the training fit (no folds), KL
  on a neutral set of the old built-in set's size (the first passages of the
  selection set up to about 1,060 tokens, every position), clean agreement
  only, three bisection steps;
- ``carry``: steer's defaults: every heads operation, 1/3/5 heads,
  cross-validation over 5 folds of items, the whole budget (KL on the
  4,000-word selection set at every 4th position, clean margin, capabilities,
  helpful influence), two bisection steps.

Prints one JSON object: the seconds of each, their ratio, and what each chose.
Target: ``carry`` at most 2× ``fit``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mechfix.measure import capabilities as caps  # noqa: E402
from mechfix.artifacts import load_artifact  # noqa: E402
from mechfix.measure.evaluate import neutral_passages, neutral_set  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.stages.steer import SEARCH_KL_STRIDE, steer  # noqa: E402
from mechfix.stages.sweep import Budget  # noqa: E402

OLD_NEUTRAL_TOKENS = 1064  # the size of the single neutral set steer and verify shared before


def _summary(st, seconds: float) -> dict:
    p = st.sweep[st.chosen]
    return {"seconds": round(seconds, 1), "op": p.op, "heads": p.heads, "strength": p.strength,
            "reduction": p.reduction, "cv_reduction": p.cv_reduction, "kl": p.kl,
            "points_measured": len(st.search)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attribution", type=Path)
    ap.add_argument("--record", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    att = load_artifact(args.attribution, expect="attribution")
    rec_path = args.record or args.attribution.parent / Path(att.manifest["inputs"]["record"]["path"]).name
    rec = load_artifact(rec_path, expect="record")
    lm = load_model(None)

    passages, small = neutral_passages(part="select"), []
    for p in passages:
        small.append(p)
        if neutral_set(lm, small).n_tokens >= OLD_NEUTRAL_TOKENS:
            break
    old_budget = Budget(max_kl=0.1, min_clean_agreement=0.95, min_capability=None, max_helpful_loss=None,
                        min_clean_margin=None)
    t0 = time.perf_counter()
    fit = steer(lm, att, rec, neutral_set(lm, small), op="project", top=5, budget=old_budget, refine=3, folds=0)
    t_fit = time.perf_counter() - t0

    t0 = time.perf_counter()
    suite = caps.build_suite(lm, caps.load_tasks(), "select")
    carry = steer(lm, att, rec, neutral_set(lm, passages, SEARCH_KL_STRIDE), capabilities=suite)
    t_carry = time.perf_counter() - t0
    print(json.dumps({"fit": _summary(fit, t_fit), "carry": _summary(carry, t_carry),
                      "ratio": round(t_carry / t_fit, 2), "target": 2.0}, indent=2))


if __name__ == "__main__":
    main()
