"""The capability suite: does a fix keep what the model should keep doing?

A fix that removes the pull of other agents can also remove the model's
ability to use what it has just read. The suite measures that directly, as
accuracy on small multiple-choice tasks with and without the fix:

- ``retrieval-prose``: repeat a fact stated earlier in a passage;
- ``retrieval-dialogue``: the same inside a conversation between several speakers;
- ``recall``: common facts;
- ``reasoning``: continue a simple sequence (numbers, days, months).

A task is a JSON Lines file, one item a line::

    {"prompt": "The password is lantern. ... The password is", "answer": " lantern", "distractors": [" pepper", " meadow"]}

Options are continuations of the prompt (mind the leading space). An item is
answered correctly when its answer scores above every distractor. Users add
tasks in the same format (``--capabilities my-task.jsonl``, or a folder of them).

Every task is split in two by item index: steer's budget uses the items whose
index is a multiple of 3, verify the others, so that verify's capability gate
is measured on items steer never chose on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mechfix.scenario.episodes import option_ids
from mechfix.errors import BadInputError
from mechfix.measure.stats import wilson
from mechfix.measure.evaluate import prefixed, score_requests
from mechfix.fixes.fix import Fix
from mechfix.engine.batches import Request
from mechfix.models import LoadedModel
from mechfix.textio import read_text

BUILTIN = "builtin"
PARTS = ("select", "verify")
# A task counts towards the gate only when the model does it better than chance
# without the fix: the lower end of a 95% Wilson interval of its accuracy must
# lie above 1 / (number of options). A fix cannot "keep" a skill the model lacks.
# A task file larger than this is refused before it is parsed.
MAX_TASK_BYTES = 8 * 1024 * 1024


@dataclass
class Task:
    """One capability task as loaded: its name (the file's stem), where it came from, and its items."""

    name: str
    source: str
    items: list[dict[str, Any]]


@dataclass
class Suite:
    """Tasks tokenized for one model and one part (``select`` for steer, ``verify`` for verify)."""

    part: str
    tasks: list[str]
    requests: dict[str, list[Request]]
    chance: dict[str, float]
    sources: dict[str, str]

    @property
    def n_items(self) -> int:
        return sum(len(r) for r in self.requests.values())


def _builtin_files() -> list[tuple[str, str, str]]:
    root = resources.files("mechfix").joinpath("data/capabilities")
    return sorted(
        (entry.name[: -len(".jsonl")], f"builtin:{entry.name}", entry.read_text(encoding="utf-8"))
        for entry in root.iterdir()
        if entry.name.endswith(".jsonl")
    )


def _read_file(path: Path) -> str:
    return read_text(path, "capability task", MAX_TASK_BYTES)


def _parse(name: str, source: str, text: str) -> Task:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}, line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}). Each line is one item: "
                                '{"prompt": ..., "answer": ..., "distractors": [...]}.') from None
        if not isinstance(item, dict):
            raise BadInputError(f"{where}: an item is a JSON object with prompt, answer and distractors.")
        missing = [k for k in ("prompt", "answer", "distractors") if k not in item]
        if missing:
            raise BadInputError(f"{where}: the item has no {', '.join(missing)}. Each item needs prompt, answer and distractors.")
        opts = [item["answer"], *item["distractors"]] if isinstance(item["distractors"], list) else None
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise BadInputError(f"{where}: prompt must be non-empty text.")
        if opts is None or len(opts) < 2 or not all(isinstance(o, str) and o.strip() for o in opts):
            raise BadInputError(f"{where}: answer must be text and distractors a list of at least one text, none empty.")
        if len(set(opts)) != len(opts):
            raise BadInputError(f"{where}: the answer and distractors must all differ.")
        items.append({"prompt": item["prompt"], "answer": item["answer"], "distractors": list(item["distractors"])})
    if len(items) < 3:
        raise BadInputError(f"capability task '{source}' has {len(items)} items; a task needs at least 3 "
                            "(steer measures every third item, verify the rest).")
    return Task(name=name, source=source, items=items)


def load_tasks(specs: Sequence[str] | None = None) -> list[Task]:
    """Load capability tasks.

    Args:
        specs: ``builtin`` (the shipped suite), JSONL files, or folders of them;
            default the shipped suite.

    Raises:
        BadInputError: For a missing path, a malformed file, or two tasks of the same name.
    """
    tasks: list[Task] = []
    for spec in specs or [BUILTIN]:
        if spec == BUILTIN:
            tasks += [_parse(name, source, text) for name, source, text in _builtin_files()]
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise BadInputError(f"--capabilities folder '{path}' holds no .jsonl task files.")
        elif path.is_file():
            files = [path]
        else:
            raise BadInputError(f"--capabilities '{spec}' does not exist. Give a .jsonl task file, a folder of them, or 'builtin'.")
        tasks += [_parse(f.stem, str(f), _read_file(f)) for f in files]
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise BadInputError(f"two capability tasks are named '{t.name}' ({seen[t.name]} and {t.source}); rename one file.")
        seen[t.name] = t.source
    return tasks


