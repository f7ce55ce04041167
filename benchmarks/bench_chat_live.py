"""Live episodes in chat style against text style on the same model, as a ratio from one run.

    python benchmarks/bench_chat_live.py [--items 8] [--rounds 2] [--repeats 2]

Plays the first ``--items`` items of the built-in ``commons-live`` recipe for
``--rounds`` rounds under the pressure condition on the embedded model given
the Gemma chat template, in both styles:

- ``text``: every agent continues the one shared transcript (one cached writer);
- ``chat``: every agent writes from its own chat (its system prompt, its turns
  as assistant, the others' as user), one cached writer per agent
  (:class:`mechfix.scenario.chat.ChatWriters`), so each agent's context differs.

Repeats are interleaved and the median is kept. The embedded model is a base
model that was never trained on the template, so its chat replies say little;
the timing is what this measures.

Target: chat / text <= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mechfix.scenario.chat import Style  # noqa: E402
from mechfix.scenario.live import run_live  # noqa: E402
from mechfix.models import load_model  # noqa: E402
from mechfix.scenario.recipe import load_recipe  # noqa: E402
from mechfix.scenario.templates import resolve_template, use_template  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lm = load_model()
    template = resolve_template("gemma")
    use_template(lm.tokenizer, template)
    recipe = load_recipe("commons-live").recipe
    recipe = recipe.model_copy(update={"rounds": recipe.rounds.model_copy(update={"count": args.rounds})})
    items = list(range(args.items))
    styles = {"text": Style("text"), "chat": Style("chat", template)}
    times: dict[str, list[float]] = {k: [] for k in styles}
    turns: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, style in styles.items():
            t0 = time.perf_counter()
            eps = run_live(lm, recipe, "pressure", items, style=style)
            times[name].append(time.perf_counter() - t0)
            turns[name] = sum(len(e.turns) for e in eps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"items": args.items, "rounds": args.rounds, "repeats": args.repeats, "turns": turns,
                      "seconds": med, "chat_over_text": med["chat"] / med["text"]}, indent=1))


if __name__ == "__main__":
    main()
