"""The rows of a batched forward pass: requests, padding, captured sites, option log-probabilities.

The pieces every backend shares (:mod:`mechfix.engine.backends`): a request
becomes rows (one per distinct sequence, see :func:`rows_of`), rows are padded
(:func:`pad_batch`), and the output head runs only at the scored positions
(:func:`target_logprobs`). :mod:`mechfix.engine.forward` batches them.

Activation sites (one pass, no graph kept):
- ``resid``: output of each decoder layer, ``[L, d]`` per position;
- ``heads``: input of each layer's attention output projection, split per head, ``[L, H, dh]``;
- ``mlp``: output of each layer's MLP, ``[L, d]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from mechfix.engine.edits import check_plain_pass
from mechfix.models import LoadedModel


SITES = ("resid", "heads", "mlp")

@dataclass
class Request:
    """One decision to score.

    Attributes:
        prompt: Token ids up to and including the decision position.
        options: Token ids of each option (a continuation of the prompt).
    """

    prompt: list[int]
    options: list[list[int]]

@dataclass
class Result:
    """Scores and activations of one request.

    Attributes:
        scores: Summed log-probability of each option, ``[K]`` float32.
        acts: Site name to activations at the decision position (``[L, ...]``),
            or at every prompt position (``[T, L, ...]``) when asked.
    """

    scores: torch.Tensor
    acts: dict[str, torch.Tensor]

@dataclass
class Row:
    request: int
    ids: list[int]
    targets: list[tuple[int, int, int]]  # (option index, position, target id)
    capture: bool

def rows_of(requests: Sequence[Request]) -> list[Row]:
    rows: list[Row] = []
    for r, req in enumerate(requests):
        if not req.prompt:
            raise ValueError(f"request {r} has an empty prompt")
        by_seq: dict[tuple[int, ...], Row] = {}
        for k, opt in enumerate(req.options):
            if not opt:
                raise ValueError(f"request {r}, option {k} has no tokens")
            seq = tuple(req.prompt + opt[:-1])
            row = by_seq.get(seq)
            if row is None:
                row = by_seq[seq] = Row(r, list(seq), [], capture=not by_seq)
                rows.append(row)
            start = len(req.prompt) - 1
            row.targets += [(k, start + j, tok) for j, tok in enumerate(opt)]
    return rows

@dataclass
class Capture:
    """Which activations a batch pass keeps.

    Attributes:
        rows: ``[b]`` batch rows to keep (one per request).
        pos: Their decision positions (decision mode).
        lengths: Their prompt lengths, to keep every prompt position (all-positions mode), else None.
        sites: Sites to keep (empty: none).
    """

    rows: torch.Tensor
    pos: torch.Tensor
    lengths: list[int] | None
    sites: tuple[str, ...]

# One forward pass of a padded batch: (batch rows, option, position) of each scored
# token with its log-probability, and the captured sites (see :meth:`SiteCapture.take`).
BatchPass = Callable[[LoadedModel, Sequence["Row"], torch.Tensor, torch.Tensor, Capture],
                     tuple[list[tuple[int, int]], torch.Tensor, dict[str, object]]]

class SiteCapture:
    """Forward hooks that keep each site's activation at chosen positions only."""

    def __init__(self, lm: LoadedModel, sites: Sequence[str]):
        self.lm = lm
        self.sites = tuple(sites)
        self.rows: torch.Tensor | None = None  # batch rows to keep
        self.pos: torch.Tensor | None = None  # their positions (decision mode)
        self.lengths: list[int] | None = None  # their lengths (all-positions mode)
        self.store: dict[str, list[list[torch.Tensor]]] = {}
        self.handles: list = []

    def _keep(self, site: str, layer: int, x: torch.Tensor) -> None:
        if self.rows is None or not len(self.rows):
            return
        if site == "heads":
            x = x.view(*x.shape[:2], self.lm.n_heads, self.lm.head_dim)
        if self.lengths is None:
            kept = x[self.rows, self.pos].float().cpu()  # [b, ...]
        else:
            kept = [x[r, :n].float().cpu() for r, n in zip(self.rows.tolist(), self.lengths)]
        self.store[site][layer] = kept

    def __enter__(self) -> SiteCapture:
        n = self.lm.n_layers
        for site in self.sites:
            self.store[site] = [None] * n  # type: ignore[list-item]
        for i in range(n):
            if "resid" in self.sites:
                self.handles.append(
                    self.lm.layers[i].register_forward_hook(
                        lambda m, a, out, i=i: self._keep("resid", i, out[0] if isinstance(out, tuple) else out)
                    )
                )
            if "heads" in self.sites:
                self.handles.append(
                    self.lm.attn_out(i).register_forward_pre_hook(lambda m, a, i=i: self._keep("heads", i, a[0]))
                )
            if "mlp" in self.sites:
                self.handles.append(
                    self.lm.mlp(i).register_forward_hook(
                        lambda m, a, out, i=i: self._keep("mlp", i, out[0] if isinstance(out, tuple) else out)
                    )
                )
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def take(self) -> dict[str, object]:
        """This batch's captures, stacked over layers; then reset."""
        out: dict[str, object] = {}
        for site, per_layer in self.store.items():
            if self.lengths is None:
                out[site] = torch.stack(per_layer, dim=1)  # [b, L, ...]
            else:
                out[site] = [torch.stack([layer[j] for layer in per_layer], dim=1) for j in range(len(self.lengths))]
            self.store[site] = [None] * self.lm.n_layers  # type: ignore[list-item]
        return out

