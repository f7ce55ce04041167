"""Tails on cached prefixes: the rows of decision-position passes, their patches, scores and gradients.

The pieces every backend shares for :mod:`mechfix.engine.patching` (see there
for the prefix/tail split): the row types, their inputs on a cached prefix,
their scores, the hooks that patch and capture at the decision position, and
the decision position's attention.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mechfix.engine.batches import pad_batch
from mechfix.models import LoadedModel


@dataclass
class Prefixes:
    """The key/value cache of a batch of left-padded prefixes.

    Attributes:
        cache: The model's cache object, batch ``B``.
        mask: ``[B, Tp]`` attention mask (0 on the left padding).
        lengths: Real prefix length of each row.
        width: ``Tp``, the padded length.
        prompts: The full prompts (kept by the nnsight backend, whose remote tails
            rerun their prefix: there ``cache`` and ``mask`` are None).
        row_cost: Bytes a tail row costs when there is no cache to measure.
    """

    cache: Any
    mask: torch.Tensor | None
    lengths: list[int]
    width: int
    prompts: list[list[int]] | None = None
    row_cost: int = 0

    def row_bytes(self) -> int:
        """Memory one row of the cache takes (for chunking tails)."""
        if self.cache is None:
            return self.row_cost
        total = 0
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                total += t[0].numel() * t.element_size()
        return total

@dataclass
class Tail:
    """One sequence run on top of a cached prefix.

    Attributes:
        prefix: Row of the prefix batch it continues.
        ids: The decision token, then option tokens (all but the last).
        start: Absolute position of ``ids[0]`` (the prompt length minus one).
        targets: ``(sign, tail position, token id)`` of each scored token; the
            row's score is the signed sum of their log-probabilities.
    """

    prefix: int
    ids: list[int]
    start: int
    targets: list[tuple[float, int, int]] = field(default_factory=list)

@dataclass
class Patch:
    """Set one site's activation at the decision position of some tail rows.

    Attributes:
        site: ``resid``, ``heads`` or ``mlp``.
        layer: Decoder layer.
        rows: ``[n]`` tail rows to patch.
        values: ``[n, ...]`` new values (``[n, dh]`` for one head, ``[n, H, dh]``
            for all heads of the layer, ``[n, d]`` for resid and mlp).
        heads: ``[n]`` head per row for single-head patches, else None.
    """

    site: str
    layer: int
    rows: torch.Tensor
    values: torch.Tensor
    heads: torch.Tensor | None = None

@dataclass
class TailOutput:
    """What a tail pass returns.

    Attributes:
        scores: ``[R]`` signed sum of target log-probabilities per row
            (differentiable when the pass kept gradients).
        acts: Site to ``[R, L, ...]`` activations at the decision position (detached).
        live: Site to per-layer full activations ``[R, t, ...]`` with their graph
            (only when the pass kept gradients), for :func:`decision_grads`.
        attention: Per layer, ``(weights [R, H, K], values [R, KV, K, dh], token [R, K])``:
            the decision position's attention over its K visible key positions,
            their value vectors, and the prompt index of each key (-1 for padding);
            None when the backend cannot return them.
        grads: Gradients of the summed scores, computed in the pass (the nnsight
            backend, where no graph outlives a trace): what :func:`decision_grads` returns.
        seq_acts: Site to ``[R, L, T, ...]`` activations at every position (:func:`full_pass`;
            heads not split).
    """

    scores: torch.Tensor
    acts: dict[str, torch.Tensor]
    live: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    attention: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    grads: dict[str, torch.Tensor] | None = None
    seq_acts: dict[str, torch.Tensor] = field(default_factory=dict)

def tails_for(prompt: Sequence[int], options: Sequence[Sequence[int]], prefix: int) -> list[Tail]:
    """Tails that score ``options[1] - options[0]`` (misaligned minus aligned) after ``prompt``.

    Options sharing their leading tokens share a tail (single-token options
    need one tail for both).
    """
    if len(prompt) < 2:
        raise ValueError("a prompt needs at least two tokens (a prefix and the decision token)")
    tails: dict[tuple[int, ...], Tail] = {}
    for sign, opt in ((-1.0, options[0]), (1.0, options[1])):
        if not opt:
            raise ValueError("an option has no tokens")
        ids = (prompt[-1], *opt[:-1])
        tail = tails.setdefault(ids, Tail(prefix=prefix, ids=list(ids), start=len(prompt) - 1))
        tail.targets += [(sign, j, tok) for j, tok in enumerate(opt)]
    return list(tails.values())

def prefix_inputs(lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every prompt but its last token, left-padded: ``(ids, mask, position ids)`` (positions count real tokens only)."""
    ids, mask = pad_batch(lm, [p[:-1] for p in prompts], left=True)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)

