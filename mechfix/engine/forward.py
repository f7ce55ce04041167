"""Batched forward passes that score options and capture activations.

Scoring: for a prompt P and options O_k, the option's log-probability is the
sum over its tokens of log P(token | P + earlier option tokens). Each option
becomes one sequence ``P + O_k[:-1]`` (identical sequences are run once, so
single-token options cost one forward for all of them). Sequences are padded on
the right: under a causal mask no real token ever sees a pad, and positions
stay 0..n-1, so a padded row computes what it would alone.

The output head runs only at the scored positions: with a 262k vocabulary the
head would otherwise dominate the forward pass.

Activation sites (plain PyTorch hooks; one pass, no graph kept):
- ``resid``: output of each decoder layer, ``[L, d]`` per position;
- ``heads``: input of each layer's attention output projection, split per head, ``[L, H, dh]``;
- ``mlp``: output of each layer's MLP, ``[L, d]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import torch

from mechfix.engine.edits import check_plain_pass
from mechfix.models import LoadedModel

T = TypeVar("T")

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
class _Row:
    request: int
    ids: list[int]
    targets: list[tuple[int, int, int]]  # (option index, position, target id)
    capture: bool


def _rows(requests: Sequence[Request]) -> list[_Row]:
    rows: list[_Row] = []
    for r, req in enumerate(requests):
        if not req.prompt:
            raise ValueError(f"request {r} has an empty prompt")
        by_seq: dict[tuple[int, ...], _Row] = {}
        for k, opt in enumerate(req.options):
            if not opt:
                raise ValueError(f"request {r}, option {k} has no tokens")
            seq = tuple(req.prompt + opt[:-1])
            row = by_seq.get(seq)
            if row is None:
                row = by_seq[seq] = _Row(r, list(seq), [], capture=not by_seq)
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
# token with its log-probability, and the captured sites (see :meth:`_Capture.take`).
BatchPass = Callable[[LoadedModel, Sequence["_Row"], torch.Tensor, torch.Tensor, Capture],
                     tuple[list[tuple[int, int]], torch.Tensor, dict[str, object]]]


def split_after_oom(chunk: list[int], pending: list[list[int]]) -> list[list[int]]:
    """The work left after ``chunk`` ran out of memory: it in two halves, every later batch at most that size."""
    size = (len(chunk) + 1) // 2
    rest = [i for c in pending for i in c]
    return [chunk[:size], chunk[size:]] + [rest[i: i + size] for i in range(0, len(rest), size)]


class _Capture:
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

    def __enter__(self) -> _Capture:
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


def _hooks_pass(lm: LoadedModel, batch: Sequence[_Row], ids: torch.Tensor, mask: torch.Tensor, capture: Capture):
    """A batch pass with PyTorch hooks (the ``hooks`` backend)."""
    with _Capture(lm, capture.sites) as cap:
        cap.rows, cap.pos, cap.lengths = capture.rows, capture.pos, capture.lengths
        hidden = final_hidden(lm, ids, mask)
        where, picked = _target_logprobs(lm, hidden, batch)
        got = cap.take() if capture.sites else {}
    return where, picked, got


def _batch_pass_of(lm: LoadedModel) -> BatchPass:
    """The batch pass of the model's backend."""
    if lm.backend == "hooks":
        return _hooks_pass
    from mechfix.engine.backends.nnsight import request_pass

    return request_pass


def _target_logprobs(lm: LoadedModel, hidden: torch.Tensor, batch: Sequence[_Row]) -> tuple[list[tuple[int, int]], torch.Tensor]:
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