def target_logprobs(lm: LoadedModel, hidden: torch.Tensor, batch: Sequence[Row]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Log-probability of every option token of a batch of rows, from the backbone's hidden states.

    Returns:
        ``(row, option)`` of each target, and its log-probability (float32, on the model's device).
    """
    where = [(b, pos, k, tok) for b, r in enumerate(batch) for k, pos, tok in r.targets]
    # Options that start with different tokens read the same position: the output head (the dearest matrix
    # of a model with a large vocabulary) runs once per position, not once per option.
    places = list(dict.fromkeys((w[0], w[1]) for w in where))
    row_of = {p: i for i, p in enumerate(places)}
    bi = torch.tensor([p[0] for p in places], device=hidden.device)
    pi = torch.tensor([p[1] for p in places], device=hidden.device)
    logp = torch.log_softmax(lm.logits(hidden[bi, pi]).float(), dim=-1)
    rows = torch.tensor([row_of[(w[0], w[1])] for w in where], device=logp.device)
    tok = torch.tensor([w[3] for w in where], device=logp.device)
    return [(w[0], w[2]) for w in where], logp[rows, tok]

@lru_cache(maxsize=None)
def _cache_keyword(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands ``module`` a key/value cache.

    transformers 5 names it ``cache`` (``past_key_values`` is deprecated there
    and goes in 5.40); older versions only know ``past_key_values``.
    """
    return {_cache_keyword(type(module)): cache}

def returned_cache(out: Any) -> Any:
    """The key/value cache a forward pass returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None) if "cache" in getattr(out, "__dataclass_fields__", {}) else None
    return cache if cache is not None else out.past_key_values

# The batch final_hidden is running: hooks inside the pass that need to know its rows read it
# (layerskip.RowSkip); a layer hook sees only hidden states.
_RUNNING: ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = ContextVar("mechfix_running_batch", default=None)


def running_batch() -> tuple[torch.Tensor, torch.Tensor] | None:
    """The token ids and attention mask (``[B, T]``, CPU) of the batch :func:`final_hidden` is running; else None."""
    return _RUNNING.get()


def final_hidden(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone's final, normed hidden states ``[B, T, d]`` for a padded batch (no key/value cache)."""
    check_plain_pass(lm, "this step (a plain forward pass)")
    token = _RUNNING.set((ids.cpu(), mask.cpu()))
    try:
        out = lm.backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    finally:
        _RUNNING.reset(token)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state

def pad_batch(lm: LoadedModel, seqs: Sequence[Sequence[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded to one width (on the right, or on the left).

    Returns:
        (ids ``[B, T]``, mask ``[B, T]``), both long, on the CPU.
    """
    width = max(len(x) for x in seqs)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, x in enumerate(seqs):
        span = slice(width - len(x), width) if left else slice(0, len(x))
        ids[b, span] = torch.tensor(list(x), dtype=torch.long)
        mask[b, span] = 1
    return ids, mask
