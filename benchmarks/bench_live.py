"""Live episodes: the batched, cached writer against writing one conversation at a time, as a ratio from one run.

    python benchmarks/bench_live.py [--items 8] [--rounds 2] [--repeats 2]

Plays the first ``--items`` items of the built-in ``commons-live`` recipe for
``--rounds`` rounds under the pressure condition, twice over:

- ``writer``: what mechfix does (:class:`mechfix.engine.generation.Writer`): all items
  in one batch, one key/value cache, only new text fed each turn;
- ``one by one``: every generated turn is ``model.generate`` (greedy, cache on)
  on that conversation's full text, one conversation at a time, which is what
  a loop over :func:`transformers.GenerationMixin.generate` would do.

Both must write the same transcripts (checked). Repeats are interleaved and
the median is kept.

Target: one by one / writer >= 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import mechfix.scenario.live  # noqa: E402
from mechfix.engine.generation import Writer  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.scenario.recipe import load_recipe  # noqa: E402


class OneByOne(Writer):
    """The baseline: each row's full text through ``model.generate`` on its own, no cache kept between turns."""

    def generate(self, texts, max_tokens, stop="\n"):
        tok, out = self.lm.tokenizer, []
        for text in texts:
            enc = tok(text, return_tensors="pt").to(self.lm.device)
            with torch.inference_mode():
                ids = self.lm.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id)
            reply = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.append(reply.split(stop)[0] if stop else reply)
        return out


def play(lm, recipe, items: list[int], writer_cls) -> tuple[float, list[str]]:
    mechfix.scenario.live.Writer = writer_cls
    try:
        t0 = time.perf_counter()
        eps = mechfix.scenario.live.run_live(lm, recipe, "pressure", items)
        return time.perf_counter() - t0, [e.text for e in eps]
    finally:
        mechfix.scenario.live.Writer = Writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    recipe = load_recipe("commons-live").recipe
    recipe = recipe.model_copy(update={"rounds": recipe.rounds.model_copy(update={"count": args.rounds})})
    items = list(range(args.items))
    times: dict[str, list[float]] = {"writer": [], "one_by_one": []}
    for _ in range(args.repeats):
        t, fast = play(lm, recipe, items, Writer)
        times["writer"].append(t)
        t, slow = play(lm, recipe, items, OneByOne)
        times["one_by_one"].append(t)
        assert fast == slow, "the batched writer and one-by-one generation wrote different transcripts"
    med = {k: statistics.median(v) for k, v in times.items()}
    turns = args.items * mechfix.scenario.live.generated_turns(recipe, "pressure")
    print(json.dumps({
        "items": args.items, "rounds": args.rounds, "generated_turns": turns,
        "seconds": {k: round(v, 2) for k, v in med.items()},
        "ratio_one_by_one_to_writer": round(med["one_by_one"] / med["writer"], 2),
        "identical_transcripts": True, "threads": args.threads, "device": str(lm.device),
    }, indent=2))


if __name__ == "__main__":
    main()
