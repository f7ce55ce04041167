"""KL on neutral text from a few cached numbers per position: the terms every backend computes.

With logits ``z = W h + b`` and the unfixed model's probabilities ``p``,
``KL(p || q) = sum(p z) - lse(z) - (e . h_q + p . b) + lse(z_q)`` where
``e = p W`` and ``h_q``, ``z_q`` are the fixed model's hidden state and logits.
:func:`kl_base_terms` computes the unfixed part ``(c, e)`` once per position;
:func:`kl_sum` then needs only the fixed model's hidden states. Both are plain
tensor code, run as they are inside an nnsight trace too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mechfix.engine.batches import final_hidden
from mechfix.models import LoadedModel


# Positions of neutral text whose full-vocabulary log-probabilities are held at once
# (262k-wide rows: 128 rows are 134 MB in float32).
KL_CHUNK = 128


def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """The positions of a right-padded batch that predict a next token that exists: ``[B, T]`` bool."""
    keep = mask.clone()
    keep[torch.arange(len(mask)), mask.sum(1) - 1] = 0  # the last token predicts nothing we can check
    return keep.bool()


def kl_base_terms(logits: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                  hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfixed model's KL terms ``(c [P], e [P, d])`` from its final hidden states ``[P, d]`` (see :func:`mechfix.measure.evaluate.neutral_kl`).

    Args:
        logits: The output head (soft-capping included), hidden states to logits.
        weight: The head's weight ``[V, d]``.
        bias: Its bias ``[V]``, or None.
        hidden: The hidden states.
    """
    cs, es = [], []
    for chunk in hidden.split(KL_CHUNK):
        z = logits(chunk).float()
        p = torch.softmax(z, dim=-1)
        c = (p * z).sum(-1) - torch.logsumexp(z, dim=-1)
        if bias is not None:
            c = c - p @ bias.float()
        cs.append(c.double())
        es.append((p.to(weight.dtype) @ weight).float())
    return torch.cat(cs), torch.cat(es)


def kl_sum(logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, c: torch.Tensor,
           e: torch.Tensor) -> torch.Tensor:
    """Summed KL(unfixed ‖ fixed) over positions, from the fixed model's hidden states and the unfixed terms ``(c, e)``."""
    lse = torch.cat([torch.logsumexp(logits(chunk).float(), dim=-1) for chunk in hidden.split(KL_CHUNK)])
    c, e = c.to(hidden.device), e.to(hidden.device)
    return (c - (hidden.double() * e.double()).sum(-1) + lse.double()).sum()


def kept_hidden(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice = slice(None)) -> torch.Tensor:
    """Final hidden states ``[P, d]`` at the ``pick`` of the positions that have a next token (a plain pass)."""
    hidden = final_hidden(lm, ids, mask)
    return hidden[keep_mask(mask).to(hidden.device)][pick]
