"""Attribute's cost in forward-pass equivalents, and against naive per-head patching, from one run.

    python benchmarks/bench_attribute.py [--model M] [--repeats 3] [--threads 1]

On the conformity recipe's 16 training decisions (pressure condition), in one process:

- bare:   the model's own forward over the 16 pressure prompts (``logits_to_keep=1``,
          no hooks) -- one forward pass, the unit;
- atp:    ``attribute(method="atp")``: every head, layer attention, MLP and residual
          stream estimated (baseline and pressure runs, one backward), with the
          per-speaker split;
- both:   the whole default ``attribute`` (estimate + exact confirmation of the
          top 10 and of every layer's residual stream);
- exact:  ``attribute(method="exact")``: exact patching of all 126 components on
          cached prefixes;
- naive:  exact patching of every head done the ordinary way: for each of the 72
          heads, one batched full forward over the 16 decisions with a hook that
          restores that head at the decision position (scores at the option
          positions only, as record computes them).

Targets: atp / bare <= 3.2; naive / both >= 20. The script also checks that
naive and cached exact patching give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_record import bare_batches  # noqa: E402

from mechfix.stages.attribute import Component, attribute, decisions_from_record  # noqa: E402
from mechfix.engine.batches import Request, rows_of  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.scenario.recipe import load_recipe  # noqa: E402
from mechfix.stages.record import record, to_artifact  # noqa: E402


def naive_exact_heads(lm, reqs, clean_heads) -> torch.Tensor:
    """Patched decision score of every (head, decision): one batched full forward per head."""
    rows = rows_of(reqs)
    pad = lm.tokenizer.pad_token_id
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
        mask[b, : len(r.ids)] = 1
    owner = torch.tensor([r.request for r in rows])
    dpos = torch.tensor([len(reqs[r.request].prompt) - 1 for r in rows])
    where = [(b, pos, k, tok) for b, r in enumerate(rows) for k, pos, tok in r.targets if k in (0, 1)]
    bi, pi = torch.tensor([w[0] for w in where]), torch.tensor([w[1] for w in where])
    tok = torch.tensor([w[3] for w in where])
    sign = torch.tensor([1.0 if w[2] == 1 else -1.0 for w in where])
    out = torch.zeros(lm.n_layers, lm.n_heads, len(reqs))
    for layer in range(lm.n_layers):
        for head in range(lm.n_heads):

            def put(m, a, layer=layer, head=head):
                x = a[0].clone()
                v = x.view(*x.shape[:2], lm.n_heads, lm.head_dim)
                v[torch.arange(len(rows)), dpos, head] = clean_heads[owner, layer, head]
                return (x, *a[1:])

            h = lm.attn_out(layer).register_forward_pre_hook(put)
            try:
                with torch.inference_mode():
                    hidden = lm.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    logp = torch.log_softmax(lm.logits(hidden[bi, pi]).float(), -1)
                    picked = logp.gather(1, tok[:, None])[:, 0] * sign
            finally:
                h.remove()
            per_row = torch.zeros(len(rows)).index_add(0, bi, picked)
            out[layer, head] = torch.zeros(len(reqs)).index_add(0, owner, per_row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    loaded = load_recipe("conformity")
    rec = to_artifact(record(lm, loaded.recipe), lm, loaded, {})
    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", "clean"])
    reqs = [Request(p, o) for p, o in zip(dec.prompts["pressure"], dec.options["pressure"])]
    batches = bare_batches(lm, reqs, 16)

    def bare():
        with torch.inference_mode():
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    runs = {
        "bare": bare,
        "atp": lambda: attribute(lm, rec, method="atp"),
        "both": lambda: attribute(lm, rec, method="both"),
        "exact": lambda: attribute(lm, rec, method="exact"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    results = {}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every run alike
        for name, fn in runs.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    clean_heads = rec.tensors["acts/clean/heads"][dec.items]
    t = time.perf_counter()
    naive = naive_exact_heads(lm, reqs, clean_heads)
    times["naive"] = [time.perf_counter() - t]
    exact = results["exact"]
    cached = torch.stack(
        [torch.stack([exact.exact[Component("heads", la, h)] for h in range(lm.n_heads)]) for la in range(lm.n_layers)]
    )
    naive_effect = exact.pressure[None, None, :] - naive
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "model": lm.identity["name"],
                "decisions": len(dec.items),
                "threads": args.threads,
                "repeats": args.repeats,
                "seconds": {k: round(v, 3) for k, v in med.items()},
                "atp_forward_equivalents": round(med["atp"] / med["bare"], 2),
                "both_forward_equivalents": round(med["both"] / med["bare"], 2),
                "naive_over_both": round(med["naive"] / med["both"], 1),
                "naive_over_exact_all": round(med["naive"] / med["exact"], 1),
                "naive_vs_cached_max_abs_diff": float((naive_effect - cached).abs().max()),
                "targets": {"atp_forward_equivalents": "<= 3.2", "naive_over_both": ">= 20"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