def select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding ``rows`` of ``cache`` (repeats allowed); the original is untouched.

    Cache layers replace their tensors on update (never write in place), so a
    shallow copy with re-indexed tensors is independent of the original.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        # Per layer: a model sharded across devices (--device-map) keeps each layer's cache on its own device.
        layer.batch_select_indices(rows.to(layer.keys.device))
    return new

def score_rows(lm: LoadedModel, hidden: torch.Tensor, tails: Sequence[Tail]) -> torch.Tensor:
    """Signed sum of target log-probabilities per tail row, from final hidden states ``[R, t, d]``.

    ``log p(tok) = logit(tok) - logsumexp(logits)``. Where the signs of a
    position's targets add up to zero (both options' first token, say), the
    log-sum-exp cancels and only the targets' rows of the output head are
    needed: a 262k-vocabulary head costs more than the rest of a small model's token.
    """
    dev = hidden.device
    where = [(r, j, tok, sign) for r, t in enumerate(tails) for sign, j, tok in t.targets]
    ri = torch.tensor([w[0] for w in where], device=dev)
    pi = torch.tensor([w[1] for w in where], device=dev)
    toks = torch.tensor([[w[2]] for w in where], device=dev)
    signs = torch.tensor([w[3] for w in where], device=dev, dtype=torch.float32)
    picked = lm.token_logits(hidden[ri, pi], toks)[:, 0].float() * signs
    out = torch.zeros(len(tails), device=dev, dtype=torch.float32).index_add(0, ri, picked)
    weight: dict[tuple[int, int], float] = {}
    for r, j, _, sign in where:
        weight[(r, j)] = weight.get((r, j), 0.0) + sign
    need = [(rj, w) for rj, w in weight.items() if w != 0.0]
    if need:
        nr = torch.tensor([rj[0] for rj, _ in need], device=dev)
        npos = torch.tensor([rj[1] for rj, _ in need], device=dev)
        lse = torch.logsumexp(lm.logits(hidden[nr, npos]).float(), dim=-1)
        coef = torch.tensor([w for _, w in need], device=dev, dtype=torch.float32)
        out = out.index_add(0, nr, -coef * lse)
    return out

