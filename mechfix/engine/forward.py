"""Batched forward passes that score options and capture activations.

Scoring: for a prompt P and options O_k, the option's log-probability is the
sum over its tokens of log P(token | P + earlier option tokens). Each option
becomes one sequence ``P + O_k[:-1]`` (identical sequences are run once, so
single-token options cost one forward for all of them). Sequences are padded on
the right: under a causal mask no real token ever sees a pad, and positions
stay 0..n-1, so a padded row computes what it would alone.

The output head runs only at the scored positions: with a 262k vocabulary the
head would otherwise dominate the forward pass.

Activation sites (one pass, no graph kept) are the ones :mod:`mechfix.engine.batches`
names. Each batch runs on the model's backend (:mod:`mechfix.engine.backends`);
a batch that runs out of memory is halved and retried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from mechfix.engine.backends import backend_of
from mechfix.engine.batches import SITES, Capture, Request, Result, final_hidden, pad_batch, rows_of, target_logprobs
from mechfix.models import LoadedModel

T = TypeVar("T")


def split_after_oom(chunk: list[int], pending: list[list[int]]) -> list[list[int]]:
    """The work left after ``chunk`` ran out of memory: it in two halves, every later batch at most that size."""
    size = (len(chunk) + 1) // 2
    rest = [i for c in pending for i in c]
    return [chunk[:size], chunk[size:]] + [rest[i: i + size] for i in range(0, len(rest), size)]


def option_scores(lm: LoadedModel, requests: Sequence[Request]) -> torch.Tensor:
    """Summed log-probability of each option, ``[N, K]``, in one forward pass that keeps the graph.

    The differentiable twin of :func:`run_requests` (same rows, same padding),
    for training: gradients flow to whatever requires them (an adapter's weights).
    All requests must have the same number of options.
    """
    rows = rows_of(requests)
    hidden = final_hidden(lm, *pad_batch(lm, [r.ids for r in rows]))
    where, picked = target_logprobs(lm, hidden, rows)
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
    rows = rows_of(requests)
    backend = backend_of(lm)
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
        where, picked, got = backend.request_pass(lm, batch, ids, mask, capture)
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
