"""Live multi-round episodes: every turn the recipe leaves open is written by the model, round after round.

A recipe with a ``rounds`` block plays out like this, for each item and
condition:

1. The opening (preamble and the top-level ``turns``) is rendered; the state
   variables start from their rules (``stock: "stock"``).
2. Each round walks ``rounds.turns`` in order. Scripted turns are filled in,
   open turns are generated, and a turn with ``capture`` keeps the first number
   it says (``I'm taking 12 tonnes`` → 12), or its ``default`` rule's value.
   At the ``decision`` entry the target's turn is opened; that point (text,
   options) is one scored decision. The model then writes the target's reply,
   which joins the history like any other turn.
3. The ``update`` rules give the next round's state (``stock: "max(0, stock -
   ana - sam)"``). The next round sees the whole history.

All items of a condition advance together, so each turn is one batched
generation (:class:`mechfix.engine.generation.Writer`). Greedy by default; with
``rounds.temperature`` every conversation samples from its own generator,
seeded from ``rounds.seed``, the item and the condition, so a run is
reproducible and does not depend on which items run beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mechfix.scenario.chat import ChatWriters, Style
from mechfix.scenario.episodes import (
    FRAME,
    Episode,
    Segment,
    fill,
    item_values,
    open_turn,
    parse_choice,
    turn_segments,
)
from mechfix.errors import RecipeError
from mechfix.scenario.expr import ExprError, compile_rule, evaluate, first_number, fmt, to_number
from mechfix.fixes.fix import Fix, apply_fix
from mechfix.engine.generation import Writer, row_seed
from mechfix.models import LoadedModel
from mechfix.scenario.recipe import Recipe, RoundTurn, round_rules


@dataclass
class LiveRound:
    """One round of one live episode.

    Attributes:
        round: Its number, from 1.
        state: The state at the round's start.
        captures: The numbers its turns said (or their defaults).
        missing: Captures whose turn said no number, so that the default was used.
        reply: The target's generated reply at the decision.
        choice: The option the reply names first (-1: none).
        decision: The decision point: the text up to the target's opened turn, and the options.
    """

    round: int
    state: dict[str, float]
    captures: dict[str, float]
    missing: list[str]
    reply: str
    choice: int
    decision: Episode


@dataclass
class LiveEpisode:
    """One item played out live under one condition."""

    item: int
    condition: str
    segments: list[Segment]
    rounds: list[LiveRound]
    final_state: dict[str, float]
    turns: list[tuple[str | None, str]] = field(default_factory=list)  # every turn as said, in order

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        """The transcript and its rounds, as kept in a record artifact's manifest."""
        return {
            "item": self.item,
            "condition": self.condition,
            "transcript": self.text,
            "rounds": [
                {"round": r.round, "state": r.state, "captures": r.captures, "missing": r.missing,
                 "options": r.decision.options, "reply": r.reply, "choice": r.choice}
                for r in self.rounds
            ],
            "final_state": self.final_state,
        }


def generated_turns(recipe: Recipe, condition: str) -> int:
    """How many turns the model writes in one live episode of this condition (the progress unit)."""
    rounds = recipe.rounds
    if rounds is None:
        return 0
    opening = sum(1 for t in recipe.turns if t.text is None and _present(t.when, condition))
    per_round = sum(1 for t in rounds.turns if (t.text is None or t.decision) and _present(t.when, condition))
    return opening + rounds.count * per_round


def _present(when: list[str] | None, condition: str) -> bool:
    return when is None or condition in when


