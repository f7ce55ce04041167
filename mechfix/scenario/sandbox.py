"""Jinja with limits: chat templates are code from strangers, and mechfix runs them.

A chat template comes from a model's tokenizer, a file or a colleague; Jinja's
sandbox already keeps it away from Python's internals (no attribute walks, no
imports, no mutation of what it is given). What the sandbox does not bound is
work: two nested ``range`` loops run 10^10 times, a macro that calls itself
twice runs 2^n times, and a string doubled in a loop fills the memory. mechfix
therefore renders every template itself, in the environment below, which
mirrors the one transformers' ``apply_chat_template`` builds (same options,
``tojson``, ``raise_exception``, ``strftime_now``, ``namespace``, the
``{% generation %}`` tag) and adds a budget per render:

- **steps**: every loop iteration, call, attribute or item lookup, operator,
  concatenation and printed value costs one step;
- **time**: wall-clock seconds, checked every 1024 steps;
- **output**: characters the rendering may have;
- **work**: characters all operations together may make (so a string cannot
  grow out of sight inside a variable), and the size of a whole number;
- operations that multiply sizes (``*``, ``%``-formatting, ``format``,
  ``replace``, ``join``, ``indent``, ``wordwrap``, ``expandtabs``, widths and
  counts given as numbers) are checked *before* they run.

The limits (:data:`LIMITS`) are far above what a real chat template needs for
a conversation that fits any model's context, and a template over one is
refused with :class:`TemplateLimitError`, which names the limit.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mechfix.textio import MAX_RENDER_CHARS


@dataclass(frozen=True)
class Limits:
    """What one render may spend.

    Attributes:
        seconds: Wall-clock time.
        steps: Loop iterations, calls, lookups, operators and printed values.
        output_chars: Characters in the rendering, and in any one value (about four million tokens).
        work_chars: Characters made by all operations together.
        int_bits: Bits in any whole number a template computes.
    """

    seconds: float = 10.0
    steps: int = 1_000_000
    output_chars: int = MAX_RENDER_CHARS
    work_chars: int = 256_000_000
    int_bits: int = 4096


LIMITS = Limits()

# What each limit is called in messages, and the unit of its number.
_LIMIT_NAMES = {"seconds": ("time", "s"), "steps": ("steps", " steps"), "output_chars": ("output size", " characters"),
                "work_chars": ("work", " characters made"), "int_bits": ("number size", " bits")}


class TemplateLimitError(jinja2.TemplateError):
    """A render went over one of its :class:`Limits`.

    Attributes:
        limit: The name of the field of :class:`Limits` it went over.
        value: That limit's value.
    """

    def __init__(self, limit: str, value: float, what: str = ""):
        name, unit = _LIMIT_NAMES[limit]
        self.limit, self.value = limit, value
        super().__init__(f"over the {name} limit ({value:,g}{unit}){': ' + what if what else ''}")


class _Budget:
    """One render's spending; every hook below charges it."""

    __slots__ = ("limits", "start", "steps", "work")

    def __init__(self, limits: Limits):
        self.limits, self.start, self.steps, self.work = limits, time.monotonic(), 0, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.steps:
            raise TemplateLimitError("steps", self.limits.steps)
        if not self.steps & 1023 and time.monotonic() - self.start > self.limits.seconds:
            raise TemplateLimitError("seconds", self.limits.seconds)

    def spend(self, value: Any) -> Any:
        """Charge what an operation made (a string's characters, a container's items, a number's bits)."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > self.limits.int_bits:
                raise TemplateLimitError("int_bits", self.limits.int_bits)
        elif isinstance(value, (str, list, tuple, dict, set, frozenset)):
            self.grow(len(value))
        return value

    def grow(self, size: int, what: str = "") -> None:
        """Refuse an operation before it runs when what it would make is over a limit; else charge it."""
        if size > self.limits.output_chars:
            raise TemplateLimitError("output_chars", self.limits.output_chars, what or "one value would be larger")
        self.work += size
        if self.work > self.limits.work_chars:
            raise TemplateLimitError("work_chars", self.limits.work_chars)


_BUDGET: ContextVar[_Budget | None] = ContextVar("mechfix_template_budget", default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:  # an environment's hook reached outside render(): refuse rather than run unbounded
        raise TemplateLimitError("steps", 0, "rendered outside mechfix's limits")
    return b


@contextmanager
def _spending(limits: Limits):
    token = _BUDGET.set(_Budget(limits))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


# ---- bounds of operations that multiply sizes, checked before they run ----------------------------------------

_WIDTHS = re.compile(r"%[-#0 +]*(\d+)?(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


def _check_widths(fmt: Any) -> None:
    """A ``%`` or ``str.format`` pattern may not ask for a field wider than the output limit."""
    if isinstance(fmt, str):
        for match in _WIDTHS.finditer(fmt):
            for number in match.groups():
                if number and (len(number) > 9 or int(number) > _budget().limits.output_chars):
                    raise TemplateLimitError("output_chars", _budget().limits.output_chars, f"a field width of {number}")


def _size(x: Any) -> int:
    """About how many characters ``str(x)`` has, found without making it (containers are added up)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple, set, frozenset)):
        return 2 + sum(_size(v) + 2 for v in x)
    if isinstance(x, dict):
        return 2 + sum(_size(k) + _size(v) + 4 for k, v in x.items())
    return len(str(x)) if isinstance(x, (int, float, bool)) or x is None else 64


