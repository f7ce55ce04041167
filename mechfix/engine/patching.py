"""Decision-position passes over a shared prefix: capture, patch and differentiate.

Patching a component at the decision position (the last prompt token) leaves
every earlier position unchanged. So each prompt is split into a *prefix*
(every token but the last), run once with its key/value cache kept, and a short
*tail* (the decision token, then the option tokens but the last) that is run
as often as needed on top of the cached prefix: once to capture activations,
once with gradients, once per patched component. A tail costs a few tokens
instead of a whole prompt.

Prefixes are padded on the left, so that every tail starts at the same cache
index; position ids are passed explicitly, so a padded prefix computes what it
would alone (the equality is tested against the model's own forward).

The rows, patches and outputs are :mod:`mechfix.engine.tails`; the passes run on the
model's backend (:mod:`mechfix.engine.backends`). Sites are the ones :mod:`mechfix.engine.batches` names: ``resid`` (decoder layer
output), ``heads`` (input of the attention output projection, per head) and
``mlp`` (MLP output).
"""

from __future__ import annotations

from collections.abc import Sequence

from mechfix.engine.backends import backend_of
from mechfix.engine.batches import SITES
from mechfix.engine.tails import Patch, Prefixes, Tail, TailOutput
from mechfix.models import LoadedModel


def encode_prefixes(lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> Prefixes:
    """Run every prompt but its last token, left-padded, and keep the cache.

    Args:
        lm: The model.
        prompts: Full prompts (the decision token last).
    """
    if min(len(p) - 1 for p in prompts) < 1:
        raise ValueError("a prompt needs at least two tokens (a prefix and the decision token)")
    return backend_of(lm).encode_prefixes(lm, prompts)


def run_tails(
    lm: LoadedModel,
    prefixes: Prefixes,
    tails: Sequence[Tail],
    *,
    patches: Sequence[Patch] = (),
    sites: Sequence[str] = SITES,
    grad: bool = False,
    attention: bool = False,
) -> TailOutput:
    """Run tails on top of cached prefixes, patching and capturing at the decision position.

    Args:
        lm: The model.
        prefixes: Cached prefixes; each tail names its row.
        tails: The rows to run.
        patches: Activations to overwrite at the decision position.
        sites: Sites to capture there.
        grad: Keep the graph, so that :func:`~mechfix.engine.tails.decision_grads` can differentiate the scores.
        attention: Also return the decision position's attention weights and values
            (runs the eager attention kernel).
    """
    return backend_of(lm).run_tails(lm, prefixes, tails, patches=patches, sites=sites, grad=grad, attention=attention)


def full_pass(lm: LoadedModel, rows: Sequence[Tail], sites: Sequence[str] = SITES) -> TailOutput:
    """Whole sequences (right-padded, no cache) with the graph kept at every position.

    Each row is a :class:`~mechfix.engine.tails.Tail` whose ``ids`` are the full sequence and whose
    target positions count from its start; ``prefix`` is ignored. Used where
    gradients at every position are needed (per-position attribution).
    """
    return backend_of(lm).full_pass(lm, rows, sites)
