"""Chat style: an episode rendered as the target agent saw it, through the model's chat template.

In a deployed multi-agent system each agent has its own context: its system
prompt, the other agents' messages as user turns (the sender's name inside
the content, since chat templates drop the ``name`` field), its own earlier
messages as assistant turns, and its reply after the template's generation
prompt. :func:`agent_messages` builds that context for one agent from an
episode's turns; :func:`tokenize_chat` renders it with the tokenizer's
template and keeps a speaker for every token: a message's content tokens
belong to its speaker, the template's own tokens to ``<frame>``. The token ids
are exactly ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``'s
(rendered in mechfix's limited sandbox, :mod:`mechfix.scenario.sandbox`, never by
transformers itself), followed by the decision prompt's tokens (the start of
the agent's reply).

Consecutive messages of one role (several agents speaking in a row) are
merged into one turn, their contents joined by a blank line: templates such
as Gemma's and Mistral's require roles to alternate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mechfix.scenario.episodes import FRAME, Episode, Segment, Tokenized, fill, tokenize_episode
from mechfix.errors import BadInputError
from mechfix.scenario.recipe import Recipe
from mechfix.scenario.templates import Template, render_chat

STYLES = ("text", "chat")
_JOIN = "\n\n"


@dataclass(frozen=True)
class Style:
    """How episodes are rendered: ``text`` (the recipe's layout, for base models) or ``chat`` (through a template).

    Attributes:
        name: ``text`` or ``chat``.
        template: The chat template (chat style only).
    """

    name: str = "text"
    template: Template | None = None

    def as_dict(self) -> dict[str, str | None]:
        """For manifests: the style, and the template's name and sha256."""
        t = self.template
        return {"name": self.name, "template": t.name if t else None, "template_sha256": t.sha256 if t else None}


@dataclass
class ChatMessage:
    """One chat message, with the parts of its content each speaker said (merged turns have several).

    ``extra`` holds more fields for the template (a message's ``tool_calls``, a tool result's ``tool_call_id``).
    """

    role: str
    parts: list[tuple[str, str]] = field(default_factory=list)  # (speaker, text)
    extra: dict = field(default_factory=dict)

    @property
    def content(self) -> str:
        return _JOIN.join(text for _, text in self.parts)

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content, **self.extra}


def system_prompt(recipe: Recipe, agent: str, values: dict[str, str]) -> str:
    """An agent's system prompt: the recipe's ``format.system`` (empty: none), or the preamble and who the agent is."""
    a = recipe.agent(agent)
    layout = {**values, "agent": agent, "speaker": agent, "role": a.role, "persona": a.persona}
    if recipe.format.system is not None:
        return fill(recipe.format.system, layout).strip()
    who = f"You are {agent}" + (f", {a.role}" if a.role else "") + "." + (f" {a.persona[:1].upper()}{a.persona[1:]}." if a.persona else "")
    preamble = fill(recipe.format.preamble, layout).strip()
    return f"{preamble}\n\n{who}" if preamble else who


def agent_messages(recipe: Recipe, turns: list[tuple[str | None, str]], agent: str, values: dict[str, str],
                   extra: dict[int, dict] | None = None) -> list[ChatMessage]:
    """The chat an agent sees: its system prompt, its own turns as assistant, everyone else's as user.

    Another agent's message is written with ``format.message`` (default
    ``{speaker}: {text}``); narration goes in as ``format.narration_role``; the
    messages of an agent whose role is ``system`` (a transcript's system
    messages) stay system messages, where they were.
    """
    system = system_prompt(recipe, agent, values)
    out = [ChatMessage("system", [(FRAME, system)])] if system else []
    extra = extra or {}
    for i, (speaker, text) in enumerate(turns):
        fields = extra.get(i, {})
        if speaker is None:
            role, part = recipe.format.narration_role, (FRAME, text)
        elif recipe.agent(speaker).role in ("system", "tool"):  # a transcript's own system message or tool result
            role, part = recipe.agent(speaker).role, (speaker, text)
        elif speaker == agent:
            role, part = "assistant", (agent, text)
        else:
            a = recipe.agent(speaker)
            layout = {**values, "speaker": speaker, "agent": speaker, "role": a.role, "persona": a.persona, "text": text}
            role, part = "user", (speaker, fill(recipe.format.message, layout))
        # Tool calls and results keep their own messages: a template pairs them by id.
        if out and out[-1].role == role and role != "tool" and not fields and not out[-1].extra:
            out[-1].parts.append(part)
        else:
            out.append(ChatMessage(role, [part], dict(fields)))
    return out


