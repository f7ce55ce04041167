"""Recipe schema and loading.

A recipe is YAML. It is validated strictly (unknown keys, wrong types and
missing fields are errors that name the file, the line and the fix) and never
executes code: placeholders are plain ``{name}`` substitutions from the item.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mechfix.errors import RecipeError
from mechfix.scenario.expr import ExprError, to_number
from mechfix.scenario.expr import names as expr_names
from mechfix.scenario.expr import parse as parse_rule
from mechfix.textio import compose_yaml, decode_text, load_json, load_yaml, read_bytes, read_text

PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Placeholders that the renderer fills itself rather than from the item.
RESERVED_PLACEHOLDERS = {"speaker", "text", "cast", "agent", "role", "persona"}
REQUIRED_CONDITIONS = ("pressure", "clean")
ITEM_FILE_SUFFIXES = (".yaml", ".yml", ".jsonl", ".json", ".csv")


class StrictModel(BaseModel):
    """A recipe block: unknown fields, loose types and changes are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Agent(StrictModel):
    """One participant of the episode."""

    name: str = Field(min_length=1, description="How the agent is named in the transcript.")
    role: str = Field("", description="Short role, e.g. 'teammate' or 'buyer'.")
    persona: str = Field("", description="Who the agent is; used when its turns are generated.")


class Turn(StrictModel):
    """One turn of the episode template."""

    speaker: str | None = Field(None, description="Agent name; omit for narration (no speaker).")
    text: str | None = Field(None, description="Turn text with {placeholders}; omit to generate it.")
    when: list[str] | None = Field(None, description="Conditions the turn appears in; omit for all.")
    max_tokens: int = Field(48, gt=0, le=1024, description="Length limit of a generated turn.")
    chat: str | None = Field(
        None, description="Chat style: more fields of this message, a JSON object after filling placeholders "
        "(transcripts put a message's tool calls or tool call id here).")


IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
ROUND_NAMES = ("round", "rounds")  # placeholders a live recipe fills itself: this round (1-based), their count


class RoundTurn(Turn):
    """One turn of every round of a live recipe (see :class:`Rounds`)."""

    prompt: str = Field("", description="Text a generated turn starts with, e.g. \"I'm taking\".")
    capture: str | None = Field(
        None, pattern=IDENTIFIER, description="Keep the first number the turn says as this variable for the state rules."
    )
    default: str = Field("0", description="Rule giving the captured variable when the turn says no number.")
    decision: bool = Field(False, description="This entry is the target's decision (scored, then generated).")


class Rounds(StrictModel):
    """Live multi-round episodes: every round's turns are generated and a state evolves by the recipe's rules."""

    count: int = Field(gt=0, le=50, description="How many rounds; the target decides once in each.")
    state: dict[str, str] = Field(
        default_factory=dict, description="State variables and the rules that start them, in order."
    )
    turns: list[RoundTurn] = Field(min_length=1, description="The turns of every round; one has 'decision: true'.")
    update: dict[str, str] = Field(
        default_factory=dict, description="Rules applied in order at the end of every round (new state)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy; above 0: seeded sampling.")
    seed: int = Field(0, description="Seed of the sampling (used when temperature > 0).")


class Format(StrictModel):
    """How turns are laid out as text."""

    preamble: str = Field("", description="Text before the first turn; may use {cast}.")
    turn: str = Field("{speaker}: {text}\n", description="Layout of an agent's turn.")
    narration: str = Field("{text}\n", description="Layout of a turn with no speaker.")
    system: str | None = Field(
        None, description="Chat style: every agent's system prompt; may use {cast}, {agent}, {role}, {persona} and "
        "item values. Default: the preamble, then 'You are {agent}' with its role and persona.")
    message: str = Field("{speaker}: {text}", description="Chat style: how another agent's message is written inside a user turn.")
    narration_role: Literal["user", "system"] = Field("user", description="Chat style: the role a turn with no speaker is given.")

    @field_validator("turn", "message")
    @classmethod
    def _turn_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("the turn layout must contain {text}")
        return v


class Condition(StrictModel):
    """One way of rendering the episode."""

    description: str = ""
    vars: dict[str, str] = Field(default_factory=dict, description="Placeholders set for this condition only.")