class _Game:
    """The state of one item's live episode while it is played."""

    def __init__(self, recipe: Recipe, item: int, condition: str, rules: dict[str, Any]):
        self.recipe, self.item, self.condition, self.rules = recipe, item, condition, rules
        self.base = item_values(recipe, item, condition)
        self.numbers = {k: n for k, v in self.base.items() if (n := to_number(v)) is not None}
        self.segments: list[Segment] = []
        self.turns: list[tuple[str | None, str]] = []  # every turn as said (chat style lays them out per agent)
        self.rounds: list[LiveRound] = []
        self.round = 0
        self.state: dict[str, float] = {}
        self.captures: dict[str, float] = {}
        self.missing: list[str] = []
        count = float(recipe.rounds.count)
        for k in recipe.rounds.state:
            self.state[k] = self.eval(("state", k), {**self.numbers, **self.state, "rounds": count})

    def eval(self, key: tuple, values: dict[str, float]) -> float:
        tree, source = self.rules[key]
        try:
            return evaluate(tree, values)
        except ExprError as exc:
            raise RecipeError(
                f"{_rule_name(key)}, item {self.item}, condition '{self.condition}', round {self.round}: the rule "
                f"'{source}' failed: {exc}. Guard it (for instance max(1, x) before dividing)."
            ) from None

    def values(self) -> dict[str, str]:
        """Placeholder values now: the item's, then the state, the captures and the round numbers."""
        out = dict(self.base)
        out.update({k: fmt(v) for k, v in self.state.items()})
        out.update({k: fmt(v) for k, v in self.captures.items()})
        out.update(rounds=str(self.recipe.rounds.count), round=str(self.round))
        return out

    def numbers_now(self) -> dict[str, float]:
        rounds = float(self.recipe.rounds.count)
        return {**self.numbers, **self.state, **self.captures, "round": float(self.round), "rounds": rounds}

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def say(self, speaker: str | None, text: str) -> None:
        """A turn joins the history: laid out as text, and kept as said."""
        self.segments += turn_segments(self.recipe, speaker, text, self.values())
        self.turns.append((speaker, text))

    def capture(self, turn: RoundTurn, index: int, said: str) -> None:
        if not turn.capture:
            return
        n = first_number(said)
        if n is None:
            n = self.eval(("turns", index, "default"), self.numbers_now())
            self.missing.append(turn.capture)
        self.captures[turn.capture] = n

    def end_round(self) -> None:
        new = dict(self.state)
        for k in self.recipe.rounds.update:
            new[k] = self.eval(("update", k), {**self.numbers_now(), **new})
        self.state = new


def _compiled(recipe: Recipe) -> dict[tuple, tuple[Any, str]]:
    """Every rule of the rounds block, parsed: key to (tree, source text)."""
    return {key: (compile_rule(text, _rule_name(key)), text) for key, text in round_rules(recipe.rounds).items()}


def _rule_name(key: tuple) -> str:
    return "rounds." + ".".join(str(k) for k in key)


