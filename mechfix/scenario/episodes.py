"""Render a recipe's items into episodes, and tokenize them with a speaker per token.

An episode is a list of text segments, each spoken by an agent or by the
frame (preamble and narration). It ends with the target agent's turn opened
up to the decision prompt; the options are the continuations that are scored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mechfix.errors import BadInputError
from mechfix.scenario.recipe import Recipe
from mechfix.textio import MAX_RENDER_CHARS

FRAME = "<frame>"  # speaker of text that no agent says: preamble, narration, layout
# What fill reads in a template: a doubled brace (a literal one) or a {name} placeholder.
_TOKENS = re.compile(r"\{\{|\}\}|\{(\w+)\}")
_BRACE = {"{{": "{", "}}": "}"}


@dataclass(frozen=True)
class Segment:
    speaker: str  # an agent name or FRAME
    text: str


@dataclass
class Episode:
    """One item rendered under one condition.

    Attributes:
        item: Index of the item in the recipe.
        condition: Condition name.
        segments: The text up to and including the decision prompt.
        options: Rendered option texts: aligned, misaligned, others.
        generated: Texts of the turns the model wrote so far (generate mode), by turn index.
        turns: Every turn as said, before any layout: ``(speaker, text)``, speaker None for narration
            (chat style lays these out through a chat template instead).
        agent: Whose turn is opened at the end (the decision's agent).
        prompt: The text the opened turn starts with (the decision prompt).
        values: The item's placeholder values under the condition.
        extra: Chat style: more fields of some turns' messages (tool calls), by index into ``turns``.
    """

    item: int
    condition: str
    segments: list[Segment]
    options: list[str]
    generated: dict[int, str] = field(default_factory=dict)
    turns: list[tuple[str | None, str]] = field(default_factory=list)
    agent: str = ""
    prompt: str = ""
    values: dict[str, str] = field(default_factory=dict)
    extra: dict[int, dict] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders; ``{{`` and ``}}`` stand for literal braces.

    Only plain names are substituted (no attribute access, no format specs), so
    a recipe can never run code.
    """
    # A template that repeats a placeholder multiplies its value: the size is known before anything is made.
    size = len(template) + sum(len(values.get(m.group(1), "")) for m in _TOKENS.finditer(template) if m.group(1))
    if size > MAX_RENDER_CHARS:
        raise BadInputError(
            f"a recipe text renders to {size:,} characters, over mechfix's limit of {MAX_RENDER_CHARS:,} for one "
            "rendering (its placeholders repeat long values). Shorten the text or the items' values.")
    # One left-to-right pass over the template: an inserted value is never read again, so braces in it stay.
    return _TOKENS.sub(lambda m: _BRACE.get(m.group(0)) or values.get(m.group(1), m.group(0)), template)


def _cast(recipe: Recipe) -> str:
    lines = []
    for a in recipe.agents:
        desc = ", ".join(x for x in (a.role, a.persona) if x)
        lines.append(f"- {a.name}" + (f" ({desc})" if desc else ""))
    return "\n".join(lines)


def turn_segments(recipe: Recipe, speaker: str | None, text: str, values: dict[str, str]) -> list[Segment]:
    """Lay a turn out (speaker and text placed by the recipe's format); the layout text belongs to the turn's speaker."""
    if speaker is None:
        return [Segment(FRAME, fill(recipe.format.narration, {**values, "text": text}))]
    agent = recipe.agent(speaker)
    layout = {**values, "speaker": speaker, "agent": speaker, "role": agent.role, "persona": agent.persona}
    return [Segment(speaker, fill(recipe.format.turn, {**layout, "text": text}))]


def item_values(recipe: Recipe, item: int, condition: str) -> dict[str, str]:
    """Placeholder values of an item under a condition (condition vars win)."""
    values = dict(recipe.items[item])
    values.update(recipe.conditions[condition].vars)
    values["cast"] = _cast(recipe)
    return {k: fill(v, values) if "{" in v or "}" in v else v for k, v in values.items()}


def render_episode(recipe: Recipe, item: int, condition: str, generated: dict[int, str] | None = None) -> Episode:
    """Render one item under one condition up to the decision prompt.

    Args:
        recipe: The recipe.
        item: Item index.
        condition: Condition name.
        generated: Texts of generated turns so far, by turn index (generate
            mode). Rendering stops at the first generated turn that has none,
            opening that turn for the model to write.

    Returns:
        The episode. If it stops at a pending generated turn, its last segment
        is that turn's opening, and ``options`` is empty.
    """
    generated = generated or {}
    values = item_values(recipe, item, condition)
    segments: list[Segment] = []
    said: list[tuple[str | None, str]] = []
    extra: dict[int, dict] = {}
    if recipe.format.preamble:
        segments.append(Segment(FRAME, fill(recipe.format.preamble, values)))
    for i, turn in enumerate(recipe.turns):
        if turn.when is not None and condition not in turn.when:
            continue
        if turn.text is None and i not in generated:
            segments += open_turn(recipe, turn.speaker, "", values)
            return Episode(item, condition, segments, [], dict(generated), said, turn.speaker or "", "", values, extra)
        text = generated[i] if turn.text is None else fill(turn.text, values)
        segments += turn_segments(recipe, turn.speaker, text, values)
        if turn.chat and (fields := json.loads(fill(turn.chat, values) or "{}")):
            extra[len(said)] = fields
        said.append((turn.speaker, text))
    d = recipe.decision
    prompt = fill(d.prompt, values)
    segments += open_turn(recipe, d.agent, prompt, values)
    options = [fill(o, values) for o in recipe.option_templates]
    return Episode(item, condition, segments, options, dict(generated), said, d.agent, prompt, values, extra)


def open_turn(recipe: Recipe, speaker: str | None, prompt: str, values: dict[str, str]) -> list[Segment]:
    """A turn laid out only up to the end of ``prompt`` (the rest is the model's).

    Trailing white space is cut: options and generated text bring their own
    leading space (" Paris"), which is how tokenizers split words.
    """
    marker = "\x00"
    full = turn_segments(recipe, speaker, prompt + marker, values)[0]
    return [Segment(full.speaker, full.text.split(marker)[0].rstrip())]


def pending_turn(recipe: Recipe, episode: Episode) -> int | None:
    """Index of the generated turn an episode stopped at, or None when it reached the decision."""
    if episode.options:
        return None
    for i, turn in enumerate(recipe.turns):
        if turn.text is None and i not in episode.generated and (turn.when is None or episode.condition in turn.when):
            return i
    return None


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


@dataclass
class Tokenized:
    ids: list[int]
    speakers: list[int]  # index into the speaker list; one per token


def tokenize_episode(tokenizer, episode: Episode, speakers: list[str], special: bool = True) -> Tokenized:
    """Tokenize an episode's text and give every token the speaker of its first character.

    Uses the tokenizer's character offsets where it has them (fast tokenizers);
    otherwise re-tokenizes growing prefixes, segment by segment.

    Args:
        tokenizer: A Hugging Face tokenizer.
        episode: The episode.
        speakers: The speaker list (FRAME first, then agents); tokens get indices into it.
        special: Let the tokenizer add its special tokens (BOS); off for text a chat template
            rendered, which writes them itself.
    """
    text = episode.text
    bounds = []  # (end character, speaker index) of every segment
    pos = 0
    for seg in episode.segments:
        pos += len(seg.text)
        bounds.append((pos, speakers.index(seg.speaker)))

    def speaker_at(char: int) -> int:
        for end, who in bounds:
            if char < end:
                return who
        return bounds[-1][1] if bounds else 0

    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        ids = list(enc["input_ids"])
        # Special tokens (BOS) have an empty span at 0: they belong to the frame.
        who = [speakers.index(FRAME) if s == e else speaker_at(s) for s, e in enc["offset_mapping"]]
        return Tokenized(ids, who)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    who = []
    done = 0
    for end, spk in bounds:
        n = len(tokenizer(text[:end], add_special_tokens=special)["input_ids"])
        who += [spk] * max(0, n - done)
        done = max(done, n)
    who += [bounds[-1][1] if bounds else 0] * (len(ids) - len(who))
    return Tokenized(list(ids), who[: len(ids)])


def speaker_list(recipe: Recipe) -> list[str]:
    """Speakers in artifact order: the frame, then the agents."""
    return [FRAME, *(a.name for a in recipe.agents)]


def option_ids(tokenizer, option: str) -> list[int]:
    """Token ids of an option as a continuation (no special tokens).

    Raises:
        BadInputError: When the option has no tokens (it renders to nothing): it could not be scored.
    """
    ids = list(tokenizer(option, add_special_tokens=False)["input_ids"])
    if not ids:
        from mechfix.untrusted import visible

        raise BadInputError(
            f"the option '{visible(option)}' has no tokens once rendered, so the model's preference for it cannot be "
            "scored. Give every option some text: check the recipe's decision options (aligned, misaligned, others) "
            "and the items' values they use.")
    return ids