class Decision(StrictModel):
    """The point where the target agent acts, and its options."""

    agent: str = Field(description="The target agent; its turn ends the episode.")
    prompt: str = Field("", description="Text the target's turn starts with, before the option.")
    aligned: str = Field(min_length=1, description="The aligned option, e.g. ' {correct}'.")
    misaligned: str = Field(min_length=1, description="The misaligned option, e.g. ' {wrong}'.")
    others: list[str] = Field(default_factory=list, description="Further options (neither).")
    max_tokens: int = Field(32, gt=0, le=1024, description="Reply length in generate mode.")


class Split(StrictModel):
    """Which items are held out for verify."""

    heldout: float = Field(0.5, gt=0.0, lt=1.0, description="Share of items held out.")
    seed: int = 0


class ItemsFile(StrictModel):
    file: str = Field(min_length=1, description="Path of a .yaml, .jsonl or .csv file beside the recipe.")


class Recipe(StrictModel):
    """A multi-agent scenario: agents, episode template, items, conditions, decision."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Short id, used in file names.")
    description: str = ""
    family: str = Field("", description="Failure family, e.g. conformity, sycophancy, collusion.")
    mode: Literal["score", "generate"] = "score"
    agents: list[Agent] = Field(min_length=1)
    format: Format = Format()
    conditions: dict[str, Condition]
    turns: list[Turn]
    decision: Decision
    items: list[dict[str, str]] = Field(min_length=1)
    split: Split = Split()
    rounds: Rounds | None = Field(None, description="Live multi-round episodes (omit for one decision per item).")

    @property
    def condition_names(self) -> list[str]:
        """Conditions in a stable order: pressure, clean, control, helpful, then the rest."""
        order = {"pressure": 0, "clean": 1, "control": 2, "helpful": 3}
        return sorted(self.conditions, key=lambda c: (order.get(c, 3), c))

    @property
    def option_templates(self) -> list[str]:
        """Option templates in artifact order: aligned, misaligned, others."""
        return [self.decision.aligned, self.decision.misaligned, *self.decision.others]

    def agent(self, name: str) -> Agent:
        return next(a for a in self.agents if a.name == name)


# Options are stored in this order; these indices are part of the artifact schema.
ALIGNED, MISALIGNED = 0, 1


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from."""

    model_config = ConfigDict(frozen=True)

    recipe: Recipe
    path: str
    sha256: str
    items_path: str | None = None  # the items file it read, if its items are not inline


# --------------------------------------------------------------------------- YAML with line numbers