def chat_text(tokenizer, messages: list[ChatMessage]) -> str:
    """The template's rendering of the messages with the generation prompt (in mechfix's limited sandbox).

    Raises:
        BadInputError: When the template refuses them (it raises, e.g. on roles that do not alternate), goes over a
            limit, or renders them to nothing.
    """
    roles = ", ".join(m.role for m in messages)
    text = render_chat(tokenizer, [m.as_dict() for m in messages],
                       f"the chat template does not render this episode's messages ({roles})",
                       "Check the recipe's turns (a template may need a user turn before the first assistant turn), or "
                       "use --style text.")
    if not text:
        raise BadInputError(f"the chat template renders this episode's messages ({roles}) to nothing, so the model "
                            "would see no text. Fix the template, or use --style text.")
    return text


def template_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """``apply_chat_template(messages, add_generation_prompt=True)``'s token ids: the rendering tokenized as it does.

    transformers tokenizes the rendering without adding special tokens (the template writes them); so does this.
    """
    return list(tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def tokenize_chat(tokenizer, messages: list[ChatMessage], prompt: str, agent: str, speakers: list[str]) -> tuple[Tokenized, str]:
    """Token ids and speakers of an agent's chat, with the reply opened up to ``prompt``; and its text.

    Each part of each message is found, in order, in the template's rendering
    (trimmed, where a template trims contents); its characters belong to its
    speaker and everything else to the frame. The rendering is tokenized
    without the tokenizer's own special tokens (the template writes them), and
    checked against the rendering tokenized whole (:func:`template_ids`).

    Raises:
        ValueError: When tokenizing the rendering in parts does not give the ids of tokenizing it whole.
    """
    text = chat_text(tokenizer, messages)
    segments: list[Segment] = []
    cursor = 0
    for m in messages:
        for who, part in m.parts:
            for piece in (part, part.strip()):
                at = text.find(piece, cursor) if piece else -1
                if at >= 0:
                    break
            if at < 0:  # a template may leave a message out (a system prompt with no user turn to fold into)
                continue
            if at > cursor:
                segments.append(Segment(FRAME, text[cursor:at]))
            segments.append(Segment(who, piece))
            cursor = at + len(piece)
    if cursor < len(text):
        segments.append(Segment(FRAME, text[cursor:]))
    tok = tokenize_episode(tokenizer, Episode(0, "", segments, []), speakers, special=False)
    want = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the rendering tokenized whole, as transformers does
    if tok.ids != want:
        raise ValueError("tokenizing the chat template's rendering in its speakers' parts does not give its ids whole")
    if prompt:
        reply = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        tok = Tokenized(tok.ids + reply, tok.speakers + [speakers.index(agent)] * len(reply))
    return tok, text + prompt


def chat_options(options: list[str], prompt: str) -> list[str]:
    """The options as the start of a chat reply: with no decision prompt before them, without leading white space."""
    return options if prompt else [o.lstrip() for o in options]


def chat_episode(tokenizer, recipe: Recipe, episode: Episode, speakers: list[str]) -> tuple[Episode, Tokenized]:
    """An episode as its decision's agent saw it, in chat style.

    Returns:
        The episode with its text as the template rendered it (one frame segment, for transcripts) and its
        options as the reply starts; and its tokens with speakers.
    """
    messages = agent_messages(recipe, episode.turns, episode.agent, episode.values, episode.extra)
    tok, text = tokenize_chat(tokenizer, messages, episode.prompt, episode.agent, speakers)
    return replace(episode, segments=[Segment(FRAME, text)], options=chat_options(episode.options, episode.prompt)), tok


def choose_style(tokenizer, recipe: Recipe, style: str | None = None, template: str | None = None,
                 made: dict | None = None) -> Style:
    """The style a stage renders in, from the options, the model and what a fix was made on.

    Args:
        tokenizer: The model's tokenizer (given ``template`` when one is named).
        recipe: The recipe to render.
        style: ``text``, ``chat`` or None (default: the style of ``made`` when given, else ``chat`` when the
            tokenizer has a chat template, else ``text``).
        template: ``--chat-template``: a built-in name or a Jinja file; given to the tokenizer.
        made: The style block of the artifact a fix was made from (verify renders the same way by default).

    Raises:
        BadInputError: For an unknown style, chat style without a template, or a template that does not render.
    """
    from mechfix.scenario.templates import model_template, resolve_template, use_template

    if style is not None and style not in STYLES:
        raise BadInputError(f"--style must be text or chat, not '{style}'.")
    if template is None and made and made.get("name") == "chat" and made.get("template") not in (None, "model"):
        name = str(made["template"])
        if not name.startswith("file:"):
            template = name  # a built-in: the fix's own
    chosen = resolve_template(template) if template is not None else None
    if chosen is not None:
        use_template(tokenizer, chosen)
    else:
        chosen = model_template(tokenizer)
    if style is None:
        style = (made or {}).get("name") or ("chat" if chosen is not None else "text")
    if style == "text":
        return Style("text")
    if chosen is None:
        raise BadInputError(
            "chat style needs a chat template, and this model's tokenizer has none. Give one with --chat-template "
            "(chatml, llama3, gemma, mistral, or a Jinja file), or use --style text.")
    return Style("chat", chosen)


def recorded_style(manifest: dict) -> dict:
    """An artifact's style block; one made before mechfix recorded styles was rendered in text style."""
    return manifest.get("style") or Style().as_dict()


def style_mismatch(made: dict, now: Style) -> str | None:
    """Why rendering in ``now`` differs from the style a fix was made on (``made``, a manifest's block); None if not."""
    if made.get("name") != now.name:
        return f"the fix was made on {made.get('name')}-style renderings and these are {now.name}-style"
    if now.name == "chat" and made.get("template_sha256") != now.as_dict()["template_sha256"]:
        return (f"the fix was made on renderings through chat template {made.get('template')} "
                f"(sha256 {str(made.get('template_sha256'))[:12]}…), and these go through {now.template.name} "
                f"(sha256 {now.template.sha256[:12]}…)")
    return None


def view_ids(tokenizer, recipe: Recipe, turns: list[tuple[str | None, str]], agent: str, values: dict[str, str],
             prompt: str = "", extra: dict[int, dict] | None = None) -> list[int]:
    """The token ids of one agent's chat with its turn opened up to ``prompt``: what it writes its reply after."""
    ids = template_ids(tokenizer, agent_messages(recipe, turns, agent, values, extra))
    return ids + (list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else [])


def reply_stops(tokenizer) -> list[int]:
    """Tokens that end a chat reply: every special token (end of turn, end of text, the next turn's start)."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.pad_token_id})


class ChatWriters:
    """Batched, cached generation in chat style: one :class:`~mechfix.engine.generation.Writer` per agent.

    Each agent's context is its own chat (its system prompt, its turns as
    assistant), so rows of different agents share no prefix; an agent's own
    context only grows, so its writer's key/value cache carries over from one
    of its turns to the next.

    Args:
        lm: The model.
        recipe: The recipe (agents, format).
        n_rows: Conversations in the batch.
        temperature: 0 for greedy decoding.
        seeds: One seed per row (sampling only); each agent's writer derives its own from them.
    """

    def __init__(self, lm, recipe: Recipe, n_rows: int, temperature: float = 0.0, seeds=None):
        self.lm, self.recipe, self.n, self.temperature = lm, recipe, n_rows, temperature
        self.seeds = list(seeds) if seeds is not None else list(range(n_rows))
        self.writers: dict[str, object] = {}
        self.stops = reply_stops(lm.tokenizer)

    def write(self, agent: str, views: list[tuple[list[tuple[str | None, str]], dict[str, str], str]],
              max_tokens: int) -> list[str]:
        """Every row's reply by ``agent``, from ``(turns, values, prompt)`` per row; cut at the first newline."""
        from mechfix.engine.generation import Writer, row_seed

        if agent not in self.writers:
            self.writers[agent] = Writer(self.lm, self.n, self.temperature, [row_seed(s, agent) for s in self.seeds])
        seqs = [view_ids(self.lm.tokenizer, self.recipe, turns, agent, values, prompt) for turns, values, prompt in views]
        return self.writers[agent].generate_ids(seqs, max_tokens, "\n", self.stops)