def final_hidden(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone's final, normed hidden states ``[B, T, d]`` for a padded batch (no key/value cache)."""
    check_plain_pass(lm, "this step (a plain forward pass)")
    out = lm.backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def option_scores(lm: LoadedModel, requests: Sequence[Request]) -> torch.Tensor:
    """Summed log-probability of each option, ``[N, K]``, in one forward pass that keeps the graph.

    The differentiable twin of :func:`run_requests` (same rows, same padding),
    for training: gradients flow to whatever requires them (an adapter's weights).
    All requests must have the same number of options.
    """
    rows = _rows(requests)
    hidden = final_hidden(lm, *pad_batch(lm, [r.ids for r in rows]))
    where, picked = _target_logprobs(lm, hidden, rows)
    n_opt = len(requests[0].options)
    flat = torch.tensor([rows[b].request * n_opt + k for b, k in where], device=picked.device)
    return torch.zeros(len(requests) * n_opt, device=picked.device).index_add(0, flat, picked).view(len(requests), n_opt)


def out_of_memory(exc: BaseException) -> bool:
    """Whether an error is the accelerator (or the host) running out of memory."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def release_memory(lm: LoadedModel) -> None:
    """Give the failed batch's memory back before the smaller batches run."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and str(lm.device).startswith("cuda"):
        torch.cuda.empty_cache()


# Auto batch sizes stay within this share of the free GPU memory, and this many rows.
_AUTO_MEMORY_SHARE = 0.5
_AUTO_MAX_BATCH = 256
CPU_BATCH = 16


def auto_batch_size(lm: LoadedModel, tokens: int) -> int:
    """The largest batch of ``tokens``-token rows whose activations fit the model's GPU (16 on a CPU or NDIF).

    Per token: the key/value cache a prefix keeps (two vectors per layer), the
    transient activations of one layer (a few residual widths and the MLP's
    width, in fp32) and as much again for a backward pass. An estimate: a batch
    that still runs out of memory is halved and retried (:func:`split_after_oom`).
    """
    if lm.remote or lm.device.type != "cuda":
        return CPU_BATCH
    devices = {p.device for p in lm.model.parameters() if p.device.type == "cuda"}
    return batch_for_memory(lm, tokens, sum(torch.cuda.mem_get_info(d)[0] for d in devices))


def batch_for_memory(lm: LoadedModel, tokens: int, free: int) -> int:
    """The batch of ``tokens``-token rows whose activations fit in ``free`` bytes (see :func:`auto_batch_size`)."""
    elem = torch.finfo(lm.dtype).bits // 8
    mlp = getattr(lm.model.config, "intermediate_size", None) or 4 * lm.hidden
    per_token = 2 * lm.n_layers * lm.hidden * elem + 2 * (8 * lm.hidden + 2 * mlp) * 4
    return int(max(1, min(_AUTO_MAX_BATCH, _AUTO_MEMORY_SHARE * free // (tokens * per_token))))


def retry_smaller(lm: LoadedModel, attempt: Callable[[], T], shrink: Callable[[], bool]) -> T:
    """Call ``attempt`` until it does not run out of memory; after each time it does, ``shrink`` the work and retry.

    ``shrink`` returns False when the work cannot be made smaller (the error is
    then raised). Any other error is raised at once. ``attempt`` must keep
    nothing from a call that raised.
    """
    while True:
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
            if not out_of_memory(exc) or not shrink():
                raise
            release_memory(lm)


def with_backoff(lm: LoadedModel, chunks: Sequence[list[int]], run: Callable[[list[int]], None]) -> None:
    """Call ``run`` on each chunk in order; a chunk that runs out of memory is split in two and retried.

    Every later chunk is then at most the smaller size. ``run`` must keep nothing
    from a call that raised (results are taken only when it returns).
    """
    pending = [list(c) for c in chunks]

    def split() -> bool:
        nonlocal pending
        if len(pending[0]) == 1:
            return False
        pending = split_after_oom(pending[0], pending[1:])
        return True

    while pending:
        retry_smaller(lm, lambda: run(pending[0]), split)
        pending.pop(0)


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


def run_requests(
    lm: LoadedModel,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    sites: Sequence[str] = SITES,
    all_positions: bool = False,
    on_batch: Callable[[int], None] | None = None,
    on_rows: Callable[[list[int]], None] | None = None,
    on_acts: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> list[Result]:
    """Score every request's options and capture activations, in batches.

    Args:
        lm: The model.
        requests: Decisions to score.
        batch_size: Sequences per forward pass. A batch that runs out of memory is split in
            two and retried, and every later batch is at most that size.
        sites: Activation sites to capture (subset of :data:`SITES`; empty for none).
        all_positions: Capture every prompt position instead of the decision position.
        on_batch: Called with the number of requests finished after each batch (progress).
        on_rows: Called before each batch's forward pass with the index of the request each row
            belongs to (for edits that differ per request, :class:`~mechfix.fixes.fix.RowFixes`).
        on_acts: Called with each request's index and activations as soon as they are
            captured, instead of keeping them in its :class:`Result` (record streams
            activations at every position to disk this way).

    Returns:
        One :class:`Result` per request, in order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; known: {SITES}")
    rows = _rows(requests)
    batch_pass = _batch_pass_of(lm)
    # Longest first: similar lengths share a batch, so little is padded.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    scores = [torch.zeros(len(r.options), dtype=torch.float64) for r in requests]
    acts: list[dict[str, torch.Tensor]] = [{} for _ in requests]

    def one_batch(chunk: list[int]) -> None:
        batch = [rows[i] for i in chunk]
        ids, mask = pad_batch(lm, [r.ids for r in batch])
        if on_rows:
            on_rows([r.request for r in batch])
        keep = [b for b, r in enumerate(batch) if r.capture]
        plen = [len(requests[batch[b].request].prompt) for b in keep]
        capture = Capture(
            rows=torch.tensor(keep, dtype=torch.long),
            pos=torch.tensor([n - 1 for n in plen], dtype=torch.long),
            lengths=plen if all_positions else None,
            sites=tuple(sites) if keep else (),
        )
        where, picked, got = batch_pass(lm, batch, ids, mask, capture)
        for (b, k), lp in zip(where, picked.double().cpu()):
            scores[batch[b].request][k] += lp
        if capture.sites:
            for j, b in enumerate(keep):
                mine = {s: got[s][j] for s in sites}  # type: ignore[index]
                if on_acts:
                    on_acts(batch[b].request, mine)
                else:
                    acts[batch[b].request] = mine
        if on_batch and keep:
            on_batch(len(keep))

    with torch.inference_mode():
        with_backoff(lm, [order[i: i + batch_size] for i in range(0, len(order), batch_size)], one_batch)
    return [Result(scores=s.float(), acts=a) for s, a in zip(scores, acts)]
