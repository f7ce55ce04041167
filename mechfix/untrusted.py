"""Text that others wrote, shown and used safely: one rule for each way it leaves mechfix.

Everything mechfix reads may be hostile: what agents wrote in a transcript,
the names in a recipe, the metadata of an artifact or adapter from someone
else. Such text

- is shown with its control characters made visible (:func:`visible`): an
  escape sequence in a transcript must not clear the terminal, retitle the
  window or plant a link, and a bidirectional override must not reorder what
  a reader sees;
- never becomes a path: a file name built from it is reduced to a safe base
  name (:func:`file_stem`) and put inside the folder the user chose
  (:func:`inside`).

(The terminal's markup is escaped where it is printed, in the CLI; pages
escape their HTML through Jinja's autoescaping.)
"""

from __future__ import annotations

import re
from pathlib import Path

from mechfix.errors import BadInputError

# C0 controls but newline and tab, DEL, C1 controls, and the invisible marks that reorder or hide text.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_MAX = 100


def visible(text: object) -> str:
    """``text`` with every control character written out (``\\x1b``, ``\\u202e``); newlines and tabs kept."""
    s = str(text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", s)


def file_stem(name: object, fallback: str = "mechfix") -> str:
    """A name from data (a recipe's name in an artifact) reduced to a safe base name for a file.

    Only letters, digits, ``.``, ``_`` and ``-`` are kept (runs of anything else
    become ``_``); leading dots and dashes go (no hidden files, no options), and
    the result is at most 100 characters. ``../../x`` becomes ``x``, ``/etc/cron.d``
    becomes ``etc_cron.d``.
    """
    stem = re.sub(r"^[._-]+", "", _UNSAFE_NAME.sub("_", str(name)))[:_STEM_MAX].rstrip("_")
    return stem or fallback


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless it is a plain file name directly inside ``folder``.

    Raises:
        BadInputError: When ``name`` is not a plain base name (a separator, ``..``, an absolute path).
    """
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or path.parent != folder:
        raise BadInputError(f"'{visible(name)}' is not a plain file name, so mechfix will not write it into '{folder}'.")
    return path
