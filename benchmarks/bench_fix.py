"""Generation speed with a fix applied against without, as ratios from one run.

    python benchmarks/bench_fix.py FIX [FIX2 ...] [--tokens 64] [--repeats 7]

A FIX is a fix artifact or a LoRA fix's folder.

Greedy generation (``model.generate``, key/value cache on) of ``--tokens`` new
tokens from the conformity recipe's first pressure prompt, with no fix and with
each given fix applied through :func:`mechfix.apply_fix`; runs are interleaved
and repeated, the median is kept. Generation is checked to be unchanged by a
strength-0 copy of each fix (the hooks themselves, doing nothing).

Target: with fix / without <= 1.03.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mechfix.scenario.episodes import render_episode  # noqa: E402
from mechfix.fixes.fix import apply_fix, load_fix  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.scenario.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixes", nargs="+", help="fix artifacts or LoRA fix folders (from mechfix steer)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    fixes = [load_fix(p) for p in args.fixes]
    prompt = render_episode(load_recipe("conformity").recipe, 0, "pressure").text
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)

    def generate(fix=None, strength=None):
        with torch.inference_mode():
            if fix is None:
                return lm.model.generate(**enc, **kw)
            with apply_fix(lm, fix, strength):
                return lm.model.generate(**enc, **kw)

    plain = generate()
    for f in fixes:  # strength 0: the hooks run but change nothing
        assert torch.equal(generate(f, 0.0), plain), "a strength-0 fix changed the generated text"
    times: dict[str, list[float]] = {"none": [], **{p: [] for p in args.fixes}}
    for _ in range(args.repeats):
        for name, fix in [("none", None), *zip(args.fixes, fixes)]:
            t = time.perf_counter()
            generate(fix)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["none"])
    out = {
        "model": lm.identity["name"],
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": args.threads,
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "new_tokens": args.tokens,
        "repeats": args.repeats,
        "without_fix_s": round(base, 4),
        "fixes": {
            p: {
                "kind": f.kind,
                "op": f.op,
                "targets": f.targets,
                "with_fix_s": round(statistics.median(times[p]), 4),
                "ratio": round(statistics.median(times[p]) / base, 4),
            }
            for p, f in zip(args.fixes, fixes)
        },
        "target_ratio": 1.03,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