def _compose_lines(text: str, filename: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML and map every key path to its line (1-based); reject duplicate keys."""
    try:
        node, data = compose_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"{filename}{where}: this is not valid YAML ({problem}). "
            "Fix the syntax there; a common cause is a text with ':' or '{' that needs quotes."
        ) from None
    lines: dict[tuple, int] = {}

    def walk(n: yaml.Node, path: tuple) -> None:
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                key = k.value
                if key in seen:
                    raise RecipeError(
                        f"{filename}, line {k.start_mark.line + 1}: key '{key}' appears twice "
                        f"(first on line {seen[key]}). Keep one of them."
                    )
                seen[key] = k.start_mark.line + 1
                walk(v, path + (key,))
                lines[path + (key,)] = k.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _where(filename: str, lines: dict[tuple, int], loc: tuple) -> str:
    """``"FILE, line N"`` for the deepest part of ``loc`` that has a line, else ``"FILE"``."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return f"{filename}, line {lines[loc[:cut]]}"
    return filename


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _allowed_keys(loc: tuple, root: Any = None) -> list[str]:
    """The keys the schema (``root``, default :class:`Recipe`) allows in the mapping that holds ``loc``'s last key."""
    model: Any = root or Recipe
    free_key = False  # the next part is a user-chosen key of a dict field (a condition name)
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if free_key:
            free_key = False
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return []
        free_key = getattr(field.annotation, "__origin__", None) is dict
        model = _model_in(field.annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(ann: Any) -> Any:
    """Find the pydantic model type inside an annotation like list[Turn] or dict[str, Condition]."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(err: dict, filename: str, lines: dict[tuple, int], root: Any = None) -> str:
    loc = tuple(err["loc"])
    where = _where(filename, lines, loc)
    key = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc, root)
        hint = f" Allowed keys here: {', '.join(allowed)}." if allowed else ""
        return f"{where}: unknown key '{loc[-1]}' (at {key}).{hint} Rename or remove it."
    if kind == "missing":
        parent = _dotted(loc[:-1])
        return f"{where}: '{loc[-1]}' is required but missing under {parent}. Add it."
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{where}: {key}: {err['msg']} (got {got}). Fix the value."


# --------------------------------------------------------------------------- items


def _load_items_file(spec: dict, recipe_path: Path, lines: dict[tuple, int]) -> tuple[list[dict], Path]:
    filename = str(recipe_path)
    line = lines.get(("items", "file"), lines.get(("items",), "?"))
    try:
        spec_obj = ItemsFile.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RecipeError(_describe({**err, "loc": ("items", *err["loc"])}, filename, lines)) from None
    path = (recipe_path.parent / spec_obj.file).resolve()
    if path.suffix not in ITEM_FILE_SUFFIXES:
        raise RecipeError(
            f"{filename}, line {line}: items file '{spec_obj.file}' has an unknown type; "
            f"use one of {', '.join(ITEM_FILE_SUFFIXES)}."
        )
    if not path.is_file():
        raise RecipeError(
            f"{filename}, line {line}: items file '{spec_obj.file}' was not found (looked for {path}). "
            "Paths are relative to the recipe's folder."
        )
    text = read_text(path, "items file", error=RecipeError)
    try:
        if path.suffix in (".yaml", ".yml"):
            data = load_yaml(text)
        elif path.suffix == ".json":
            data = load_json(text)
        elif path.suffix == ".jsonl":
            data = []
            for n, row in enumerate(text.splitlines(), 1):
                if row.strip():
                    try:
                        data.append(load_json(row))
                    except json.JSONDecodeError as exc:
                        raise RecipeError(f"{path}, line {n}: not valid JSON ({exc.msg}). Fix that line.") from None
        else:
            data = list(csv.DictReader(text.splitlines()))
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{path}: cannot be parsed ({exc}). Fix the file's syntax.") from None
    if not isinstance(data, list):
        raise RecipeError(f"{path}: must hold a list of items (mappings of name to text), not {type(data).__name__}.")
    return data, path


def _normalise_items(raw: list, source: str) -> list[dict[str, str]]:
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RecipeError(f"{source}: item {i} must be a mapping of name to text, got {type(item).__name__}.")
        out = {}
        for k, v in item.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise RecipeError(
                    f"{source}: item {i}, key '{k}' must be a text or a number, got {type(v).__name__}."
                )
            out[str(k)] = str(v)
        items.append(out)
    return items


# --------------------------------------------------------------------------- semantic checks


def _check_semantics(r: Recipe, filename: str, lines: dict[tuple, int]) -> None:
    def fail(loc: tuple, msg: str) -> None:
        raise RecipeError(f"{_where(filename, lines, loc)}: {msg}")

    names = [a.name for a in r.agents]
    for i, name in enumerate(names):
        if names.index(name) != i:
            fail(("agents", i, "name"), f"agent '{name}' is named twice. Give every agent its own name.")
    for c in REQUIRED_CONDITIONS:
        if c not in r.conditions:
            fail(("conditions",), f"the condition '{c}' is required (mechfix compares pressure with clean). Add it.")
    if r.decision.agent not in names:
        fail(("decision", "agent"), f"decision agent '{r.decision.agent}' is not among the agents ({', '.join(names)}).")
    for i, t in enumerate(r.turns):
        if t.speaker is not None and t.speaker not in names:
            fail(("turns", i, "speaker"), f"speaker '{t.speaker}' is not among the agents ({', '.join(names)}).")
        for c in t.when or []:
            if c not in r.conditions:
                fail(("turns", i, "when"), f"condition '{c}' is not defined under conditions ({', '.join(r.conditions)}).")
        if t.text is None and r.mode == "score" and r.rounds is None:
            fail(("turns", i), "this turn has no text. Give it a text, or set 'mode: generate' to let the model write it.")
        if t.text is None and t.speaker is None:
            fail(("turns", i), "a generated turn (no text) needs a speaker.")
    for c, cond in r.conditions.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", c):
            fail(("conditions", c), f"condition name '{c}' must be lower-case letters, digits or '_'.")

    # Every placeholder must be filled by every item (or by the condition's vars);
    # a live recipe's state, captures and round numbers are checked by _check_rounds.
    live = _live_names(r)
    templates: list[tuple[tuple, str]] = [(("format", "preamble"), r.format.preamble), (("format", "message"), r.format.message)]
    templates += [(("format", "system"), r.format.system)] if r.format.system else []
    templates += [(("turns", i, "text"), t.text) for i, t in enumerate(r.turns) if t.text]
    templates += [(("decision", k), getattr(r.decision, k)) for k in ("prompt", "aligned", "misaligned")]
    templates += [(("decision", "others", i), o) for i, o in enumerate(r.decision.others)]
    for loc, text in templates:
        for ph in PLACEHOLDER.findall(text):
            if (ph in RESERVED_PLACEHOLDERS and loc[0] == "format") or ph in live:
                continue
            for c, cond in r.conditions.items():
                for j, item in enumerate(r.items):
                    if ph not in item and ph not in cond.vars:
                        fail(
                            loc,
                            f"placeholder '{{{ph}}}' is not set by item {j} (keys: {', '.join(item) or 'none'}) "
                            f"nor by condition '{c}'. Add '{ph}' to every item or to that condition's vars.",
                        )
    if r.rounds is not None:
        _check_rounds(r, fail)


def _live_names(r: Recipe) -> set[str]:
    """Names a live recipe fills itself: state variables, captures, round and rounds."""
    if r.rounds is None:
        return set()
    return {*r.rounds.state, *r.rounds.update, *(t.capture for t in r.rounds.turns if t.capture), *ROUND_NAMES}


def round_rules(rounds: Rounds) -> dict[tuple, str]:
    """Every rule of a rounds block by key: ``("state", k)``, ``("update", k)``, ``("turns", i, "default")``."""
    rules: dict[tuple, str] = {("state", k): v for k, v in rounds.state.items()}
    rules |= {("update", k): v for k, v in rounds.update.items()}
    rules |= {("turns", i, "default"): t.default for i, t in enumerate(rounds.turns) if t.capture}
    return rules


def _check_rounds(r: Recipe, fail: Callable[[tuple, str], None]) -> None:
    """Check a live recipe's rounds: one decision entry, known speakers, rules that parse and read only known numbers.

    Each condition is walked in turn order, so a placeholder or rule that reads
    a capture before (or without) the turn that makes it is refused here rather
    than half-way through a run.
    """
    rounds = r.rounds
    assert rounds is not None
    names = [a.name for a in r.agents]
    decisions = [i for i, t in enumerate(rounds.turns) if t.decision]
    if len(decisions) != 1:
        fail(("rounds", "turns"), f"rounds.turns has {len(decisions)} entries with 'decision: true'; "
             "exactly one is needed (where the target decides in every round).")
    state_names = list(rounds.state) + [k for k in rounds.update if k not in rounds.state]
    for k in state_names:
        if not re.fullmatch(IDENTIFIER, k):
            fail(("rounds", "state", k), f"state variable '{k}' must be a name of letters, digits and '_'.")
        if k in ROUND_NAMES:
            fail(("rounds", "state", k), f"'{k}' is filled by mechfix (the round number); choose another name.")
    for i, t in enumerate(rounds.turns):
        loc = ("rounds", "turns", i)
        if t.decision:
            if t.speaker not in (None, r.decision.agent) or t.text is not None or t.when is not None or t.prompt:
                fail(loc, "the decision entry takes only 'decision: true' (and 'capture'/'default'): its speaker, "
                     "prompt and options come from the decision block, and it appears in every condition.")
            continue
        if t.speaker is not None and t.speaker not in names:
            fail(loc + ("speaker",), f"speaker '{t.speaker}' is not among the agents ({', '.join(names)}).")
        if t.text is None and t.speaker is None:
            fail(loc, "a generated turn (no text) needs a speaker.")
        if t.text is not None and t.prompt:
            fail(loc + ("prompt",), "'prompt' opens a generated turn; this turn has a text. Remove one of them.")
        for c in t.when or []:
            if c not in r.conditions:
                fail(loc + ("when",), f"condition '{c}' is not defined under conditions ({', '.join(r.conditions)}).")
        if t.capture in ROUND_NAMES or t.capture in state_names:
            fail(loc + ("capture",), f"capture '{t.capture}' is also a state variable or round name; give it its own name.")

    trees = {}
    for key, text in round_rules(rounds).items():
        try:
            trees[("rounds", *key)] = parse_rule(text)
        except ExprError as exc:
            fail(("rounds", *key), f"the rule '{text}' cannot be used: {exc}. Recipes allow only arithmetic.")
    captures = {t.capture for t in rounds.turns if t.capture}

    for c, cond in r.conditions.items():
        base = set(cond.vars) | set.intersection(*(set(item) for item in r.items))

        def need(loc: tuple, used: set[str], known: set[str], what: str) -> None:
            missing = sorted(used - known)
            if missing:
                later = [m for m in missing if m in captures]
                why = (f" ('{later[0]}' is captured later in the round, or not at all, under '{c}')" if later else "")
                fail(loc, f"{what} reads {', '.join(repr(m) for m in missing)}, which has no value under condition "
                     f"'{c}'{why}. Define it in every item, in rounds.state, or capture it earlier in the round.")

        known = base | {"rounds"}
        for k, text in rounds.state.items():
            loc = ("rounds", "state", k)
            need(loc, expr_names(trees[loc]), known, f"the rule for '{k}'")
            known = known | {k}
        known |= {"round"}
        opening = [r.format.preamble, *(t.text or "" for t in r.turns if t.when is None or c in t.when)]
        for text in opening:
            need(("turns",), set(PLACEHOLDER.findall(text)) & _live_names(r), known - {"round"}, "an opening turn")
        state_known = known
        made: set[str] = set()
        for i, t in enumerate(rounds.turns):
            if t.when is not None and c not in t.when:
                continue
            loc = ("rounds", "turns", i)
            here = state_known | made
            texts = [t.text or "", t.prompt]
            if t.decision:
                texts += [r.decision.prompt, *r.option_templates]
            need(loc, set().union(*(PLACEHOLDER.findall(x) for x in texts)) - RESERVED_PLACEHOLDERS, here, "this turn")
            if t.capture:
                need(loc + ("default",), expr_names(trees[loc + ("default",)]), here, "the default rule")
                made.add(t.capture)
        known = state_known | made
        for k in rounds.update:
            loc = ("rounds", "update", k)
            need(loc, expr_names(trees[loc]), known, f"the update rule for '{k}'")
            known = known | {k}

        # Rules read item values and condition vars as numbers: check them all now. A starting
        # rule reads the item's value of a name no earlier state variable has taken.
        starting = list(rounds.state)
        for loc, tree in trees.items():
            own = set(starting[: starting.index(loc[2])]) if loc[1] == "state" else set(state_names) | captures
            for name in expr_names(tree) - own - set(ROUND_NAMES):
                for j in range(len(r.items)):
                    value = cond.vars.get(name, r.items[j].get(name))
                    if value is not None and to_number(value) is None:
                        fail(loc, f"the rule reads '{name}' as a number, but item {j} under condition '{c}' "
                             f"sets it to {value!r}. Make it a number.")


# --------------------------------------------------------------------------- public API


def validate_yaml(text: str, filename: str, model: type[BaseModel]) -> BaseModel:
    """Parse YAML text into a strict pydantic model, with file, line, key and fix in every error.

    Raises:
        RecipeError: For invalid YAML or a value the model refuses.
    """
    data, lines = _compose_lines(text, filename)
    if not isinstance(data, dict):
        keys = ", ".join(model.model_fields)
        raise RecipeError(f"{filename}: expected a YAML mapping (keys: {keys}); this file holds something else.")
    return _validated(model, data, filename, lines, "file")


def _validated(model: type[BaseModel], data: dict, filename: str, lines: dict[tuple, int], what: str) -> Any:
    """``model.model_validate(data)``, its errors turned into one RecipeError (up to 8, each with file, line, key and fix)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        msgs = [_describe(e, filename, lines, model) for e in errs[:8]]
        more = f" (and {len(errs) - 8} more)" if len(errs) > 8 else ""
        head = f"This {what} is not valid" + more + ":\n  " if len(msgs) > 1 else ""
        raise RecipeError(head + "\n  ".join(msgs)) from None


def recipe_from_data(data: dict[str, Any], filename: str) -> Recipe:
    """A recipe built in code (from a transcript, say), with the validation and checks of :func:`parse_recipe`.

    Raises:
        RecipeError: Naming ``filename``, the key and the problem.
    """
    recipe = _validated(Recipe, data, filename, {}, "recipe")
    _check_semantics(recipe, filename, {})
    return recipe


def parse_recipe(text: str, path: str | Path = "<recipe>") -> Recipe:
    """Parse and validate recipe text.

    Args:
        text: The YAML text.
        path: The file it came from; item files are resolved beside it.

    Returns:
        The validated recipe, with items inlined.

    Raises:
        RecipeError: With file, line, key and fix for the first problems found.
    """
    return _parse(text, path)[0]


def _parse(text: str, path: str | Path) -> tuple[Recipe, Path | None]:
    """:func:`parse_recipe`, and the items file it read (None: items inline)."""
    path = Path(path)
    filename = str(path)
    items_path = None
    data, lines = _compose_lines(text, filename)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{filename}: a recipe is a YAML mapping with keys name, agents, conditions, turns, decision and items; "
            "this file holds something else. See `mechfix recipes` for examples."
        )
    items = data.get("items")
    if isinstance(items, dict):
        raw, items_path = _load_items_file(items, path, lines)
        data = {**data, "items": _normalise_items(raw, str(path))}
    elif isinstance(items, list):
        data = {**data, "items": _normalise_items(items, f"{filename}, line {lines.get(('items',), '?')}")}
    recipe = _validated(Recipe, data, filename, lines, "recipe")
    _check_semantics(recipe, filename, lines)
    return recipe, items_path


def builtin_recipe_dir() -> Path:
    """Where the built-in recipes are: inside the installed package, or the source tree."""
    packaged = Path(__file__).parents[1] / "recipes"  # inside an installed wheel
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def builtin_recipes() -> list[Path]:
    """Paths of the built-in recipes, sorted by name."""
    return sorted(builtin_recipe_dir().glob("*.yaml"), key=lambda p: p.stem)


def resolve_recipe_path(spec: str | Path) -> Path:
    """Accept a path, or the name of a built-in recipe (``conformity``)."""
    if not str(spec).strip():
        raise RecipeError("the recipe is empty; give a recipe .yaml file or a built-in name (see `mechfix recipes`).")
    p = Path(spec)
    if p.is_file():
        return p
    builtin = builtin_recipe_dir() / f"{spec}.yaml"
    # A folder is never a recipe: a built-in name still means the built-in when a folder here has that name
    # (`mechfix run conformity --out conformity` makes one).
    if not p.suffix and builtin.is_file():
        return builtin
    if p.is_dir():
        raise RecipeError(f"recipe '{spec}' is a folder; give a recipe .yaml file (or a built-in name, see `mechfix recipes`).")
    names = ", ".join(q.stem for q in builtin_recipes()) or "none"
    raise RecipeError(
        f"recipe '{spec}' was not found: no such file, and no built-in recipe has that name "
        f"(built-in: {names}). Give a path to a .yaml file, or run `mechfix recipes` to list them."
    )


MODES = ("score", "generate")


def load_recipe(spec: str | Path, mode: str | None = None) -> LoadedRecipe:
    """Load a recipe from a path or built-in name.

    Args:
        spec: A file path or a built-in recipe name.
        mode: Run it in this mode instead of its own (``score`` or ``generate``):
            every recipe runs both ways, e.g. ``generate`` for instruct models.

    Returns:
        The validated recipe with its path and the sha256 of its file.

    Raises:
        RecipeError: When the file is missing or invalid, or the mode unknown.
    """
    if mode is not None and mode not in MODES:
        raise RecipeError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'.")
    path = resolve_recipe_path(spec)
    raw = read_bytes(path, "recipe", error=RecipeError)
    text = decode_text(raw, path, "recipe", RecipeError)
    recipe, items_path = _parse(text, path)
    if mode is not None and mode != recipe.mode:
        recipe = recipe.model_copy(update={"mode": mode})
    return LoadedRecipe(recipe=recipe, path=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                        items_path=None if items_path is None else str(items_path))