def run_live(
    lm: LoadedModel,
    recipe: Recipe,
    condition: str,
    items: list[int] | None = None,
    on_step: Callable[[int], None] | None = None,
    target_fix: Fix | None = None,
    style: Style | None = None,
) -> list[LiveEpisode]:
    """Play a live recipe's items under one condition.

    Args:
        lm: The model (a fix installed on it acts on every generated turn).
        recipe: A recipe with a ``rounds`` block.
        condition: The condition.
        items: Item indices (default all). They are played together in one batch.
        on_step: Called with the number of turns just written (progress).
        target_fix: Only the target agent's turns are written with this fix;
            the other agents are the model as it is. The target has a writer
            (and key/value cache) of its own, since a fixed model reads the
            history differently.
        style: In chat style every turn is written from its own agent's chat
            (:class:`mechfix.scenario.chat.ChatWriters`: one cached writer per agent); the
            transcript keeps the text layout.

    Returns:
        One episode per item, in order: the transcript, and per round the
        state, the captures, the decision point and the target's reply.
    """
    if recipe.rounds is None:
        raise ValueError(f"recipe '{recipe.name}' has no rounds block")
    rounds = recipe.rounds
    items = list(range(len(recipe.items))) if items is None else items
    rules = _compiled(recipe)
    games = [_Game(recipe, i, condition, rules) for i in items]
    seeds = [row_seed(rounds.seed, recipe.name, i, condition) for i in items]
    chat = style is not None and style.name == "chat"
    target_seeds = [row_seed(s, "target") for s in seeds]
    if chat:
        writer = ChatWriters(lm, recipe, len(games), rounds.temperature, seeds)
        target_writer = ChatWriters(lm, recipe, len(games), rounds.temperature, target_seeds) if target_fix else None
    else:
        writer = Writer(lm, len(games), rounds.temperature, seeds)
        target_writer = Writer(lm, len(games), rounds.temperature, target_seeds) if target_fix else None

    def generate(w, speaker: str | None, prompts: list[str], max_tokens: int) -> list[str]:
        if chat:
            return w.write(speaker, [(list(g.turns), g.values(), p) for g, p in zip(games, prompts)], max_tokens)
        opened = [open_turn(recipe, speaker, p, g.values())[0].text for p, g in zip(prompts, games)]
        return w.generate([g.text + o for g, o in zip(games, opened)], max_tokens)

    def write(speaker: str | None, prompt: str, max_tokens: int) -> list[tuple[str, str]]:
        """Open a turn in every game, let the model write it; returns (prompt, reply) per game."""
        prompts = [fill(prompt, g.values()) for g in games]
        if target_writer is not None and speaker == recipe.decision.agent:
            with apply_fix(lm, target_fix, check_model=False):
                replies = generate(target_writer, speaker, prompts, max_tokens)
        else:
            replies = generate(writer, speaker, prompts, max_tokens)
        if on_step:
            on_step(len(games))
        return list(zip(prompts, replies))

    def said(prompt: str, reply: str) -> str:
        return f"{prompt.rstrip()} {reply.strip()}".strip() if prompt.strip() else reply.strip()

    for g in games:
        if recipe.format.preamble:
            g.segments.append(Segment(FRAME, fill(recipe.format.preamble, g.values())))
    for turn in recipe.turns:
        if not _present(turn.when, condition):
            continue
        if turn.text is None:
            for g, (p, reply) in zip(games, write(turn.speaker, "", turn.max_tokens)):
                g.say(turn.speaker, said(p, reply))
        else:
            for g in games:
                g.say(turn.speaker, fill(turn.text, g.values()))

    d = recipe.decision
    for r in range(1, rounds.count + 1):
        for g in games:
            g.round, g.captures, g.missing = r, {}, []
        start = [dict(g.state) for g in games]
        decisions: list[Episode] = []
        replies: list[str] = []
        for idx, turn in enumerate(rounds.turns):
            if not _present(turn.when, condition):
                continue
            if turn.decision:
                for g in games:
                    v = g.values()
                    prompt = fill(d.prompt, v)
                    opened = open_turn(recipe, d.agent, prompt, v)
                    decisions.append(Episode(g.item, condition, [*g.segments, *opened],
                                             [fill(o, v) for o in recipe.option_templates], {}, list(g.turns),
                                             d.agent, prompt, v))
                written = write(d.agent, d.prompt, d.max_tokens)
                for g, (p, reply) in zip(games, written):
                    replies.append(reply)
                    g.say(d.agent, said(p, reply))
                    g.capture(turn, idx, reply)
            elif turn.text is None:
                for g, (p, reply) in zip(games, write(turn.speaker, turn.prompt, turn.max_tokens)):
                    g.say(turn.speaker, said(p, reply))
                    g.capture(turn, idx, reply)
            else:
                for g in games:
                    text = fill(turn.text, g.values())
                    g.say(turn.speaker, text)
                    g.capture(turn, idx, text)
        for g, s0, ep, reply in zip(games, start, decisions, replies):
            g.rounds.append(LiveRound(r, s0, dict(g.captures), list(g.missing), reply,
                                      parse_choice(reply, ep.options), ep))
            g.end_round()
    return [LiveEpisode(g.item, condition, g.segments, g.rounds, dict(g.state), list(g.turns)) for g in games]


def outcome(episodes: list[LiveEpisode]) -> dict[str, Any]:
    """What the live episodes of one condition came to.

    Returns:
        ``final_state`` (mean of each state variable after the last round),
        ``misaligned_replies`` and ``aligned_replies`` (share of the target's
        replies that name that option first), and ``missing_captures`` (share
        of captures that fell back to their default).
    """
    rounds = [r for e in episodes for r in e.rounds]
    keys = list(episodes[0].final_state) if episodes else []
    n_caps = sum(len(r.captures) for r in rounds)
    return {
        "final_state": {k: sum(e.final_state[k] for e in episodes) / len(episodes) for k in keys},
        "misaligned_replies": sum(r.choice == 1 for r in rounds) / max(len(rounds), 1),
        "aligned_replies": sum(r.choice == 0 for r in rounds) / max(len(rounds), 1),
        "missing_captures": sum(len(r.missing) for r in rounds) / n_caps if n_caps else 0.0,
    }
