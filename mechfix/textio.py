"""Reading the text files users give mechfix, with limits that hold before parsing goes far; writing files whole.

Every recipe, items file, decision file, transcript and capability task is
read through :func:`read_text` (a byte limit, UTF-8 with the file named when
it is not) and YAML through :func:`load_yaml` (no aliases, bounded nesting),
so no input can hang mechfix, exhaust its memory or end in a traceback.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def clean_nan(x: Any) -> Any:
    """JSON has no NaN: ``None`` for every non-finite float in nested dicts and lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean_nan(v) for v in x]
    return x


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def json_text(obj: Any) -> str:
    """The JSON mechfix prints and saves: indented, paths as text, no NaN allowed (see :func:`clean_nan`)."""
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False)


def publish_mode(path: str | Path, mode: int = 0o666) -> None:
    """Give a finished temporary file (or, with ``mode=0o777``, folder) the permissions a plain
    ``open()`` (or ``mkdir``) would; mkstemp and mkdtemp make them private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)

@contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file beside ``path`` to write into; renamed onto ``path`` only if the block succeeds.

    On any failure (including Ctrl-C) the temporary file is removed, so nothing
    half-written is ever left. The finished file gets ordinary permissions.

    Args:
        path: The final file.
        suffix: Suffix of the temporary file (some writers pick the format from it).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary file renamed into place)."""
    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
