"""What a backend is: the forward passes mechfix needs, behind one interface.

A backend runs the model's passes one way: :mod:`~mechfix.engine.backends.hooks`
with PyTorch hooks on the local model, :mod:`~mechfix.engine.backends.nnsight`
as nnsight traces (locally, or on NDIF with ``--remote``). Every stage reaches
the model through :mod:`mechfix.engine.forward`, :mod:`mechfix.engine.patching`
and :mod:`mechfix.measure.evaluate`, which call the model's backend
(:func:`mechfix.engine.backends.backend_of`) and never ask which one it is.

A third backend implements this protocol in its own module and adds one row to
:data:`mechfix.engine.backends.BACKENDS`; the conformance tests
(``tests/test_backends.py``) then run it through the same checks as the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from mechfix.engine.batches import Capture, Row
from mechfix.engine.tails import Patch, Prefixes, Tail, TailOutput
from mechfix.models import LoadedModel

# What a batch pass returns: (batch row, option) of each scored token, its log-probability, and the captured
# sites (site to ``[b, L, ...]``, or per kept row ``[T, L, ...]`` when every position is captured).
BatchOutput = tuple[list[tuple[int, int]], torch.Tensor, dict[str, object]]


class Backend(Protocol):
    """The passes of one way of running a model.

    Attributes:
        name: What ``--backend`` calls it.
        kl_terms_only: KL on neutral text leaves a pass only as the cached terms of
            :mod:`mechfix.engine.kl` (a full-vocabulary distribution per position
            would not travel back from a remote trace), so it is always computed that way.
    """

    name: str
    kl_terms_only: bool

    def attach(self, lm: LoadedModel) -> None:
        """Make ``lm`` ready for this backend's passes (build its wrapper, say); called when it is chosen."""
        ...

    def request_pass(self, lm: LoadedModel, batch: Sequence[Row], ids: torch.Tensor, mask: torch.Tensor,
                     capture: Capture) -> BatchOutput:
        """Score a padded batch of rows and keep the sites ``capture`` names (see :func:`mechfix.engine.forward.run_requests`)."""
        ...

    def encode_prefixes(self, lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> Prefixes:
        """Prefixes (every prompt but its last token) to run tails on (see :func:`mechfix.engine.patching.encode_prefixes`)."""
        ...

    def run_tails(self, lm: LoadedModel, prefixes: Prefixes, tails: Sequence[Tail], *, patches: Sequence[Patch],
                  sites: Sequence[str], grad: bool, attention: bool) -> TailOutput:
        """Tails on their prefixes, patched and captured at the decision position (see :func:`mechfix.engine.patching.run_tails`)."""
        ...

    def full_pass(self, lm: LoadedModel, rows: Sequence[Tail], sites: Sequence[str]) -> TailOutput:
        """Whole sequences with gradients at every position (see :func:`mechfix.engine.patching.full_pass`)."""
        ...

    def kl_base(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfixed model's KL terms ``(c, e)`` of one neutral batch (:func:`mechfix.engine.kl.kl_base_terms`)."""
        ...

    def kl_fixed(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice, c: torch.Tensor,
                 e: torch.Tensor) -> float:
        """Summed KL over one neutral batch with the fix's edits on (:func:`mechfix.engine.kl.kl_sum`)."""
        ...