class TailHooks:
    """Hooks that patch and capture each site at tail position 0 (the decision position)."""

    def __init__(self, lm: LoadedModel, sites: Sequence[str], patches: Sequence[Patch], keep_graph: bool):
        self.lm = lm
        self.sites = tuple(sites)
        self.keep_graph = keep_graph
        self.by_site: dict[tuple[str, int], list[Patch]] = {}
        for p in patches:
            self.by_site.setdefault((p.site, p.layer), []).append(p)
        self.acts: dict[str, list[torch.Tensor | None]] = {s: [None] * lm.n_layers for s in self.sites}
        self.live: dict[str, list[torch.Tensor | None]] = {s: [None] * lm.n_layers for s in self.sites}
        self.handles: list = []

    def _apply(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        patches = self.by_site.get((site, layer))
        if patches:
            x = x.clone()
            view = x.view(*x.shape[:2], self.lm.n_heads, self.lm.head_dim) if site == "heads" else x
            for p in patches:
                rows = p.rows.to(x.device)
                vals = p.values.to(device=x.device, dtype=x.dtype)
                if p.heads is not None:
                    view[rows, 0, p.heads.to(x.device)] = vals
                else:
                    view[rows, 0] = vals
        if site in self.sites:
            if self.keep_graph:
                self.live[site][layer] = x
            kept = x[:, 0].detach()
            if site == "heads":
                kept = kept.reshape(x.shape[0], self.lm.n_heads, self.lm.head_dim)
            self.acts[site][layer] = kept.float()
        return x

    def __enter__(self) -> TailHooks:
        def out_hook(site: str, i: int):
            def hook(module, args, out):
                if isinstance(out, tuple):
                    return (self._apply(site, i, out[0]), *out[1:])
                return self._apply(site, i, out)

            return hook

        def pre_hook(i: int):
            def hook(module, args):
                return (self._apply("heads", i, args[0]), *args[1:])

            return hook

        for i in range(self.lm.n_layers):
            self.handles.append(self.lm.layers[i].register_forward_hook(out_hook("resid", i)))
            self.handles.append(self.lm.attn_out(i).register_forward_pre_hook(pre_hook(i)))
            self.handles.append(self.lm.mlp(i).register_forward_hook(out_hook("mlp", i)))
        if self.keep_graph:
            # A frozen model builds no graph; asking for gradients at the embeddings does.
            emb = self.lm.model.get_input_embeddings()
            self.handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

@contextmanager
def attention_impl(lm: LoadedModel, name: str | None) -> Iterator[None]:
    """Switch the attention kernel for one pass (eager returns attention weights)."""
    old = getattr(lm.model.config, "_attn_implementation", None)
    if name is None or name == old:
        yield
        return
    lm.model.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.model.set_attn_implementation(old)

def tail_inputs(lm: LoadedModel, prefixes: Prefixes, tails: Sequence[Tail]):
    """What a pass of tails on cached prefixes is given: ``(prefix rows, ids, position ids, mask, cache)``.

    The cache holds each tail's prefix row (a copy: the prefixes stay as they were).
    """
    rows = torch.tensor([t.prefix for t in tails], dtype=torch.long)
    ids, tail_mask = pad_batch(lm, [t.ids for t in tails])
    position = torch.tensor([t.start for t in tails])[:, None] + torch.arange(ids.shape[1])[None, :]
    mask = torch.cat([prefixes.mask[rows], tail_mask], dim=1)
    return rows, ids, position, mask, select_cache(prefixes.cache, rows)

def decision_attention(weights, before, cache, prefixes: Prefixes, tails: Sequence[Tail], rows: torch.Tensor):
    """Per layer: the decision position's attention weights, the values they mix, and each key's prompt index."""
    t = max(len(tl.ids) for tl in tails)
    pad = torch.tensor([prefixes.width - prefixes.lengths[r] for r in rows.tolist()])  # left padding per row
    start = torch.tensor([tl.start for tl in tails])
    out = []
    for layer, (w, (kept, old_values)) in enumerate(zip(weights, before)):
        new_values = cache.layers[layer].values[..., -t:, :]
        values = torch.cat([old_values, new_values], dim=-2)  # the keys the tail attended to
        k = values.shape[-2]
        col = torch.arange(k)
        # Columns before `kept` are the last `kept` cached prefix positions; the rest are the tail.
        in_prefix = (prefixes.width - kept + col)[None, :] - pad[:, None]
        in_tail = start[:, None] + (col - kept)[None, :]
        token = torch.where(col[None, :] < kept, in_prefix, in_tail)
        token = torch.where(token >= 0, token, torch.full_like(token, -1))
        out.append((w[:, :, 0].detach().float(), values.detach().float(), token))
    return out

def decision_grads(
    output: TailOutput, weights: torch.Tensor | None = None, position: int | None = 0
) -> dict[str, torch.Tensor]:
    """Gradients of the (weighted) summed row scores, per site.

    Args:
        output: A pass run with ``grad=True``.
        weights: Optional ``[R]`` weight per row (default all ones).
        position: Row position to keep (0: the decision position of a tail), or
            None for every position.

    Returns:
        Site to ``[R, L, ...]`` gradients, or ``[R, L, T, ...]`` for every position;
        heads are split, ``[..., H, dh]``.
    """
    if output.grads is not None:
        # Computed inside the pass (nnsight backend): the summed scores at the pass's own positions.
        if weights is not None:
            raise ValueError("this pass computed its gradients already, for unweighted scores")
        return output.grads
    scores = output.scores
    total = (scores * weights.to(scores.device)).sum() if weights is not None else scores.sum()
    sites = list(output.live)
    flat = [x for s in sites for x in output.live[s]]
    grads = iter(torch.autograd.grad(total, flat, allow_unused=True))
    out: dict[str, torch.Tensor] = {}
    for s in sites:
        per_layer = []
        for x in output.live[s]:
            g = next(grads)
            g = (torch.zeros_like(x) if g is None else g).float()
            g = g[:, position] if position is not None else g
            if s == "heads":
                g = g.reshape(*g.shape[:-1], output.acts["heads"].shape[2], -1)
            per_layer.append(g)
        out[s] = torch.stack(per_layer, dim=1)
    return out
