"""The command-line reference, written from the Typer app itself: one Markdown page per command.

The pages in ``docs/reference/cli/`` are this module's output, committed so
that the manual builds without running mechfix; a test fails when they differ
from what the app says now. Write them anew with::

    python -m mechfix.cli.reference docs/reference/cli
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import typer

from mechfix.cli import COMMANDS, app

_DEFAULT_PANEL = "Options"
_NOTICE = "<!-- Written by `python -m mechfix.cli.reference docs/reference/cli` from the command's own --help; do not edit. -->\n\n"


def _cell(text: str) -> str:
    # A table cell: one line, and a pipe would end it.
    return " ".join(text.split()).replace("|", "\\|")


def _contexts() -> tuple[Any, dict[str, Any]]:
    group = typer.main.get_command(app)
    parent = group.make_context("mechfix", [], resilient_parsing=True)
    return group, {name: group.commands[name].make_context(name, [], resilient_parsing=True, parent=parent)
                   for name in COMMANDS}


def _paragraphs(help_text: str) -> tuple[str, str]:
    """The summary line, and the rest of a command's help as Markdown paragraphs."""
    parts = [" ".join(p.split()) for p in help_text.strip().split("\n\n") if p.strip()]
    return (parts[0] if parts else ""), "\n\n".join(parts[1:])


def _examples(epilog: str | None) -> list[str]:
    """The epilog's example commands, a trailing ``(note)`` written as a shell comment so the lines can be pasted."""
    lines = [line.strip() for line in (epilog or "").splitlines()]
    return [re.sub(r"\s{2,}\((.*)\)$", r"   # \1", line) for line in lines if line.startswith("mechfix ")]


def command_page(name: str, contexts: dict[str, Any] | None = None) -> str:
    """The reference page of one command: summary, usage, description, arguments, options by panel, examples.

    Args:
        name: A command of :data:`mechfix.cli.COMMANDS`.
        contexts: Every command's parsing context (:func:`pages` makes them once for all pages).

    Returns:
        Markdown text.
    """
    ctx = (contexts or _contexts()[1])[name]
    cmd = ctx.command
    summary, rest = _paragraphs(cmd.help or "")
    out = [f"# `mechfix {name}`\n\n", _NOTICE, f"{summary}\n\n", "```text\n", cmd.get_usage(ctx).strip(), "\n```\n\n"]
    if rest:
        out.append(f"{rest}\n\n")
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    if args:
        out.append("## Arguments\n\n| argument | what it is |\n|---|---|\n")
        for p in args:
            record = p.get_help_record(ctx)
            out.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |\n")
        out.append("\n")
    panels: dict[str, list[tuple[str, str]]] = {}
    for p in cmd.params:
        if p.param_type_name != "option" or p.hidden:
            continue
        record = p.get_help_record(ctx)
        if record is None:
            continue
        panels.setdefault(getattr(p, "rich_help_panel", None) or _DEFAULT_PANEL, []).append(record)
    for panel, records in panels.items():
        out.append(f"## {panel}\n\n| option | what it does |\n|---|---|\n")
        out.extend(f"| `{_cell(opts)}` | {_cell(text)} |\n" for opts, text in records)
        out.append("\n")
    examples = _examples(cmd.epilog)
    if examples:
        out.append("## Examples\n\n```bash\n" + "\n".join(examples) + "\n```\n")
    return "".join(out).rstrip("\n") + "\n"


def index_page(group: Any = None, contexts: dict[str, Any] | None = None) -> str:
    """The reference's index: every command with its summary line, linking to its page."""
    if group is None or contexts is None:
        group, contexts = _contexts()
    rows = "".join(f"| [`mechfix {n}`]({n}.md) | {_cell(_paragraphs(contexts[n].command.help or '')[0])} |\n"
                   for n in COMMANDS)
    return (f"# Command reference\n\n{_NOTICE}{_cell(_paragraphs(group.help or '')[0])}\n\n"
            f"| command | what it does |\n|---|---|\n{rows}")


def pages() -> dict[str, str]:
    """Every page of the reference, by file name."""
    group, contexts = _contexts()
    return {"index.md": index_page(group, contexts), **{f"{n}.md": command_page(n, contexts) for n in COMMANDS}}


def main(argv: list[str] | None = None) -> int:
    """Write the pages into the folder given (created if missing); files of other names are left alone."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mechfix.cli.reference FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    folder.mkdir(parents=True, exist_ok=True)
    made = pages()
    for name, text in made.items():
        (folder / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(made)} pages to {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
