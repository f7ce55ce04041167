"""The record stage: render every item under every condition, score the options, capture activations.

``record`` is a pure function over in-memory objects; ``to_artifact`` packs
its result into an artifact that the CLI saves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechfix.artifacts import Artifact, new_manifest
from mechfix.scenario.chat import ChatWriters, Style, chat_episode
from mechfix.scenario.episodes import (
    Episode,
    Tokenized,
    option_ids,
    parse_choice,
    pending_turn,
    render_episode,
    speaker_list,
    tokenize_episode,
)
from mechfix.engine.actstore import ActStore, default_act_dtype
from mechfix.engine.batches import Request, SITES
from mechfix.engine.forward import run_requests
from mechfix.engine.generation import generate_reply
from mechfix.scenario.live import LiveEpisode, generated_turns, outcome, run_live
from mechfix.models import LoadedModel
from mechfix.scenario.recipe import LoadedRecipe, Recipe
from mechfix.measure.stats import behaviour_summary

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
        episodes: Per condition, one rendered decision point per decision (an item, or an item's round).
        tokens: Per condition, token ids and speakers per decision.
        scores: Per condition, ``[N, K]`` summed option log-probabilities.
        acts: Per condition, site name to activations (``[N, L, ...]``, or
            ``[N, T, L, ...]`` padded with zeros when all positions were kept).
        split: ``[N]``, 0 for the training split, 1 for held out (a live item's rounds share its split).
        replies: Generate mode and live recipes: per condition, the target's generated reply per decision.
        choices: Generate mode and live recipes: per condition, the option parsed from each reply (-1: none).
        rows: ``(item, round)`` of every decision (round 0 without rounds).
        live: Live recipes: per condition, every item's whole episode.
        style: How the episodes were rendered (text layout, or a chat template).
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
    rows: list[tuple[int, int]] | None = None
    live: dict[str, list[LiveEpisode]] | None = None
    style: Style = Style()


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


def write_reply(lm: LoadedModel, recipe: Recipe, ep: Episode, max_tokens: int, style: Style | None = None) -> str:
    """The model's reply at an episode's opened turn: after its text, or in chat style after its agent's chat."""
    if style is not None and style.name == "chat":
        return ChatWriters(lm, recipe, 1).write(ep.agent, [(ep.turns, ep.values, ep.prompt)], max_tokens)[0]
    return generate_reply(lm, ep.text, max_tokens)


def _render_all(
    lm: LoadedModel, recipe: Recipe, items: list[int], on_step: Callable[[int], None] | None, style: Style | None = None
) -> dict[str, list[Episode]]:
    """Render the given items' episodes; in generate mode let the model write the unscripted turns."""
    episodes: dict[str, list[Episode]] = {c: [] for c in recipe.condition_names}
    for c in recipe.condition_names:
        for i in items:
            ep = render_episode(recipe, i, c)
            while (t := pending_turn(recipe, ep)) is not None:
                reply = write_reply(lm, recipe, ep, recipe.turns[t].max_tokens, style)
                ep = render_episode(recipe, i, c, {**ep.generated, t: reply.strip()})
            episodes[c].append(ep)
            if on_step:
                on_step(1)
    return episodes


@dataclass
class Rendered:
    """The decisions of a recipe, rendered and ready to score.

    Attributes:
        rows: ``(item, round)`` of every decision; round 0 for a recipe without
            rounds (one decision per item), 1.. for a live recipe's rounds.
        episodes: Per condition, the decision point of every row.
        tokens: Per condition, token ids and speakers of every row.
        requests: Per condition, the scoring request of every row.
        live: A live recipe only: per condition, every item's whole episode.
    """

    rows: list[tuple[int, int]]
    episodes: dict[str, list[Episode]]
    tokens: dict[str, list[Tokenized]]
    requests: dict[str, list[Request]]
    live: dict[str, list[LiveEpisode]] | None = None

    @property
    def groups(self) -> list[int] | None:
        """A live recipe's item of every row (its rounds are resampled together in bootstrap intervals); else None."""
        return [item for item, _ in self.rows] if self.live is not None else None


def generation_steps(recipe: Recipe, items: int) -> int:
    """How many turns rendering writes (the progress total); 0 when nothing is generated."""
    if recipe.rounds is not None:
        # A live recipe always plays every item (see decision_requests).
        return len(recipe.items) * sum(generated_turns(recipe, c) for c in recipe.condition_names)
    return items * len(recipe.condition_names) if recipe.mode == "generate" else 0