def _width(v: Any) -> int:
    """An indent given as a number of spaces or as the text itself."""
    return v if isinstance(v, int) and not isinstance(v, bool) else len(str(v)) if v is not None else 0


def _replace_size(s: str, old: Any, new: Any) -> int:
    old, new = str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    return len(s) + hits * len(new)


def _join_size(items: list, sep: Any) -> int:
    return sum(_size(x) for x in items) + len(str(sep)) * max(len(items) - 1, 0)


def _indent_size(s: str, width: Any = 4, *_: Any, **__: Any) -> int:
    return len(s) + (s.count("\n") + 1) * max(_width(width), 0)


def _wordwrap_size(s: str, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *_: Any, **__: Any) -> int:
    return len(s) * (1 + len(str(wrapstring) if wrapstring is not None else "\n"))


def _padded_size(s: str, width: Any = 0, *_: Any, **__: Any) -> int:
    return max(len(s), int(width))


def _ints_fit(args: tuple, kwargs: dict) -> None:
    """A number given to a call or filter (a width, a count) may not exceed the output limit."""
    limit = _budget().limits.output_chars
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > limit:
            raise TemplateLimitError("output_chars", limit, f"a number argument of {v:,}")


# Filters whose output can be much larger than their input: the size they would make, from their arguments.
_FILTER_SIZE = {
    "replace": lambda s, old="", new="", *_, **__: _replace_size(str(s), old, new),
    "indent": lambda s, *a, **k: _indent_size(str(s), *a, **k),
    "wordwrap": lambda s, *a, **k: _wordwrap_size(str(s), *a, **k),
    "center": lambda s, width=80, *_, **__: _padded_size(str(s), width),
}


def _guard_filter(name: str, func):
    @wraps(func)  # keeps Jinja's pass_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        b = _budget()
        b.step()
        _ints_fit(args, kwargs)
        at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # a context or environment comes first
        value, rest = args[at], args[at + 1:]
        if name == "join":  # materialise once: its size is known before joining
            items = list(value)
            b.grow(_join_size(items, rest[0] if rest else kwargs.get("d", "")), "join")
            args = (*args[:at], items, *rest)
        elif name == "format":
            _check_widths(value)
        elif name == "tojson" and _width(kwargs.get("indent", rest[1] if len(rest) > 1 else None)) > 16:
            raise TemplateLimitError("output_chars", b.limits.output_chars, "tojson's indent is over 16")
        elif name in _FILTER_SIZE:
            b.grow(_FILTER_SIZE[name](value, *rest, **kwargs), name)
        return b.spend(func(*args, **kwargs))

    return guarded


# String methods whose output can be much larger than the string: their size from the string and arguments.
_METHOD_SIZE = {
    "replace": lambda s, old="", new="", *_: _replace_size(s, old, new),
    "expandtabs": lambda s, tabsize=8: len(s) * max(int(tabsize), 1),
    "center": _padded_size,
    "ljust": _padded_size,
    "rjust": _padded_size,
    "zfill": _padded_size,
}