def in_part(index: int, part: str) -> bool:
    """Whether item ``index`` of a task belongs to ``part`` (steer's ``select`` or verify's ``verify``)."""
    return (index % 3 == 0) == (part == "select")


def build_suite(lm: LoadedModel, tasks: Sequence[Task], part: str) -> Suite:
    """Tokenize one part of every task for ``lm``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    requests, chance = {}, {}
    for t in tasks:
        reqs = []
        for i, item in enumerate(t.items):
            if not in_part(i, part):
                continue
            prompt = list(lm.tokenizer(item["prompt"]).input_ids)
            options = [option_ids(lm.tokenizer, o) for o in (item["answer"], *item["distractors"])]
            reqs.append(Request(prompt, options))
        requests[t.name] = reqs
        chance[t.name] = float(np.mean([1.0 / len(r.options) for r in reqs]))
    return Suite(part=part, tasks=[t.name for t in tasks], requests=requests, chance=chance,
                 sources={t.name: t.source for t in tasks})


def with_prefix(suite: Suite, prefix: Sequence[int], bos: int | None) -> Suite:
    """The same suite with ``prefix`` in front of every prompt (what an agent carrying an instruction reads)."""
    requests = {name: [Request(prefixed(r.prompt, prefix, bos), r.options) for r in reqs] for name, reqs in suite.requests.items()}
    return Suite(part=suite.part, tasks=list(suite.tasks), requests=requests, chance=dict(suite.chance),
                 sources=dict(suite.sources))


def correct(
    lm: LoadedModel,
    suite: Suite,
    fix: Fix | None = None,
    strength: float | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per task, whether each item is answered correctly (the answer scores above every distractor)."""
    out = {}
    for name in suite.tasks:
        reqs = suite.requests[name]
        # Items of a task may have different numbers of options: score them one group at a time.
        by_k: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            by_k.setdefault(len(r.options), []).append(i)
        right = np.zeros(len(reqs), dtype=bool)
        for idx in by_k.values():
            scores = score_requests(lm, {name: [reqs[i] for i in idx]}, fix, strength, batch_size=batch_size,
                                    on_batch=on_batch)[name]
            right[idx] = (scores.argmax(1) == 0).numpy()
        out[name] = right
    return out


def _kept_ci(before: np.ndarray, after: np.ndarray, seed: int, n_boot: int = 2000) -> list[float]:
    """Bootstrap interval of accuracy(after) / accuracy(before), resampling items in pairs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(before), size=(n_boot, len(before)))
    b, a = before[idx].mean(1), after[idx].mean(1)
    ok = b > 0
    if ok.sum() < n_boot // 2:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(a[ok] / b[ok], [0.025, 0.975])
    return [float(lo), float(hi)]


def summarize(suite: Suite, before: dict[str, np.ndarray], after: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Accuracy with and without the fix per task, and the share of the baseline accuracy kept.

    Returns:
        ``tasks`` (per task: items, chance, accuracy before and after with 95%
        Wilson intervals, ``measurable`` — the model beats chance without the
        fix — and ``kept`` = accuracy after / before with a paired bootstrap
        interval), ``kept`` (the smallest share kept over measurable tasks: the
        gate's value; None when no task is measurable) and ``worst`` (its task).
    """
    tasks = {}
    for name in suite.tasks:
        b, a = before[name], after[name]
        n = len(b)
        acc_b, acc_a = float(b.mean()) if n else float("nan"), float(a.mean()) if n else float("nan")
        ci_b = wilson(int(b.sum()), n)
        measurable = bool(n and ci_b[0] > suite.chance[name])
        tasks[name] = {
            "source": suite.sources[name],
            "items": n,
            "chance": suite.chance[name],
            "before": {"accuracy": acc_b, "ci95": ci_b},
            "after": {"accuracy": acc_a, "ci95": wilson(int(a.sum()), n)},
            "measurable": measurable,
            "kept": acc_a / acc_b if measurable else None,
            "kept_ci95": _kept_ci(b.astype(float), a.astype(float), seed) if measurable else None,
        }
    counted = {k: v["kept"] for k, v in tasks.items() if v["measurable"]}
    worst = min(counted, key=counted.get) if counted else None
    return {"part": suite.part, "tasks": tasks, "kept": counted[worst] if worst else None, "worst": worst}
