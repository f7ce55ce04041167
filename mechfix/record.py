"""The record stage: render every item under every condition, score the options, capture activations.

``record`` is a pure function over in-memory objects; ``to_artifact`` packs
its result into an artifact that the CLI saves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechfix.artifacts import Artifact, new_manifest
from mechfix.episodes import (
    Episode,
    Tokenized,
    option_ids,
    pending_turn,
    render_episode,
    speaker_list,
    tokenize_episode,
)
from mechfix.forward import SITES, Request, generate_reply, run_requests
from mechfix.models import LoadedModel
from mechfix.recipe import LoadedRecipe, Recipe
from mechfix.stats import behaviour_summary

SITE_DOC = {
    "resid": "residual stream: output of decoder layer N",
    "heads": "per-head attention output: input of layer N's attention output projection, split per head",
    "mlp": "output of layer N's MLP",
}
OPTION_NAMES = ("aligned", "misaligned")


@dataclass
class Recording:
    """Everything record measured, in memory.

    Attributes:
        recipe: The resolved recipe.
        conditions: Condition names, in order.
        speakers: Speaker names (``<frame>`` first); token speakers index this.
        episodes: Per condition, one rendered episode per item.
        tokens: Per condition, token ids and speakers per item.
        scores: Per condition, ``[N, K]`` summed option log-probabilities.
        acts: Per condition, site name to activations (``[N, L, ...]``, or
            ``[N, T, L, ...]`` padded with zeros when all positions were kept).
        split: ``[N]``, 0 for the training split, 1 for held out.
        replies: Generate mode only: per condition, the target's generated reply per item.
        choices: Generate mode only: per condition, the option parsed from each reply (-1: none).
    """

    recipe: Recipe
    conditions: list[str]
    speakers: list[str]
    episodes: dict[str, list[Episode]]
    tokens: dict[str, list[Tokenized]]
    scores: dict[str, torch.Tensor]
    acts: dict[str, dict[str, torch.Tensor]]
    split: torch.Tensor
    all_positions: bool = False
    replies: dict[str, list[str]] | None = None
    choices: dict[str, list[int]] | None = None


def split_items(n: int, heldout: float, seed: int) -> torch.Tensor:
    """Assign items to the training (0) or held-out (1) split, reproducibly.

    At least one item lands on each side when there are two or more.
    """
    n_held = int(round(n * heldout))
    if n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    split = torch.zeros(n, dtype=torch.int8)
    split[torch.from_numpy(perm[:n_held].copy())] = 1
    return split


def parse_choice(reply: str, options: list[str]) -> int:
    """Index of the option a free-text reply names first (case-insensitive, whole words); -1 if none."""
    best, best_at = -1, len(reply) + 1
    for k, opt in enumerate(options):
        word = opt.strip()
        if not word:
            continue
        m = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", reply, flags=re.IGNORECASE)
        if m and m.start() < best_at:
            best, best_at = k, m.start()
    return best


def _render_all(
    lm: LoadedModel, recipe: Recipe, items: list[int], on_step: Callable[[int], None] | None
) -> dict[str, list[Episode]]:
    """Render the given items' episodes; in generate mode let the model write the unscripted turns."""
    episodes: dict[str, list[Episode]] = {c: [] for c in recipe.condition_names}
    for c in recipe.condition_names:
        for i in items:
            ep = render_episode(recipe, i, c)
            while (t := pending_turn(recipe, ep)) is not None:
                reply = generate_reply(lm, ep.text, recipe.turns[t].max_tokens)
                ep = render_episode(recipe, i, c, {**ep.generated, t: reply.strip()})
            episodes[c].append(ep)
            if on_step:
                on_step(1)
    return episodes


def decision_requests(
    lm: LoadedModel,
    recipe: Recipe,
    items: list[int] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[Episode]], dict[str, list[Tokenized]], dict[str, list[Request]]]:
    """Render, tokenize and turn into scoring requests the given items (default all), per condition.

    Returns:
        (episodes, tokens, requests), each condition to one entry per item.
    """
    items = list(range(len(recipe.items))) if items is None else items
    speakers = speaker_list(recipe)
    episodes = _render_all(lm, recipe, items, on_step if recipe.mode == "generate" else None)
    tokens = {c: [tokenize_episode(lm.tokenizer, ep, speakers) for ep in eps] for c, eps in episodes.items()}
    requests = {
        c: [Request(prompt=tk.ids, options=[option_ids(lm.tokenizer, o) for o in ep.options]) for ep, tk in zip(episodes[c], tokens[c])]
        for c in episodes
    }
    return episodes, tokens, requests


