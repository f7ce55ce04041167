"""Error types that map onto the CLI's exit codes.

Stages raise these; only the CLI turns them into exit codes and messages, so
library users get ordinary exceptions.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 3
EXIT_INTERRUPTED = 130


class MechfixError(Exception):
    """Base class for every error mechfix raises on purpose."""

    exit_code = EXIT_FAILURE


class BadInputError(MechfixError, ValueError):
    """The user gave something mechfix cannot use (exit code 2).

    The message is one paragraph that names the problem and the fix.
    """

    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInputError):
    """A recipe is malformed; the message names the file, line and key."""


class ArtifactError(BadInputError):
    """An artifact is missing, corrupt, of the wrong kind or from another model."""


class ModelLoadError(BadInputError):
    """A model could not be found or loaded."""


class GateError(MechfixError):
    """A result fell outside what was asked for (exit code 1): a verify gate, or a steer budget.

    Attributes:
        detail: The measured result, for the caller to show next to the message.
    """

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, detail: object = None):
        super().__init__(message)
        self.detail = detail
