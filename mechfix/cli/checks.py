"""Every path a command reads or writes, checked in one place before any work starts.

A command calls :func:`check_paths` once, with its inputs and outputs named
as the user wrote them (``--out``, ``--fix``, the RECORDING argument), before
it loads a model or creates anything. The checks:

- an input exists and can be read;
- an output's name fits the file system (each part at most ``NAME_MAX`` bytes,
  the whole at most ``PATH_MAX``), it is not empty, and the nearest folder that
  already exists above it is a folder that can be written (``run --out a/b``
  creates ``a/b`` only after every check has passed);
- an output file is not a folder, and a folder output (a LoRA fix, replaced as
  a whole) is not a file;
- no output is one of the inputs, lies inside an input folder, or holds an
  input (a folder output is replaced whole); no two outputs are the same.

Each failure is a :class:`~mechfix.errors.BadInputError` (exit 2) that names
the option and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mechfix.errors import BadInputError

# Used where the file system does not say (os.pathconf is missing or fails).
_NAME_MAX, _PATH_MAX = 255, 4096


def check_paths(
    inputs: Mapping[str, Path | str | None] | None = None,
    outputs: Mapping[str, Path | str | None] | None = None,
    folders: Mapping[str, Path | str | None] | None = None,
    either: Mapping[str, Path | str | None] | None = None,
) -> None:
    """Check a command's paths before any work; raise on the first problem.

    Args:
        inputs: Files the command reads, by the name the user knows them by
            (``"RECORDING"``, ``"--neutral"``); None values are skipped.
        outputs: Files the command writes, by name (``"--out"``, ``"--junit"``).
        folders: Folders the command writes and replaces whole (a LoRA fix), by name.
        either: Inputs that may be a file or a folder (a fix: a LoRA fix is a folder; capability tasks).

    Raises:
        BadInputError: Naming the option, the path and the fix.
    """
    files_in = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
    ins = {**files_in, **{k: Path(v) for k, v in (either or {}).items() if v is not None}}
    outs = {k: _path(k, v) for k, v in (outputs or {}).items() if v is not None}
    dirs = {k: _path(k, v) for k, v in (folders or {}).items() if v is not None}
    for name, p in ins.items():
        _readable(name, p)
        if name in files_in and p.is_dir():
            raise BadInputError(f"{name} '{p}' is a folder; give a file.")
    for name, p in {**outs, **dirs}.items():
        _fits(name, p)
        _writable_place(name, p)
    for name, p in outs.items():
        if p.is_dir():
            raise BadInputError(f"{name} '{p}' is a folder; give a file name such as {p / 'out.safetensors'}.")
    for name, p in dirs.items():
        if p.exists() and not p.is_dir():
            raise BadInputError(f"{name} '{p}' is a file, but this output is a folder. Give a folder name that is free.")
    _no_collisions(ins, outs, dirs)


def named(option: str, values: Sequence[Path | str] | None, skip: str | None = None) -> dict[str, Path]:
    """A repeatable option's paths for :func:`check_paths`, each named by the option and its value (``skip``: a keyword, not a path)."""
    return {f"{option} {v}": Path(v) for v in values or [] if str(v) != skip}


def _path(name: str, value: Path | str) -> Path:
    if not str(value).strip():
        raise BadInputError(f"{name} is empty; give a file name.")
    return Path(value)


def _readable(name: str, p: Path) -> None:
    if not p.exists():
        raise BadInputError(f"{name} '{p}' does not exist. Check the path (it is relative to {Path.cwd()}).")
    want = os.R_OK | (os.X_OK if p.is_dir() else 0)
    if not os.access(p, want):
        raise BadInputError(f"{name} '{p}' cannot be read (permission denied). Fix its permissions or copy it somewhere readable.")


def _limit(p: Path, key: str, default: int) -> int:
    try:
        return int(os.pathconf(p, key))
    except (OSError, ValueError, AttributeError):
        return default


def _existing_ancestor(p: Path) -> Path:
    """The nearest path above ``p`` (``p`` excluded) that exists."""
    q = p.absolute().parent
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def _fits(name: str, p: Path) -> None:
    base = _existing_ancestor(p)
    name_max = _limit(base, "PC_NAME_MAX", _NAME_MAX)
    path_max = _limit(base, "PC_PATH_MAX", _PATH_MAX)
    for part in p.parts:
        if len(os.fsencode(part)) > name_max:
            raise BadInputError(
                f"{name}: the name '{part[:40]}…' is {len(os.fsencode(part))} bytes, longer than the file system allows "
                f"({name_max}). Choose a shorter name."
            )
    if len(os.fsencode(str(p.absolute()))) >= path_max:
        raise BadInputError(f"{name}: the path '{p}' is longer than the file system allows ({path_max} bytes). Choose a shorter one.")


def _writable_place(name: str, p: Path) -> None:
    base = _existing_ancestor(p)
    if not base.is_dir():
        raise BadInputError(f"cannot write {name} '{p}': '{base}' is a file, not a folder. Choose another {name}.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write {name} '{p}': the folder '{base}' is not writable. Choose another {name}.")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _no_collisions(ins: dict[str, Path], outs: dict[str, Path], dirs: dict[str, Path]) -> None:
    real = lambda p: Path(os.path.realpath(p))  # noqa: E731 - symlinks and ".." resolved, missing parts kept
    written = {name: real(p) for name, p in {**outs, **dirs}.items()}
    for in_name, q in ins.items():
        rq = real(q)
        for out_name, rp in written.items():
            if rp == rq:
                raise BadInputError(
                    f"{out_name} '{outs.get(out_name, dirs.get(out_name))}' is the same file as {in_name}: writing it would "
                    f"destroy the input. Choose another {out_name}."
                )
            if rq.is_dir() and _inside(rp, rq):
                raise BadInputError(
                    f"{out_name} '{outs.get(out_name, dirs.get(out_name))}' lies inside {in_name} '{q}', which the command "
                    f"reads. Write it somewhere else."
                )
            if out_name in dirs and _inside(rq, rp):
                raise BadInputError(
                    f"{out_name} '{dirs[out_name]}' holds {in_name} '{q}', and the folder is replaced whole when it is "
                    f"written. Choose another {out_name}."
                )
    seen: dict[Path, str] = {}
    for name, rp in written.items():
        if rp in seen:
            raise BadInputError(f"{name} and {seen[rp]} name the same file '{rp}'; give them different names.")
        seen[rp] = name