def record(
    lm: LoadedModel,
    recipe: Recipe,
    *,
    batch_size: int = 16,
    all_positions: bool = False,
    sites: tuple[str, ...] = SITES,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Recording:
    """Run the record stage.

    Args:
        lm: The model.
        recipe: A validated recipe.
        batch_size: Sequences per forward pass.
        all_positions: Keep activations at every prompt position, not only the decision position.
        sites: Activation sites to keep.
        on_progress: Called as ``(phase, advance, total)`` for progress display.

    Returns:
        The recording (scores, activations, tokens, transcripts, split).
    """
    conditions = recipe.condition_names
    n = len(recipe.items)
    speakers = speaker_list(recipe)

    def step(phase: str, total: int) -> Callable[[int], None] | None:
        return (lambda k: on_progress(phase, k, total)) if on_progress else None

    episodes, tokens, by_condition = decision_requests(lm, recipe, None, step("generating turns", n * len(conditions)))
    results = run_requests(
        lm,
        [r for c in conditions for r in by_condition[c]],
        batch_size=batch_size,
        sites=sites,
        all_positions=all_positions,
        on_batch=step("scoring", n * len(conditions)),
    )
    scores: dict[str, torch.Tensor] = {}
    acts: dict[str, dict[str, torch.Tensor]] = {}
    for j, c in enumerate(conditions):
        chunk = results[j * n : (j + 1) * n]
        scores[c] = torch.stack([r.scores for r in chunk])
        acts[c] = {s: _stack_padded([r.acts[s] for r in chunk]) for s in sites}
    replies = choices = None
    if recipe.mode == "generate":
        replies, choices = {}, {}
        gen_step = step("generating decisions", n * len(conditions))
        for c in conditions:
            replies[c], choices[c] = [], []
            for ep in episodes[c]:
                reply = generate_reply(lm, ep.text, recipe.decision.max_tokens)
                replies[c].append(reply)
                choices[c].append(parse_choice(reply, ep.options))
                if gen_step:
                    gen_step(1)
    return Recording(
        recipe=recipe,
        conditions=conditions,
        speakers=speakers,
        episodes=episodes,
        tokens=tokens,
        scores=scores,
        acts=acts,
        split=split_items(n, recipe.split.heldout, recipe.split.seed),
        all_positions=all_positions,
        replies=replies,
        choices=choices,
    )


def _stack_padded(xs: list[torch.Tensor]) -> torch.Tensor:
    """Stack tensors whose first dimension may differ, padding it with zeros."""
    if all(x.shape == xs[0].shape for x in xs):
        return torch.stack(xs)
    width = max(x.shape[0] for x in xs)
    out = torch.zeros((len(xs), width, *xs[0].shape[1:]), dtype=xs[0].dtype)
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
    return out


def summarize(rec: Recording) -> dict[str, Any]:
    """Behaviour summary of a recording (see :func:`mechfix.stats.behaviour_summary`), plus split sizes."""
    out = behaviour_summary(rec.scores, seed=rec.recipe.split.seed)
    out["items"] = len(rec.recipe.items)
    out["train"] = int((rec.split == 0).sum())
    out["heldout"] = int((rec.split == 1).sum())
    if rec.choices is not None:
        out["generated_choices"] = {
            c: {
                "misaligned": sum(1 for x in v if x == 1) / len(v),
                "aligned": sum(1 for x in v if x == 0) / len(v),
                "unparsed": sum(1 for x in v if x == -1) / len(v),
            }
            for c, v in rec.choices.items()
        }
    return out


def _pad_int(rows: list[list[int]], fill: int, dtype: torch.dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def to_artifact(rec: Recording, lm: LoadedModel, loaded: LoadedRecipe, params: dict[str, Any]) -> Artifact:
    """Pack a recording into a ``record`` artifact.

    Tensor names: ``tokens/C``, ``speakers/C`` (padded with -1), ``lengths/C``,
    ``scores/C`` ``[N, K]``, ``acts/C/SITE``, ``split``, and in generate mode
    ``choices/C``; C is a condition.
    """
    tensors: dict[str, torch.Tensor] = {"split": rec.split}
    for c in rec.conditions:
        tensors[f"tokens/{c}"] = _pad_int([t.ids for t in rec.tokens[c]], -1, torch.int32)
        tensors[f"speakers/{c}"] = _pad_int([t.speakers for t in rec.tokens[c]], -1, torch.int16)
        tensors[f"lengths/{c}"] = torch.tensor([len(t.ids) for t in rec.tokens[c]], dtype=torch.int32)
        tensors[f"scores/{c}"] = rec.scores[c].float()
        for site, a in rec.acts[c].items():
            tensors[f"acts/{c}/{site}"] = a
        if rec.choices is not None:
            tensors[f"choices/{c}"] = torch.tensor(rec.choices[c], dtype=torch.int8)
    n_opts = len(rec.recipe.option_templates)
    manifest = new_manifest(
        "record",
        model=lm.identity,
        recipe=rec.recipe.model_dump(mode="json"),
        inputs={"recipe": {"path": loaded.path, "sha256": loaded.sha256}},
        params=params,
        seed=rec.recipe.split.seed,
        conditions=rec.conditions,
        speakers=rec.speakers,
        options=[*OPTION_NAMES, *(f"other{k}" for k in range(1, n_opts - 1))],
        option_texts={c: [ep.options for ep in rec.episodes[c]] for c in rec.conditions},
        transcripts={c: [ep.text for ep in rec.episodes[c]] for c in rec.conditions},
        sites={s: SITE_DOC[s] for s in rec.acts[rec.conditions[0]]},
        positions="all" if rec.all_positions else "decision",
        shape={"layers": lm.n_layers, "heads": lm.n_heads, "head_dim": lm.head_dim, "hidden": lm.hidden},
        summary=summarize(rec),
        **({"replies": rec.replies} if rec.replies is not None else {}),
    )
    return Artifact(kind="record", manifest=manifest, tensors=tensors)
