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

Training a LoRA fix draws another sample of the same sequences every step, so
no batch repeats; :class:`RowSkip` keeps layer L−1's output per *sequence*
instead and assembles each batch from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mechfix.engine.batches import final_hidden, pad_batch, running_batch
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


class _Kept:
    """What both kinds of skipping share: the model, the first layer that may differ, the store and its hits."""

    def __init__(self, lm: LoadedModel, start: int):
        self.lm, self.start = lm, max(0, int(start))
        self.store: dict[tuple[Any, ...], torch.Tensor] = {}
        self.hits = 0

    def _hit(self) -> None:
        self.hits += 1


class LayerSkip(_Kept):
    """The output of layers ``0 … start−1``, kept per batch.

    Args:
        lm: The model.
        start: The first layer that may differ (the lowest layer any fix measured with it touches).
    """

    @contextmanager
    def active(self) -> Iterator[LayerSkip]:
        """Skip layers ``0 … start−1`` for every batch seen before, inside the block."""
        state: dict[str, Any] = {"key": None}

        def lookup(h: torch.Tensor) -> torch.Tensor | None:
            state["key"] = _key(h)
            return self.store.get(state["key"])

        def keep(out: torch.Tensor) -> None:
            self.store[state["key"]] = out.detach()

        with _skipping(self.lm, self.start, lookup, keep, self._hit):
            yield self


class _Warmed(Exception):
    """Ends a pass once layer ``start − 1`` has run: :meth:`RowSkip.warm` needs nothing above it."""


class RowSkip(_Kept):
    """The output of layers ``0 … start−1`` kept per sequence, reused in batches of any make-up.

    Under right padding and a causal mask a row computes what it would alone,
    so a sequence's lower layers give the same output in any batch (to float
    rounding: another batch width is another matrix shape). Only passes that
    :func:`~mechfix.engine.batches.final_hidden` runs are skipped, since it
    names the batch's rows; a batch with a row not kept runs whole.

    Args:
        lm: The model.
        start: The first layer that may differ (the lowest layer an adapter in training touches).
    """

    def __init__(self, lm: LoadedModel, start: int):
        super().__init__(lm, start)
        self._warming = False

    def _rows(self, h: torch.Tensor) -> list[tuple[tuple[int, ...], int]] | None:
        """Each row's token ids and length, when the running batch is this pass's and padded on the right."""
        batch = running_batch()
        if batch is None or tuple(batch[0].shape) != tuple(h.shape[:2]):
            return None
        ids, mask = batch
        lengths = mask.sum(1).tolist()
        if any(not bool(mask[b, :n].all()) for b, n in enumerate(lengths)):
            return None  # left padding: positions would differ from a row run alone
        return [(tuple(ids[b, :n].tolist()), n) for b, n in enumerate(lengths)]

    @contextmanager
    def active(self) -> Iterator[RowSkip]:
        """Skip layers ``0 … start−1`` for every batch whose sequences are all kept, inside the block."""
        state: dict[str, Any] = {"rows": None}

        def lookup(h: torch.Tensor) -> torch.Tensor | None:
            rows = state["rows"] = self._rows(h)
            if rows is None or not all(k in self.store for k, _ in rows):
                return None
            out = h.new_zeros(h.shape)  # a pad position's value reaches no real position
            for b, (k, n) in enumerate(rows):
                out[b, :n] = self.store[k]
            return out

        def keep(out: torch.Tensor) -> None:
            for b, (k, n) in enumerate(state["rows"] or ()):
                self.store.setdefault(k, out[b, :n].detach().clone())
            if self._warming:
                raise _Warmed

        with _skipping(self.lm, self.start, lookup, keep, self._hit):
            yield self

    def warm(self, seqs: Sequence[Sequence[int]], size: int = 8) -> None:
        """Run layers ``0 … start−1`` once on every sequence not kept yet (inside :meth:`active`), ``size`` at a time."""
        todo = list(dict.fromkeys(tuple(x) for x in seqs if tuple(x) not in self.store))
        if self.start == 0 or not todo:
            return
        self._warming = True
        try:
            with torch.no_grad():  # not inference_mode: the kept tensors feed passes that train
                for lo in range(0, len(todo), size):
                    try:
                        final_hidden(self.lm, *pad_batch(self.lm, todo[lo: lo + size]))
                    except _Warmed:
                        pass
        finally:
            self._warming = False


# Whether a decoder layer class returns a tuple (older transformers) or the hidden states alone: learnt from the
# first pass that runs it, since a skipped layer must answer in the same shape.
_RETURNS_TUPLE: dict[type, bool] = {}


@contextmanager
def _skipping(lm: LoadedModel, start: int, lookup: Callable[[torch.Tensor], torch.Tensor | None],
              keep: Callable[[torch.Tensor], None], on_hit: Callable[[], None]) -> Iterator[None]:
    """Layers ``0 … start−1`` answer from ``lookup`` (given layer 0's input) when it has their output, else run
    and hand layer ``start − 1``'s output to ``keep``."""
    if start == 0:
        yield
        return
    layers = lm.layers[:start]
    kind = type(layers[start - 1])
    state: dict[str, Any] = {"hit": False}

    def first(orig):
        def forward(*args, **kwargs):
            cached = lookup(args[0] if args else kwargs["hidden_states"])
            state["hit"] = cached is not None and kind in _RETURNS_TUPLE
            if state["hit"]:
                on_hit()
                return (cached,) if _RETURNS_TUPLE[kind] else cached
            return after(orig, 0)(*args, **kwargs)
        return forward

    def after(orig, i):
        def forward(*args, **kwargs):
            if state["hit"]:
                h = args[0] if args else kwargs["hidden_states"]
                return (h,) if _RETURNS_TUPLE[kind] else h
            out = orig(*args, **kwargs)
            if i == start - 1:
                _RETURNS_TUPLE[kind] = isinstance(out, tuple)
                keep(out[0] if _RETURNS_TUPLE[kind] else out)
            return out
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            orig = layer.forward
            layer.forward = first(orig) if i == 0 else after(orig, i)
        yield
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old
