"""Record's cost against a bare forward pass over the same batches, as ratios from one run.

    python benchmarks/bench_record.py [--model M] [--batch-size 16] [--repeats 5]

Three timings over the conformity recipe's 96 decisions, in identical batches
(same rows, same right padding), interleaved and repeated, median kept:

- bare:   the model's own forward with ``logits_to_keep=1`` (one logit row per
          sequence, no hooks) -- the cheapest forward a scorer could do;
- full:   the model's own forward with logits at every position (what a naive
          scorer pays with a 262k vocabulary);
- record: mechfix's ``run_requests`` scoring both options and capturing all three
          activation sites at the decision position.

Target: record / bare <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mechfix.scenario.episodes import option_ids, render_episode, speaker_list, tokenize_episode  # noqa: E402
from mechfix.engine.batches import Request, rows_of  # noqa: E402
from mechfix.engine.forward import run_requests  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.scenario.recipe import load_recipe  # noqa: E402


def requests_for(lm, recipe) -> list[Request]:
    reqs = []
    for c in recipe.condition_names:
        for i in range(len(recipe.items)):
            ep = render_episode(recipe, i, c)
            ids = tokenize_episode(lm.tokenizer, ep, speaker_list(recipe)).ids
            reqs.append(Request(ids, [option_ids(lm.tokenizer, o) for o in ep.options]))
    return reqs


def bare_batches(lm, reqs, batch_size):
    """The same padded batches run_requests builds (rows sorted longest first)."""
    rows = sorted(rows_of(reqs), key=lambda r: -len(r.ids))
    pad = lm.tokenizer.pad_token_id
    out = []
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        w = max(len(r.ids) for r in batch)
        ids = torch.full((len(batch), w), pad)
        mask = torch.zeros((len(batch), w), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.ids)] = torch.tensor(r.ids)
            mask[b, : len(r.ids)] = 1
        out.append((ids, mask))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    reqs = requests_for(lm, load_recipe("conformity").recipe)
    batches = bare_batches(lm, reqs, args.batch_size)

    def bare():
        with torch.inference_mode():
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def full():
        with torch.inference_mode():
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def record():
        run_requests(lm, reqs, batch_size=args.batch_size)

    fns = {"bare": bare, "full": full, "record": record}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": lm.identity["name"],
        "decisions": len(reqs),
        "batches": len(batches),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "record_over_bare": round(med["record"] / med["bare"], 3),
        "full_logits_over_bare": round(med["full"] / med["bare"], 3),
        "target_record_over_bare": 1.25,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
