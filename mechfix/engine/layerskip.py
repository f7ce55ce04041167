"""Reuse the layers below a fix: they compute the same thing with and without it.

A fix that acts at decoder layer L and above (a heads edit at L, a vector on
L's output, a LoRA update of L's projections) leaves the output of layers
0 … L−1 unchanged. steer measures many fixes and strengths on the same
sequences, so it runs those layers once per batch and feeds their output
straight into layer L afterwards: while :meth:`LayerSkip.active`, the
first call on a batch runs every layer and keeps layer L−1's output; later
calls on the same batch (same input embeddings) skip layers 0 … L−1.

Batches are recognised by their input embeddings, so a caller must not run
the same token ids with another attention mask (mechfix pads on the right, so
the mask follows from the ids).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mechfix.models import LoadedModel


def first_layer(fixes: Sequence[Any]) -> int:
    """The lowest decoder layer any of these fixes edits (0 when one names no layer, or there are none).

    Everything below it computes the same with and without the fixes: the ``start`` of a :class:`LayerSkip`.
    A gated fix's probe reads its layer's real output, so that layer counts too.
    """
    def lowest(f: Any) -> int:
        gate = getattr(f, "gate", None)
        return min([*f.layers, *([gate.layer] if gate is not None else [])]) if f.layers else 0

    return min(lowest(f) for f in fixes) if fixes else 0


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    data = x.detach().contiguous().cpu()
    return (tuple(data.shape), str(data.dtype), hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest())


class LayerSkip:
    """The output of layers ``0 … start−1``, kept per batch.

    Args:
        lm: The model.
        start: The first layer that may differ (the lowest layer any fix measured with it touches).
    """

    def __init__(self, lm: LoadedModel, start: int):
        self.lm, self.start = lm, max(0, int(start))
        self.store: dict[tuple[Any, ...], torch.Tensor] = {}
        self.hits = 0

    @contextmanager
    def active(self) -> Iterator[LayerSkip]:
        """Skip layers ``0 … start−1`` for every batch seen before, inside the block."""
        if self.start == 0:
            yield self
            return
        layers = self.lm.layers[: self.start]
        state: dict[str, Any] = {"hit": False, "key": None, "tuple": False}

        def first(orig):
            def forward(*args, **kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                state["key"] = _key(h)
                cached = self.store.get(state["key"])
                state["hit"] = cached is not None
                if cached is not None:
                    self.hits += 1
                    return (cached,) if state["tuple"] else cached
                return after(orig, 0)(*args, **kwargs)
            return forward

        def after(orig, i):
            def forward(*args, **kwargs):
                if state["hit"]:
                    h = args[0] if args else kwargs["hidden_states"]
                    return (h,) if state["tuple"] else h
                out = orig(*args, **kwargs)
                if i == self.start - 1:
                    state["tuple"] = isinstance(out, tuple)
                    self.store[state["key"]] = (out[0] if state["tuple"] else out).detach()
                return out
            return forward

        saved = [layer.__dict__.get("forward") for layer in layers]
        try:
            for i, layer in enumerate(layers):
                orig = layer.forward
                layer.forward = first(orig) if i == 0 else after(orig, i)
            yield self
        finally:
            for layer, old in zip(layers, saved):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old
