"""Safe arithmetic for the state rules of live multi-round recipes.

A recipe never runs code. Its state rules (``stock: "max(0, stock - catch)"``)
are parsed with :mod:`ast` and evaluated by walking a small whitelist of node
types: numbers, names, ``+ - * / // %``, unary minus, and the functions in
:data:`FUNCTIONS`. Everything else (attributes, subscripts, lambdas, powers,
keywords, strings) is refused when the recipe is loaded.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping

from mechfix.errors import RecipeError

FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
}
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_LENGTH = 400
# A state value beyond this is a runaway rule (a growth with no cap), not a quantity.
MAX_MAGNITUDE = 1e12
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


class ExprError(ValueError):
    """An expression that cannot be parsed or evaluated; the message says why."""


def parse(text: str) -> ast.Expression:
    """Parse an expression and check that it only uses allowed syntax.

    Raises:
        ExprError: Naming the construct that is not allowed.
    """
    if len(text) > MAX_LENGTH:
        raise ExprError(f"it is {len(text)} characters long (at most {MAX_LENGTH})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"it is not an arithmetic expression ({exc.msg})") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load)) or type(node) in _BINARY or type(node) in _UNARY:
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ExprError(f"{node.value!r} is not a number")
        elif isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Name)):
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
                raise ExprError(f"the operator '{type(node.op).__name__}' is not allowed (use + - * / // %)")
            if isinstance(node, ast.UnaryOp) and type(node.op) not in _UNARY:
                raise ExprError(f"the operator '{type(node.op).__name__}' is not allowed")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise ExprError(f"only the functions {', '.join(FUNCTIONS)} can be called")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) or not node.args:
                raise ExprError(f"{node.func.id}() takes plain arguments")
        else:
            raise ExprError(f"'{ast.unparse(node)}' is not allowed: use numbers, names, + - * / // % and "
                            f"{', '.join(FUNCTIONS)}()")
    return tree


def names(tree: ast.Expression) -> set[str]:
    """The variable names an expression reads (function names excluded)."""
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called}


def evaluate(tree: ast.Expression, values: Mapping[str, float]) -> float:
    """Evaluate a parsed expression over numeric values.

    Raises:
        ExprError: For an unknown name, a division by zero or a runaway value.
    """

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise ExprError(f"'{node.id}' has no value here")
            return float(values[node.id])
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise ExprError(f"'{ast.unparse(node)}' divides by zero")
            return float(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return float(_UNARY[type(node.op)](ev(node.operand)))
        if isinstance(node, ast.Call):
            return float(FUNCTIONS[node.func.id](*(ev(a) for a in node.args)))
        raise ExprError(f"'{ast.unparse(node)}' is not allowed")  # parse() keeps this unreachable

    out = ev(tree)
    if not math.isfinite(out) or abs(out) > MAX_MAGNITUDE:
        raise ExprError(f"the value {out:g} is out of range (more than {MAX_MAGNITUDE:g} in size)")
    return out


def to_number(text: str) -> float | None:
    """A text as a number (``"1,200"`` and ``"3.5"`` included), or None."""
    t = text.strip()
    m = NUMBER.fullmatch(t)
    return float(t.replace(",", "")) if m else None


def first_number(text: str) -> float | None:
    """The first number written in a text (``"I'm taking 1,200 tonnes"`` → 1200.0), or None."""
    m = NUMBER.search(text)
    return float(m.group(0).replace(",", "")) if m else None


def fmt(x: float) -> str:
    """A state value as the text placeholders show: ``5``, not ``5.0``; at most two decimals."""
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def compile_rule(text: str, where: str) -> ast.Expression:
    """:func:`parse`, its error turned into a :class:`RecipeError` that names ``where``."""
    try:
        return parse(text)
    except ExprError as exc:
        raise RecipeError(f"{where}: the rule '{text}' cannot be used: {exc}. Recipes allow only arithmetic.") from None