def _steps(iterable: Any):
    b = _budget()
    for x in iterable:
        b.step()
        yield x


@jinja2.pass_context  # never folded at compile time: it must run inside the render's budget
def _loop_filter(context, iterable):
    return _steps(iterable)


class _Codegen(CodeGenerator):
    """Jinja's code generator, with ``a ~ b`` going through the environment (and so the budget)."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Generation(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text); here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _TemplateDict:
    """``dict`` as transformers gives it to templates: calling it and ``fromkeys``, nothing else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace`` as transformers gives it: no underscore-prefixed names."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - Jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the underscore-prefixed name {name!r}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 200 or re.search(r"%[-_0^#]*\d{3,}", fmt):
        raise TemplateLimitError("output_chars", _budget().limits.output_chars, "strftime_now's format is too wide")
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' tojson: plain JSON (Jinja's own escapes HTML characters)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with every render under a :class:`_Budget`."""

    code_generator_class = _Codegen
    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
        self.finalize = self._printed
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["_mechfix_steps"] = _loop_filter
        self.globals.pop("lipsum", None)  # paragraphs of filler on demand: no chat template needs them
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_Namespace)

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # every iteration of every loop costs a step
            loop.iter = nodes.Filter(loop.iter, "_mechfix_steps", [], [], None, None, lineno=loop.lineno)
        return tree

    def _printed(self, value: Any) -> Any:
        b = _budget()
        b.step()
        b.grow(_size(value), "a printed value")  # before Jinja turns it into text
        return value

    def bounded_concat(self, parts: tuple) -> str:
        b = _budget()
        b.step()
        b.grow(sum(_size(p) for p in parts), "~")  # before any part is turned into text
        return "".join(p if isinstance(p, str) else str(p) for p in parts)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().step()
        if isinstance(obj, str) and attribute in ("format", "format_map"):  # the sandbox wraps these: check here
            _check_widths(obj)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().step()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        b = _budget()
        b.step()
        lim = b.limits
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "*" and ints and left.bit_length() + right.bit_length() > lim.int_bits:
            raise TemplateLimitError("int_bits", lim.int_bits)
        if operator == "*" and not ints:
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                b.grow(len(seq) * max(n, 0), "*")
        if operator == "**" and ints and right > 0 and abs(left) > 1 and right * left.bit_length() > lim.int_bits:
            raise TemplateLimitError("int_bits", lim.int_bits)
        if operator == "%" and isinstance(left, str):  # widths in the pattern, and '*' widths among the values
            _check_widths(left)
            _ints_fit(right if isinstance(right, tuple) else (right,), {})
        return b.spend(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        b = _budget()
        b.step()
        _ints_fit(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:
                items = list(args[0])
                b.grow(_join_size(items, owner), "join")
                args = (items, *args[1:])
            elif name in _METHOD_SIZE:
                b.grow(_METHOD_SIZE[name](owner, *args, **kwargs), name)
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level: its iterations cost steps too
            args = (_steps(args[0]), *args[1:])
        return b.spend(super().call(__context, __obj, *args, **kwargs))


_ENV = LimitedEnvironment()


@lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def render(source: str, variables: dict[str, Any], limits: Limits = LIMITS) -> str:
    """Render a Jinja template under ``limits``.

    Args:
        source: The template's text.
        variables: What the template sees (plain data: strings, numbers, lists, dicts).
        limits: What the render may spend.

    Returns:
        The rendering.

    Raises:
        TemplateLimitError: When the render (or compiling it) goes over a limit.
        jinja2.TemplateError: When the template does not compile or fails (including its own raise_exception).
        Exception: Whatever else a template's operations raise (TypeError, RecursionError, ...).
    """
    with _spending(limits) as budget:
        template = _compiled(source)
        pieces: list[str] = []
        size = 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > limits.output_chars:
                raise TemplateLimitError("output_chars", limits.output_chars)
            budget.step()
            pieces.append(piece)
        return "".join(pieces)
