"""The ``mechfix`` command line: thin commands that load, call a stage, save and print.

One module per command (``record``, ``attribute``, ``show``, ``recipes``,
``steer``, ``verify``, ``run``, ``monitor``, ``export``, ``report``), the options and helpers they share
in :mod:`mechfix.cli.common`, option groups in :mod:`mechfix.cli.options`, the tables they print in
:mod:`mechfix.cli.views`. Each command calls the library (:mod:`mechfix.stages.pipeline`).

Conventions: ``--json`` prints one JSON object on stdout; progress and prose go
to stderr. Exit codes: 0 ok, 1 a verify gate failed, 2 bad input or usage,
3 any other failure, 130 interrupted. Heavy libraries (torch, transformers) are
imported inside commands so that ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from mechfix.cli.common import DEBUG, app, err, shown
from mechfix.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, MechfixError

# Each command module registers its command on the app when imported, in the order of `mechfix --help`.
COMMANDS = ("record", "attribute", "show", "recipes", "steer", "verify", "run", "monitor", "export", "report")
for _name in COMMANDS:
    importlib.import_module(f"mechfix.cli.{_name}")

__all__ = ["app", "main"]


def _click_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes: newer typer vendors click as ``typer._click``."""
    import click

    exc, abort = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer import _click  # type: ignore[attr-defined]
        from typer import exceptions as typer_exceptions

        exc.append(_click.exceptions.ClickException)
        abort.append(typer_exceptions.Abort)
    except (ImportError, AttributeError):
        pass
    return tuple(exc), tuple(abort)


def _error(message: str) -> None:
    # soft_wrap: no hard line breaks, so messages stay whole in logs and greps.
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True, markup=True)


def unexpected(exc: BaseException, argv: list[str]) -> str:
    """The one line an unexpected failure gets; its traceback goes to a file (and to stderr with --debug).

    The line names the command, the failure, the files the command was given
    (what was being read or made), and where the traceback is.
    """
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    if DEBUG["on"] or os.environ.get("MECHFIX_DEBUG") == "1":
        sys.stderr.write(text)
    folder = Path(os.environ.get("MECHFIX_CACHE") or tempfile.gettempdir())
    where = "not written"
    try:
        fd, name = tempfile.mkstemp(prefix=f"mechfix-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".traceback.txt", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"mechfix {' '.join(argv)}\n\n{text}")
        where = name
    except OSError:
        pass
    command = next((a for a in argv if not a.startswith("-")), "")
    inputs = [a for a in argv if not a.startswith("-") and a != command and Path(a).exists()]
    involved = f" (given {', '.join(inputs)})" if inputs else ""
    return (f"unexpected failure in `mechfix {command}`{involved}: {type(exc).__name__}: {str(exc)[:300]}. This is a bug "
            f"in mechfix, not in your input; the full traceback is in {where} (run with --debug to print it here). "
            "Please report it with that file.")


def main() -> None:
    """Entry point: run the app and map errors to the documented exit codes."""
    click_errors, aborts = _click_classes()
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, *aborts):
        _error("interrupted; nothing was written.")
        sys.exit(EXIT_INTERRUPTED)
    except click_errors as exc:
        exc.show(file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except MechfixError as exc:  # BadInputError and its kinds carry exit code 2
        _error(shown(str(exc)))
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last resort: exit 3, one line, the traceback in a file
        _error(shown(unexpected(exc, sys.argv[1:])))
        sys.exit(EXIT_FAILURE)
    if code == EXIT_INTERRUPTED:
        # typer turns Ctrl-C into a plain exit code 130, so say it here.
        _error("interrupted; nothing was written.")
    sys.exit(code if isinstance(code, int) else 0)
