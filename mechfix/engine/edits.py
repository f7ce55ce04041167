"""Where a fix's edits go: PyTorch hooks on the model, or edits every nnsight trace applies.

A fix edits the forward pass through hooks (:mod:`mechfix.fixes.fix`). Locally they
are PyTorch hooks, and every pass, traced or not, runs them. A model on NDIF is
not here to hook: with ``lm.edits_in_traces`` the same hook functions are kept
as :class:`Edit` records instead, and each trace applies them at their module,
in forward order (:mod:`mechfix.engine.backends.nnsight`), so the edit travels with the trace.
A pass that is not a trace cannot apply them, and refuses to run while any
are pending (:func:`check_plain_pass`) rather than measure the unfixed model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mechfix.errors import BadInputError
from mechfix.models import LoadedModel


@dataclass(eq=False)
class Edit:
    """A hook kept for traces: ``hook(module, args)`` before ``module`` (``pre``), else ``hook(module, args, out)``."""

    module: torch.nn.Module
    hook: Callable[..., Any]
    pre: bool


class _Handle:
    """Removes an :class:`Edit`, like a PyTorch hook handle."""

    def __init__(self, edits: list, edit: Edit):
        self.edits, self.edit = edits, edit

    def remove(self) -> None:
        if self.edit in self.edits:
            self.edits.remove(self.edit)


def add_hook(lm: LoadedModel, module: torch.nn.Module, hook: Callable[..., Any], *, pre: bool = False) -> Any:
    """Put an edit on ``module``: a PyTorch hook, or an :class:`Edit` for traces; returns a handle with ``remove()``."""
    if lm.edits_in_traces:
        edit = Edit(module, hook, pre)
        lm.edits.append(edit)
        return _Handle(lm.edits, edit)
    return module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)


def check_plain_pass(lm: LoadedModel, what: str) -> None:
    """Refuse a pass that is not a trace where it could not be right: on a remote model, or with edits pending.

    Raises:
        BadInputError: Naming the pass.
    """
    if lm.remote or lm.edits:
        raise BadInputError(
            f"{what} runs the model outside an nnsight trace, which a model on NDIF (--remote) cannot do"
            + (" with a fix's edits applied" if lm.edits else "")
            + ". Run this step where the weights are (for example on a GPU with --device-map auto)."
        )
