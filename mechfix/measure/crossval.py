"""Cross-validation over the training split: does a fix carry over to items it was not fitted on?

A heads or vector fix is fitted on the recording's training decisions (its
directions and means are averages over them). Scored on those same decisions
it can look far better than it is: where each item has its own wrong word, a
mean direction fits the training items' words and nothing else. steer
therefore scores every candidate the way verify will: folds of items, each
scored with the fix fitted on the other folds.

Folds are made of whole items, so the rounds of one live episode never sit on
both sides of a fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mechfix.artifacts import Artifact

DEFAULT_FOLDS = 5


def row_items(rec: Artifact, rows: Sequence[int]) -> list[int]:
    """The item of each recording row (a live recipe has several rows, its rounds, per item)."""
    table = rec.tensors.get("rows")
    if table is None or table.dim() != 2:
        return [int(r) for r in rows]
    return [int(table[r, 0]) for r in rows]


def item_folds(items: Sequence[int], k: int = DEFAULT_FOLDS, seed: int = 0) -> list[int]:
    """The fold of each row: the distinct items are shuffled with ``seed`` and dealt round robin into ``k`` folds.

    Rows of the same item always share a fold. With fewer than ``k`` items,
    every item is its own fold (leave one item out).

    Raises:
        ValueError: With fewer than two distinct items (nothing to hold out).
    """
    distinct = sorted(set(items))
    if len(distinct) < 2:
        raise ValueError("cross-validation needs at least two training items")
    k = min(k, len(distinct))
    order = np.random.default_rng(seed).permutation(len(distinct))
    fold_of = {distinct[j]: i % k for i, j in enumerate(order)}
    return [fold_of[it] for it in items]


def fold_masks(folds: Sequence[int], n_rows: int, train_rows: Sequence[int]) -> list[tuple[torch.Tensor, list[int]]]:
    """For each fold: a ``[n_rows]`` mask of the training rows a fix is fitted on, and the positions it is scored on.

    Args:
        folds: The fold of each training row (as :func:`item_folds` gives).
        n_rows: Rows of the whole recording (the mask indexes its tensors).
        train_rows: Each training row's index in the recording.

    Returns:
        One ``(fit_mask, held_positions)`` per fold; ``held_positions`` index the training rows.
    """
    out = []
    for f in sorted(set(folds)):
        fit = torch.zeros(n_rows, dtype=torch.bool)
        fit[[r for r, g in zip(train_rows, folds) if g != f]] = True
        out.append((fit, [j for j, g in enumerate(folds) if g == f]))
    return out
