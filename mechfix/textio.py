"""Reading the text files users give mechfix, with limits that hold before parsing goes far.

Every recipe, items file, decision file, transcript and capability task is
read through :func:`read_text` (a byte limit, UTF-8 with the file named when
it is not) and YAML through :func:`load_yaml` (no aliases, bounded nesting),
so no input can hang mechfix, exhaust its memory or end in a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mechfix.errors import BadInputError

# The largest text file mechfix reads (recipes, items, decisions, transcripts, capability tasks).
MAX_TEXT_BYTES = 64 * 2**20
# How deep mappings and lists may nest in a YAML or JSON file (recipes need fewer than ten levels).
MAX_DEPTH = 64
# The most characters one rendering of a user's template may have (a recipe's turn, a chat template's output):
# about four million tokens, more than any model reads, yet a bound on templates that multiply their input.
MAX_RENDER_CHARS = 16_000_000


def read_text(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES, error: type[BadInputError] = BadInputError) -> str:
    """A user's text file, decoded as UTF-8 (a byte-order mark is dropped).

    Args:
        path: The file.
        what: What it is, for messages ("recipe", "decision file").
        limit: The most bytes it may hold.
        error: The error raised (a subclass of BadInputError).

    Raises:
        BadInputError (or ``error``): When the file cannot be read, is larger than ``limit``, or is not UTF-8.
    """
    return decode_text(read_bytes(path, what, limit, error), path, what, error)


def read_bytes(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES, error: type[BadInputError] = BadInputError) -> bytes:
    """A user's file as bytes, refused when it holds more than ``limit`` (for a caller that also hashes them)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise error(f"{what} '{p}' is {size / 2**20:.1f} MiB, more than mechfix reads ({limit / 2**20:g} MiB). "
                        "Split it into smaller files.")
        return p.read_bytes()
    except OSError as exc:
        raise error(f"{what} '{p}' cannot be read ({exc.strerror or exc}). Check the path and its permissions.") from None


def decode_text(raw: bytes, path: str | Path, what: str, error: type[BadInputError] = BadInputError) -> str:
    """``raw`` (read from ``path``) as UTF-8 text, a byte-order mark dropped; the error names the file and line."""
    p = Path(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(
            f"{what} '{p}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}). Save it as UTF-8 "
            "(in most editors: Save As, encoding UTF-8)."
        ) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (whose expansion can grow exponentially) and deep nesting."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in mechfix files; write the value out in full", mark
            )
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def compose_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree (for line numbers) and the data it holds; raises ``yaml.YAMLError`` for bad YAML.

    Aliases are refused and nesting is bounded (:data:`MAX_DEPTH`), both as YAML errors with a position.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def load_yaml(text: str) -> Any:
    """The data in a YAML text, under the same limits as :func:`compose_yaml`."""
    return compose_yaml(text)[1]


def load_json(text: str) -> Any:
    """The data in a JSON text; nesting deeper than Python can parse is a ``json.JSONDecodeError``, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(f"nested more deeply than mechfix reads (over {MAX_DEPTH} levels)", text, 0) from None