def decision_requests(
    lm: LoadedModel,
    recipe: Recipe,
    items: list[int] | None = None,
    on_step: Callable[[int], None] | None = None,
    style: Style | None = None,
) -> Rendered:
    """Render, tokenize and turn into scoring requests the given items (default all), per condition.

    A live recipe is played for all its items, whichever are asked for, so the
    held-out decisions verify scores are the very ones record made (a batch's
    composition can change the last bits of a generated token's logits); only
    the rows of the asked items are returned. In chat style (``style``), each
    decision is rendered through the tokenizer's chat template as its agent saw
    it (:mod:`mechfix.scenario.chat`).

    Every generated turn is written from its own agent's point of view: in chat
    style, its own chat (:class:`mechfix.scenario.chat.ChatWriters`).
    """
    items = list(range(len(recipe.items))) if items is None else items
    speakers = speaker_list(recipe)
    chat = style is not None and style.name == "chat"
    live = None
    if recipe.rounds is not None:
        live = {c: run_live(lm, recipe, c, None, on_step, style=style) for c in recipe.condition_names}
        rows = [(i, r.round) for i in items for r in live[recipe.condition_names[0]][i].rounds]
        episodes = {c: [eps[i].rounds[r - 1].decision for i, r in rows] for c, eps in live.items()}
    else:
        rows = [(i, 0) for i in items]
        episodes = _render_all(lm, recipe, items, on_step if recipe.mode == "generate" else None, style)
    if chat:
        done = {c: [chat_episode(lm.tokenizer, recipe, ep, speakers) for ep in eps] for c, eps in episodes.items()}
        episodes = {c: [ep for ep, _ in pairs] for c, pairs in done.items()}
        tokens = {c: [tk for _, tk in pairs] for c, pairs in done.items()}
    else:
        tokens = {c: [tokenize_episode(lm.tokenizer, ep, speakers) for ep in eps] for c, eps in episodes.items()}
    requests = {
        c: [Request(prompt=tk.ids, options=[option_ids(lm.tokenizer, o) for o in ep.options]) for ep, tk in zip(episodes[c], tokens[c])]
        for c in episodes
    }
    return Rendered(rows, episodes, tokens, requests, live)


