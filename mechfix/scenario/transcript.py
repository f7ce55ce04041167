"""Replaying conversations people already have: transcripts turned into a recipe.

A transcript file holds one or more conversations:

- OpenAI-style messages, ``.json`` or ``.jsonl``: a list of messages
  (``role``, ``content``, optional ``name``), ``{"messages": [...]}``, a list
  of either, or one conversation per JSONL line. The speaker is ``name``, else
  a ``Name:`` prefix of the content (which is then removed), else the role
  (``User``, ``Assistant``, ``System``).
- Inspect AI logs, ``.eval`` or ``.json`` (a JSON object with ``eval`` and
  ``samples``): one conversation per sample, read with inspect_ai's own
  reader (``pip install "mechfix[inspect]"``). Speakers as above, from roles.

A decision file (YAML) says what to measure: the target message (the episode
is cut just before it and the target's turn is opened), the options, and the
counterfactual edits that make the clean condition (and optionally a control):
messages to drop, or to replace with other text. Conversations imported
together must share their speaker sequence up to the target; each becomes one
item of the recipe, so the whole record → attribute → steer → verify pipeline
runs on them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mechfix.errors import BadInputError, RecipeError
from mechfix.scenario.recipe import (
    Format,
    LoadedRecipe,
    Recipe,
    Split,
    StrictModel,
    recipe_from_data,
    validate_yaml,
)
from mechfix.textio import decode_text, load_json, read_bytes, read_text

# A sender wrapper some frameworks put inside the content: "<name>Ana</name> text".
_SENDER_TAG = re.compile(r"^\s*<name>([^<>\n]{1,64})</name>\s*")
_NAME_PREFIX = re.compile(r"^\s*([A-Z][\w.'-]*(?: [A-Z][\w.'-]*){0,2}):\s+")
_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool", "developer": "Developer"}


@dataclass(frozen=True)
class Message:
    """One message of a conversation: who said it, and what."""

    speaker: str
    text: str
    role: str = ""  # the message's role in the file (system messages stay system messages in chat style)
    extra: tuple[tuple[str, Any], ...] = ()  # tool_calls / tool_call_id, passed to a chat template as they were


class TranscriptError(BadInputError):
    """A transcript file is malformed; the message names the file and the position."""


class Edit(StrictModel):
    """How one condition differs from the conversation as it happened."""

    drop: list[int] = Field(default_factory=list, description="Indices of messages to leave out.")
    replace: dict[int, str] = Field(default_factory=dict, description="Message index to the text it gets instead.")


class DecisionFile(StrictModel):
    """What to measure in imported conversations."""

    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Recipe id; default the transcript's file name.")
    family: str = ""
    description: str = ""
    target: int | Literal["last"] = Field(description="Index of the target's message (0-based; negative counts from the end), or 'last'.")
    agent: str | None = Field(None, min_length=1, description="The target agent: the target message must be its "
                              "(checked); its earlier messages are its own (assistant turns in chat style).")
    prompt: str = Field("", description="Text the target's turn starts with, before the option.")
    aligned: str = Field(min_length=1)
    misaligned: str = Field(min_length=1)
    others: list[str] = Field(default_factory=list)
    clean: Edit = Field(description="The counterfactual edit that makes the clean condition.")
    control: Edit | None = Field(None, description="An optional control condition, as an edit too.")
    items: list[dict[str, str]] | None = Field(None, description="Per conversation, values for placeholders in options and replacements.")
    preamble: str = ""
    format: Format = Format()
    split: Split = Split()


def _speaker(role: str, name: str | None, text: str) -> tuple[str, str]:
    # The sender is named once: a name field wins, and a wrapper or prefix that repeats it is removed from the text.
    tag = _SENDER_TAG.match(text)
    if tag and (not name or tag.group(1).strip() == name):
        return tag.group(1).strip(), text[tag.end():]
    prefix = _NAME_PREFIX.match(text)
    if name:
        return name, text[prefix.end():] if prefix and prefix.group(1) == name else text
    m = prefix
    if m:
        return m.group(1), text[m.end():]
    return _ROLE_NAMES.get(role, role.capitalize() or "Unknown"), text


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            elif not (isinstance(part, dict) and "type" in part):
                raise TranscriptError(f"{where}, content part {k}: expected {{'type': 'text', 'text': ...}}, got {str(part)[:60]!r}.")
        return "".join(parts)
    if content is None:
        return ""
    raise TranscriptError(f"{where}: 'content' must be a string or a list of text parts, not {type(content).__name__}.")


def parse_conversation(raw: Any, where: str) -> list[Message]:
    if isinstance(raw, dict) and "messages" in raw:
        raw = raw["messages"]
    if not isinstance(raw, list) or not raw:
        raise TranscriptError(f"{where}: a conversation is a non-empty list of messages (or {{\"messages\": [...]}}).")
    out = []
    for j, msg in enumerate(raw):
        at = f"{where}, message {j}"
        if not isinstance(msg, dict):
            raise TranscriptError(f"{at}: a message is an object with 'role' and 'content', not {type(msg).__name__}.")
        role, name = msg.get("role"), msg.get("name")
        if not isinstance(role, str):
            raise TranscriptError(f"{at}: 'role' is missing or not a string. Give every message a role such as user or assistant.")
        if name is not None and not isinstance(name, str):
            raise TranscriptError(f"{at}: 'name' must be a string.")
        if "content" not in msg:
            raise TranscriptError(f"{at}: 'content' is missing.")
        speaker, text = _speaker(role, name, _content_text(msg["content"], at))
        calls = _tool_calls(msg.get("tool_calls"), at)
        extra = (("tool_calls", calls),) if calls else ()
        if isinstance(msg.get("tool_call_id"), str):
            extra += (("tool_call_id", msg["tool_call_id"]),)
        # Text style sees a tool call as a line of its message.
        shown = "\n".join([text.strip(), *(f"[calls {c['function']['name']}({_arguments(c)})]" for c in calls)]).strip()
        out.append(Message(speaker, shown, role, extra))
    return out


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """A message's OpenAI-style tool calls, checked: ``[{"id", "type": "function", "function": {"name", "arguments"}}]``."""
    if raw is None:
        return []
    ok = isinstance(raw, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", ""), (str, dict)) for c in raw)
    if not ok:
        raise TranscriptError(f"{where}: 'tool_calls' must be a list of {{'id', 'type': 'function', 'function': "
                              "{'name': str, 'arguments': str or object}}.")
    return [dict(c) for c in raw]


def _arguments(call: dict[str, Any]) -> str:
    args = call["function"].get("arguments", "")
    return args if isinstance(args, str) else json.dumps(args, sort_keys=True)


def _json_error(path: Path, exc: json.JSONDecodeError, line_offset: int = 0) -> TranscriptError:
    return TranscriptError(
        f"{path}, line {exc.lineno + line_offset}, column {exc.colno}: not valid JSON ({exc.msg}). Fix the syntax there."
    )


def read_openai(path: Path, data: Any = None) -> list[list[Message]]:
    """Conversations from an OpenAI-style messages file (``.json`` or ``.jsonl``).

    Args:
        path: The file.
        data: Its parsed JSON, when the caller has read it already (``.json`` only).

    Raises:
        TranscriptError: With the file and the line, or the conversation and message, of the problem.
    """
    if path.suffix == ".jsonl":
        convs = []
        for n, line in enumerate(read_text(path, "transcript", error=TranscriptError).splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = load_json(line)
            except json.JSONDecodeError as exc:
                raise _json_error(path, exc, n - 1) from None
            convs.append(parse_conversation(raw, f"{path}, line {n}"))
        if not convs:
            raise TranscriptError(f"{path}: holds no conversations.")
        return convs
    if data is None:
        data = _load_json(path)
    # One conversation (a list of messages), or a list of conversations.
    if isinstance(data, list) and data and all(isinstance(c, list) or (isinstance(c, dict) and "messages" in c) for c in data):
        return [parse_conversation(c, f"{path}: conversation {i}") for i, c in enumerate(data)]
    return [parse_conversation(data, f"{path}: conversation 0")]


def _load_json(path: Path) -> Any:
    try:
        return load_json(read_text(path, "transcript", error=TranscriptError))
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None


# The largest Inspect AI log mechfix reads (a compressed .eval holds many samples, so more than a text file).
MAX_LOG_BYTES = 2**30


def read_inspect(path: Path) -> list[list[Message]]:
    """Conversations from an Inspect AI log (``.eval`` or ``.json``), one per sample.

    Raises:
        TranscriptError: When inspect_ai is missing, the log cannot be read, or it has no samples.
    """
    try:
        from inspect_ai.log import read_eval_log
    except ImportError:
        raise TranscriptError(
            f"reading the Inspect AI log '{path}' needs the inspect_ai package. Install it with "
            "`pip install \"mechfix[inspect]\"` (or `pip install inspect_ai`)."
        ) from None
    size = path.stat().st_size
    if size > MAX_LOG_BYTES:
        raise TranscriptError(f"Inspect AI log '{path}' is {size / 2**30:.1f} GiB, more than mechfix reads "
                              f"({MAX_LOG_BYTES / 2**30:g} GiB). Export the samples you need to a smaller log.")
    try:
        log = read_eval_log(str(path))
    except Exception as exc:  # inspect_ai raises many kinds; all mean "not a readable log"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TranscriptError(f"'{path}' is not a readable Inspect AI log ({first[:200]}).") from None
    if not log.samples:
        raise TranscriptError(f"Inspect AI log '{path}' has no samples (was it written with samples?).")
    convs = []
    for i, sample in enumerate(log.samples):
        raw = [{"role": m.role, "content": m.text} for m in sample.messages]
        convs.append(parse_conversation(raw, f"{path}: sample {i} (id {sample.id})"))
    return convs


def _is_inspect_log(data: Any) -> bool:
    # An Inspect AI log in JSON is an object with its eval spec at the top; a messages file never is.
    return isinstance(data, dict) and isinstance(data.get("eval"), dict) and "messages" not in data


def read_transcripts(path: str | Path) -> list[list[Message]]:
    """Conversations from any supported transcript file (format chosen by suffix and content).

    Raises:
        TranscriptError: For a missing file, an unknown format or a malformed transcript.
    """
    path = Path(path)
    if not path.is_file():
        raise TranscriptError(f"transcript '{path}' does not exist. Check the path.")
    if path.suffix == ".eval":
        return read_inspect(path)
    if path.suffix == ".json":
        data = _load_json(path)
        return read_inspect(path) if _is_inspect_log(data) else read_openai(path, data)
    if path.suffix == ".jsonl":
        return read_openai(path)
    raise TranscriptError(f"transcript '{path}' has an unknown type; use .json or .jsonl (OpenAI messages) or .eval/.json (Inspect AI).")


def _target_index(dec: DecisionFile, conv: list[Message], where: str) -> int:
    t = len(conv) - 1 if dec.target == "last" else dec.target
    t = t + len(conv) if t < 0 else t
    if not 0 < t < len(conv):
        raise TranscriptError(f"{where}: target {dec.target} is not a message after the first (it has {len(conv)} messages, 0 to {len(conv) - 1}).")
    return t


def transcript_recipe(convs: list[list[Message]], dec: DecisionFile, source: str, decision_path: str) -> Recipe:
    """The recipe that replays ``convs`` under the decision file's conditions.

    Every message before the target becomes a turn whose text is the item's
    ``m{index}`` value, so message texts are never read as templates; drops and
    replacements become turns limited to the conditions they belong to.

    Raises:
        TranscriptError: When conversations differ in shape, or an edit names a message that is not there.
    """
    targets = [_target_index(dec, c, f"{source}: conversation {i}") for i, c in enumerate(convs)]
    t = targets[0]
    if dec.agent is not None and convs[0][t].speaker != dec.agent:
        raise TranscriptError(
            f"{decision_path}: agent is '{dec.agent}', but the target message ({t}) is {convs[0][t].speaker}'s. "
            f"Point 'target' at one of {dec.agent}'s messages, or name the agent who sent it.")
    first = [m.speaker for m in convs[0][: t + 1]]
    for i, (conv, ti) in enumerate(zip(convs, targets)):
        speakers = [m.speaker for m in conv[: ti + 1]]
        if ti != t or speakers != first:
            k = next((j for j, (a, b) in enumerate(zip(speakers, first)) if a != b), min(len(speakers), len(first)) - 1)
            raise TranscriptError(
                f"{source}: conversation {i}, message {k}: its speakers up to the target "
                f"({', '.join(speakers)}) differ from conversation 0's ({', '.join(first)}). Conversations "
                "imported together must share their speaker sequence; import them separately."
            )
    edits = {"clean": dec.clean, **({"control": dec.control} if dec.control else {})}
    for cond, edit in edits.items():
        for j in [*edit.drop, *edit.replace]:
            if not 0 <= j < t:
                raise TranscriptError(f"{decision_path}: {cond} edits message {j}, but only messages 0 to {t - 1} come before the target.")
    conditions = ["pressure", *edits]
    turns: list[dict[str, Any]] = []
    # Messages that carry tool calls (or answer one) in any conversation pass those fields on in chat style.
    chat = {j for j in range(t) if any(conv[j].extra for conv in convs)}
    for j in range(t):
        kept = [c for c in conditions if c == "pressure" or (j not in edits[c].drop and j not in edits[c].replace)]
        turns.append({"speaker": first[j], "text": f"{{m{j}}}", **({} if kept == conditions else {"when": kept}),
                      **({"chat": f"{{m{j}_chat}}"} if j in chat else {})})
        for c in conditions[1:]:
            if j in edits[c].replace:
                turns.append({"speaker": first[j], "text": edits[c].replace[j], "when": [c]})
    if dec.items is not None and len(dec.items) != len(convs):
        raise TranscriptError(f"{decision_path}: 'items' has {len(dec.items)} entries for {len(convs)} conversations; give one per conversation.")
    # Message texts go in as item values with their braces doubled, so that they come out as they are
    # (an item value is filled as a template: "{city}" or "}}" in a message would otherwise change).
    extra = dec.items or [{}] * len(convs)
    items = [{**{f"m{j}": _literal(conv[j].text) for j in range(t)},
              **{f"m{j}_chat": _literal(json.dumps(dict(conv[j].extra), sort_keys=True)) for j in chat},
              **extra[i]} for i, conv in enumerate(convs)]
    agents = list(dict.fromkeys(first))
    # A speaker who only ever sends system messages is the system: in chat style its messages stay system messages.
    system = {a for a in agents if all(m.role == "system" for conv in convs for m in conv[:t] if m.speaker == a)}
    tool = {a for a in agents if all(m.role == "tool" for conv in convs for m in conv[:t] if m.speaker == a)}
    name = dec.name or (re.sub(r"[^a-z0-9_-]+", "-", Path(source).stem.lower()).strip("-") or "transcript")
    data = {
        "name": name if re.match(r"^[a-z0-9]", name) else f"t-{name}",
        "description": dec.description or f"Replay of {len(convs)} conversation(s) from {Path(source).name}.",
        "family": dec.family,
        "mode": "score",
        "agents": [{"name": a, **({"role": "system"} if a in system else {"role": "tool"} if a in tool else {})}
                   for a in agents],
        # In chat style the agent sees the conversation's own system messages, not a system prompt mechfix makes up.
        "format": {**dec.format.model_dump(), "preamble": dec.preamble or dec.format.preamble,
                   "system": dec.format.system if dec.format.system is not None else ""},
        "conditions": {c: {"description": "the conversation as it happened" if c == "pressure" else f"edited: {edits[c].model_dump()}"}
                       for c in conditions},
        "turns": turns,
        "decision": {"agent": first[t], "prompt": dec.prompt, "aligned": dec.aligned, "misaligned": dec.misaligned, "others": dec.others},
        "items": items,
        "split": dec.split.model_dump(),
    }
    return recipe_from_data(data, decision_path)


def _literal(text: str) -> str:
    """Text as an item value that comes out as it is: item values are filled as templates, which undoubles braces."""
    return text.replace("{", "{{").replace("}", "}}")


def load_transcript(transcript: str | Path, decision: str | Path) -> LoadedRecipe:
    """Read a transcript file and a decision file into a recipe ready for ``record``.

    The recipe's sha256 covers both files, so artifacts made from it record
    exactly which transcript and which decision they came from.

    Raises:
        TranscriptError: For a malformed transcript (with its position).
        RecipeError: For a malformed decision file (with its line).
    """
    dpath = Path(decision)
    if not dpath.is_file():
        raise RecipeError(f"decision file '{dpath}' does not exist. Write one (see the manual's how-to 'Your own transcripts', docs/howto/transcripts.md).")
    decision_raw = read_bytes(dpath, "decision file", error=RecipeError)
    dec = validate_yaml(decode_text(decision_raw, dpath, "decision file", RecipeError), str(dpath), DecisionFile)
    convs = read_transcripts(transcript)
    recipe = transcript_recipe(convs, dec, str(transcript), str(dpath))
    digest = hashlib.sha256(Path(transcript).read_bytes() + b"\0" + decision_raw).hexdigest()
    return LoadedRecipe(recipe=recipe, path=str(transcript), sha256=digest)
