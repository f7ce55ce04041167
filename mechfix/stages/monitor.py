"""The pressure monitor: where, in what an agent reads, a gated fix's probe says the pressure comes from.

A gated fix holds a linear probe of the residual stream (:mod:`mechfix.fixes.gate`)
that fires where the target agent is under pressure. Run on its own, the
probe is an early warning. It was fitted at decision positions (the target's
turn opened), so the monitor reads it there: at the decision, and at the
decision as it would have been after each message (the view cut after that
message, with the target's turn opened). Each message is credited with how
much it raised the score over the view before it. All these views run as
batches of a forward pass up to the probe's layer; nothing is generated.

Use it from a running system::

    from mechfix import load_model, load_fix
    from mechfix.stages.monitor import score_conversation
    lm, probe = load_model(), load_fix("conformity.gated.fix.safetensors")
    result = score_conversation(lm, probe, messages, target="Sam")   # OpenAI-format messages
    if result.flagged: ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mechfix.scenario.chat import Style, choose_style, recorded_style, style_mismatch, view_ids
from mechfix.scenario.episodes import FRAME, Episode, render_episode
from mechfix.errors import BadInputError
from mechfix.fixes.fix import Fix
from mechfix.fixes.gate import Gate, layer_acts, prompt_batches
from mechfix.models import LoadedModel
from mechfix.scenario.recipe import Format, Recipe

# The text of a message shown in tables and JSON (the whole message stays in the transcript).
_SHOWN = 80


@dataclass
class TurnScore:
    """The probe after one message of the target agent's view.

    Attributes:
        index: The message's place in the view (0: the first message, the preamble included).
        speaker: Who said it (``<frame>`` for preamble and narration).
        text: The message as laid out in the view (cut to 80 characters).
        score: The probe logit at the decision of the view cut after this message (the target's turn opened there).
        rise: ``score`` minus the same for the view cut before it.
        fires: Whether the probe is above its threshold there: had the target acted now, a gated fix would have acted.
    """

    index: int
    speaker: str
    text: str
    score: float
    rise: float
    fires: bool

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "speaker": self.speaker, "text": self.text, "score": self.score, "rise": self.rise,
                "fires": self.fires}


@dataclass
class ConversationScore:
    """The probe over one conversation, as the target agent sees it.

    Attributes:
        turns: One entry per message before the decision, in order.
        decision: The probe logit at the decision position (the view's last token).
        flagged: Whether the probe fires at the decision.
        threshold: The probe's threshold.
        tokens: Length of the view in tokens.
        fires_tokens: How many of its tokens the probe fires on (where a gated fix would act).
        meta: Where the conversation came from (item, condition), for reports.
    """

    turns: list[TurnScore]
    decision: float
    flagged: bool
    threshold: float
    tokens: int
    fires_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def raisers(self, k: int = 3) -> list[TurnScore]:
        """The ``k`` messages that raised the score most (positive rises only), largest first."""
        return sorted((t for t in self.turns if t.rise > 0), key=lambda t: -t.rise)[:k]

    def as_dict(self) -> dict[str, Any]:
        return {**self.meta, "decision": {"score": self.decision, "fires": self.flagged}, "threshold": self.threshold,
                "tokens": self.tokens, "fires_tokens": self.fires_tokens, "turns": [t.as_dict() for t in self.turns]}


def probe_of(fix: Fix | Gate) -> Gate:
    """The probe of a gated fix (or a gate itself).

    Raises:
        BadInputError: For a fix without a gate.
    """
    gate = fix if isinstance(fix, Gate) else fix.gate
    if gate is None:
        raise BadInputError(
            f"'{getattr(fix, 'path', None) or 'the fix'}' has no probe: it is not a gated fix. Make one with "
            "`mechfix steer ATTR --gate probe` (or `mechfix run RECIPE --gate probe`) and give that to --probe.")
    return gate


def _views(episode: Episode) -> list[str]:
    """The target's view cut after each message, each ending with the target's opened turn (the decision).

    The first view has no message at all (only the opened turn); the last is the whole view.
    """
    *messages, decision = episode.segments
    return ["".join(s.text for s in messages[:k]) + decision.text for k in range(len(messages) + 1)]


def _chat_views(lm: LoadedModel, recipe: Recipe, ep: Episode) -> list[list[int]]:
    """Chat style: the target's chat cut after each turn (none, one, …, all), its reply opened, as token ids."""
    return [view_ids(lm.tokenizer, recipe, ep.turns[:k], ep.agent, ep.values, ep.prompt, ep.extra)
            for k in range(len(ep.turns) + 1)]


def score_episodes(lm: LoadedModel, probe: Fix | Gate, episodes: Sequence[Episode], batch_size: int = 16,
                   on_batch=None, per_message: bool = True, recipe: Recipe | None = None,
                   style: Style | None = None) -> list[ConversationScore]:
    """The probe at the decision of each episode, and at the decision as it would have been after each message.

    The probe was fitted at decision positions (the target's opened turn), so
    it is read there only: view ``k`` is the target's view cut after message
    ``k`` with the target's turn opened, and a message's *rise* is how much
    its view's score exceeds the view before it. All views of all episodes
    run as batches of one forward pass each, up to the probe's layer; the whole
    view's every position is read once more, for where a gated fix would act.

    Args:
        lm: The model the probe was made for.
        probe: A gated fix or its gate.
        episodes: Rendered episodes, each ending at the decision (the target's opened turn).
        batch_size: Sequences per forward pass.
        on_batch: Progress, called with the number of episodes done.
        per_message: Also score the view after each message (False: only the whole view, one sequence
            per episode; ``turns`` is then empty).
        recipe: The recipe the episodes come from (chat style needs its agents and format).
        style: Chat style reads each view as the target's own chat (its turns as messages); default text.
    """
    gate = probe_of(probe)
    chat = style is not None and style.name == "chat"
    if chat and recipe is None:
        raise ValueError("chat style needs the recipe the episodes come from")
    out: list[ConversationScore] = []
    for i in range(0, len(episodes), batch_size):
        chunk = episodes[i: i + batch_size]
        if chat:
            views = [_chat_views(lm, recipe, ep) for ep in chunk]
            full = [vs[-1] for vs in views]
        else:
            views = [[lm.tokenizer(v).input_ids for v in _views(ep)] for ep in chunk]
            full = [lm.tokenizer(ep.text).input_ids for ep in chunk]
        every = gate.logits(layer_acts(lm, [gate.layer], prompt_batches(lm, full, batch_size))[gate.layer]).double()
        every = every.split([len(ids) for ids in full])
        if per_message:
            seqs = [ids for vs in views for ids in vs]
            last = gate.logits(layer_acts(lm, [gate.layer], prompt_batches(lm, seqs, batch_size), last_only=True)[gate.layer])
            cut = list(last.double().split([len(vs) for vs in views]))
        else:
            cut = [None] * len(chunk)
        for ep, scores, tokens in zip(chunk, cut, every):
            said = [(who or FRAME, text) for who, text in ep.turns] if chat else [(g.speaker, g.text) for g in ep.segments[:-1]]
            out.append(_conversation(ep, said, scores, tokens, gate.threshold))
        if on_batch:
            on_batch(len(chunk))
    return out


def _conversation(ep: Episode, said: list[tuple[str, str]], scores: torch.Tensor | None, tokens: torch.Tensor,
                  threshold: float) -> ConversationScore:
    turns: list[TurnScore] = []
    for j, (speaker, text) in enumerate(said if scores is not None else []):
        score = float(scores[j + 1])
        shown = " ".join(text.split())
        turns.append(TurnScore(j, speaker, shown[:_SHOWN] + ("…" if len(shown) > _SHOWN else ""), score,
                               score - float(scores[j]), score > threshold))
    decision = float(scores[-1] if scores is not None else tokens[-1])
    return ConversationScore(turns, decision, decision > threshold, threshold, len(tokens),
                             int((tokens > threshold).sum()), {"item": ep.item, "condition": ep.condition})


def conversation_episode(messages: Sequence[dict[str, Any]], target: str, layout: Format | None = None,
                         prompt: str = "") -> tuple[Episode, Recipe]:
    """The target agent's view of OpenAI-format messages, as a transcript is replayed, and its recipe.

    The messages are read as ``record --transcript`` reads them (speakers, system
    messages, tool calls, texts taken literally) and the view ends with the
    target's turn opened up to ``prompt``, where the agent would decide.

    Raises:
        BadInputError: For malformed messages.
    """
    from mechfix.scenario.transcript import DecisionFile, Edit, Message, transcript_recipe
    from mechfix.scenario.transcript import parse_conversation as parse

    convo = parse(list(messages), "messages")
    # The target's own reply ends the conversation: a transcript's episode is cut just before its target message.
    dec = DecisionFile(target="last", agent=target, prompt=prompt, aligned=" a", misaligned=" b", clean=Edit(),
                       format=layout or Format())
    recipe = transcript_recipe([[*convo, Message(target, "", "assistant")]], dec, "messages", "messages")
    return replace(render_episode(recipe, 0, "pressure"), condition="conversation"), recipe


def score_conversation(lm: LoadedModel, probe: Fix | Gate, messages: Sequence[dict[str, Any]], target: str = "Assistant",
                       layout: Format | None = None, prompt: str = "", per_message: bool = True,
                       style: Style | None = None) -> ConversationScore:
    """Score one conversation (OpenAI-format messages) for a running system, with no generation.

    ``per_message=False`` is the cheapest check: one forward pass of the
    whole view, up to the probe's layer, giving ``flagged`` and ``decision``
    only. By default the view cut after each message is scored too (one
    batched pass more), so that ``raisers`` can say which messages raised it.

    Args:
        lm: The model the probe was made for (loaded once, reused).
        probe: A gated fix (:func:`mechfix.load_fix`) or its gate.
        messages: ``[{"role": ..., "content": ..., "name": ...}, ...]``.
        target: The agent whose view it is (its turn is opened at the end).
        layout: How turns are laid out (default ``{speaker}: {text}``, as recipes and transcripts are).
        prompt: Text the target's turn starts with.
        per_message: Also score the view after each message (see above).
        style: Render as text or as the target's chat (default: as the probe's fix was made; a fix made on chat
            renderings reads the conversation through the tokenizer's own template, or the built-in one it names).

    Returns:
        The probe's score after every message and at the decision; ``flagged`` when it fires there.
    """
    ep, recipe = conversation_episode(messages, target, layout, prompt)
    if style is None:
        style = Style() if isinstance(probe, Gate) else choose_style(lm.tokenizer, recipe, None, None,
                                                                    recorded_style(probe.manifest))
    why = None if isinstance(probe, Gate) else style_mismatch(recorded_style(probe.manifest), style)
    if why:
        raise BadInputError(f"{why}: its probe would read a kind of text it was not fitted on. Give style= the fix's own.")
    return score_episodes(lm, probe, [ep], per_message=per_message, recipe=recipe, style=style)[0]


def by_speaker(scores: Sequence[ConversationScore]) -> dict[str, dict[str, Any]]:
    """Per speaker: messages, mean rise of the probe score, and how often theirs raised it most in a conversation."""
    out: dict[str, dict[str, Any]] = {}
    for conv in scores:
        top = conv.raisers(1)
        for t in conv.turns:
            row = out.setdefault(t.speaker, {"messages": 0, "rise_sum": 0.0, "top_raiser": 0})
            row["messages"] += 1
            row["rise_sum"] += t.rise
        if top:
            out[top[0].speaker]["top_raiser"] += 1
    return {s: {"messages": r["messages"], "mean_rise": r["rise_sum"] / r["messages"], "top_raiser": r["top_raiser"]}
            for s, r in sorted(out.items(), key=lambda kv: -kv[1]["rise_sum"] / kv[1]["messages"])}


def summary(scores: Sequence[ConversationScore]) -> dict[str, Any]:
    """The share flagged at the decision, overall and per condition, and the per-speaker table."""
    conds: dict[str, list[bool]] = {}
    for s in scores:
        conds.setdefault(str(s.meta.get("condition")), []).append(s.flagged)
    return {
        "conversations": len(scores),
        "flagged": sum(s.flagged for s in scores),
        "flagged_rate": sum(s.flagged for s in scores) / len(scores) if scores else None,
        "by_condition": {c: {"conversations": len(v), "flagged": sum(v), "rate": sum(v) / len(v)} for c, v in conds.items()},
        "by_speaker": by_speaker(scores),
    }