def record(
    lm: LoadedModel,
    recipe: Recipe,
    *,
    batch_size: int = 16,
    all_positions: bool = False,
    sites: tuple[str, ...] = SITES,
    on_progress: Callable[[str, int, int], None] | None = None,
    style: Style | None = None,
    act_dtype: torch.dtype | None = None,
    act_dir: str | Path | None = None,
) -> Recording:
    """Run the record stage.

    Args:
        lm: The model.
        recipe: A validated recipe.
        batch_size: Sequences per forward pass.
        all_positions: Keep activations at every prompt position, not only the decision position.
        sites: Activation sites to keep.
        on_progress: Called as ``(phase, advance, total)`` for progress display.
        style: Render in chat style through the tokenizer's template (default: the text layout).
        act_dtype: The dtype activations are kept in (default: float16 on a GPU, float32 elsewhere).
        act_dir: With ``all_positions``: the folder whose disk holds the activations while
            they are recorded (streamed there, not held in memory; default: the temp folder).

    Returns:
        The recording (scores, activations, tokens, transcripts, split).
    """
    conditions = recipe.condition_names
    speakers = speaker_list(recipe)

    def step(phase: str, total: int) -> Callable[[int], None] | None:
        return (lambda k: on_progress(phase, k, total)) if on_progress else None

    style = style or Style()
    rendered = decision_requests(lm, recipe, None, step("generating turns", generation_steps(recipe, len(recipe.items))), style)
    episodes, tokens, by_condition = rendered.episodes, rendered.tokens, rendered.requests
    n = len(rendered.rows)
    dtype = act_dtype or default_act_dtype(lm)
    store = None
    if all_positions and sites:
        # Every position of every decision: streamed to disk-backed tensors as each batch finishes.
        widths = {c: max(len(r.prompt) for r in by_condition[c]) for c in conditions}
        store = ActStore(lm, conditions, n, widths, sites, dtype, act_dir)
    results = run_requests(
        lm,
        [r for c in conditions for r in by_condition[c]],
        batch_size=batch_size,
        sites=sites,
        all_positions=all_positions,
        on_batch=step("scoring", n * len(conditions)),
        on_acts=store.put if store else None,
    )
    scores: dict[str, torch.Tensor] = {}
    acts: dict[str, dict[str, torch.Tensor]] = {}
    for j, c in enumerate(conditions):
        chunk = results[j * n : (j + 1) * n]
        scores[c] = torch.stack([r.scores for r in chunk])
        acts[c] = store.tensors[c] if store else {s: _stack_padded([r.acts[s] for r in chunk]).to(dtype) for s in sites}
    replies = choices = None
    if rendered.live is not None:
        # The target's replies were written while the episodes were played.
        rounds = {c: {(e.item, r.round): r for e in eps for r in e.rounds} for c, eps in rendered.live.items()}
        replies = {c: [rounds[c][row].reply for row in rendered.rows] for c in conditions}
        choices = {c: [rounds[c][row].choice for row in rendered.rows] for c in conditions}
    elif recipe.mode == "generate":
        replies, choices = {}, {}
        gen_step = step("generating decisions", n * len(conditions))
        for c in conditions:
            replies[c], choices[c] = [], []
            for ep in episodes[c]:
                reply = write_reply(lm, recipe, ep, recipe.decision.max_tokens, style)
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
        split=split_items(len(recipe.items), recipe.split.heldout, recipe.split.seed)[[i for i, _ in rendered.rows]],
        all_positions=all_positions,
        replies=replies,
        choices=choices,
        rows=rendered.rows,
        live=rendered.live,
        style=style,
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
    """Behaviour summary of a recording (see :func:`mechfix.measure.stats.behaviour_summary`), plus split sizes.

    A live recording adds ``rounds``, ``by_round`` (the summary of each
    round's decisions alone) and ``outcome`` (per condition, what the episodes
    came to: see :func:`mechfix.scenario.live.outcome`); its intervals resample whole
    episodes, since an episode's rounds are not independent.
    """
    seed = rec.recipe.split.seed
    groups = [i for i, _ in rec.rows] if rec.live is not None and rec.rows else None
    out = behaviour_summary(rec.scores, seed=seed, groups=groups)
    out["items"] = len(rec.recipe.items)
    out["decisions_per_condition"] = len(rec.split)
    out["train"] = int((rec.split == 0).sum())
    out["heldout"] = int((rec.split == 1).sum())
    if rec.live is not None and rec.rows:
        rounds = sorted({r for _, r in rec.rows})
        out["rounds"] = len(rounds)
        out["by_round"] = []
        for r in rounds:
            at = [j for j, (_, rr) in enumerate(rec.rows) if rr == r]
            s = behaviour_summary({c: v[at] for c, v in rec.scores.items()}, seed=seed)
            out["by_round"].append({"round": r, **{k: s[k] for k in ("effect", "rate", "control_effect", "per_condition")}})
        out["outcome"] = {c: outcome(eps) for c, eps in rec.live.items()}
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


def _live_manifest(rec: Recording) -> dict[str, Any]:
    rounds = rec.recipe.rounds
    return {
        "rounds": rounds.count,
        "temperature": rounds.temperature,
        "seed": rounds.seed,
        "episodes": {c: [e.to_json() for e in eps] for c, eps in rec.live.items()},
    }


def _pad_int(rows: list[list[int]], fill: int, dtype: torch.dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def to_artifact(rec: Recording, lm: LoadedModel, loaded: LoadedRecipe, params: dict[str, Any]) -> Artifact:
    """Pack a recording into a ``record`` artifact.

    Tensor names: ``tokens/C``, ``speakers/C`` (padded with -1), ``lengths/C``,
    ``scores/C`` ``[N, K]``, ``acts/C/SITE``, ``split``, ``rows`` ``[N, 2]``
    (item, round) and, in generate mode or for a live recipe, ``choices/C``;
    C is a condition. A live recording's manifest also keeps every episode
    whole under ``live`` (transcript, per-round state, captures and replies).
    """
    rows = rec.rows if rec.rows is not None else [(i, 0) for i in range(len(rec.split))]
    tensors: dict[str, torch.Tensor] = {"split": rec.split, "rows": torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)}
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
        style=rec.style.as_dict(),
        shape={"layers": lm.n_layers, "heads": lm.n_heads, "head_dim": lm.head_dim, "hidden": lm.hidden},
        summary=summarize(rec),
        **({"replies": rec.replies} if rec.replies is not None else {}),
        **({"live": _live_manifest(rec)} if rec.live is not None else {}),
    )
    return Artifact(kind="record", manifest=manifest, tensors=tensors)
