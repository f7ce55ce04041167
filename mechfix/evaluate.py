"""Measuring a fix: decision scores with and without it, and its side effects on neutral text.

Shared by steer (the strength sweep, on the training split) and verify (the
held-out split). A fix acts at every position, so these are whole forward
passes with the fix's hooks on, not patched decision positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import torch

from mechfix.fix import Fix, apply_fix
from mechfix.forward import Request, final_hidden, pad_batch, run_requests
from mechfix.models import LoadedModel

# Positions of neutral text whose full-vocabulary log-probabilities are held at once
# (262k-wide rows: 128 rows are 134 MB in float32).
_KL_CHUNK = 128


def neutral_passages(path: str | None = None) -> list[str]:
    """The neutral passages side effects are measured on.

    Args:
        path: A text file of passages separated by blank lines (``#`` lines are
            comments); default the set that ships with mechfix (prose, dialogue
            between several speakers, lists, numbers and code).
    """
    if path is None:
        text = resources.files("mechfix").joinpath("data/neutral.txt").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    passages = [p.strip("\n") for p in "\n".join(lines).split("\n\n")]
    return [p for p in passages if p.strip()]


def score_requests(
    lm: LoadedModel,
    requests: dict[str, list[Request]],
    fix: Fix | None = None,
    strength: float | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Option scores ``[N, K]`` per condition, with the fix applied when given.

    Args:
        lm: The model.
        requests: Condition to its decisions.
        fix: The fix, or None for the model as it is.
        strength: Override of the fix's strength.
        batch_size: Sequences per forward pass.
        on_batch: Progress callback (decisions finished).
    """
    out: dict[str, torch.Tensor] = {}
    for c, reqs in requests.items():
        if fix is None:
            res = run_requests(lm, reqs, batch_size=batch_size, sites=(), on_batch=on_batch)
        else:
            with apply_fix(lm, fix, strength, check_model=False):
                res = run_requests(lm, reqs, batch_size=batch_size, sites=(), on_batch=on_batch)
        out[c] = torch.stack([r.scores for r in res])
    return out


def clean_agreement(before: torch.Tensor, after: torch.Tensor) -> float:
    """Share of decisions whose preferred option is the same before and after (``[N, K]`` scores)."""
    if not len(before):
        return float("nan")
    return float((before.argmax(1) == after.argmax(1)).float().mean())


@dataclass
class NeutralSet:
    """Neutral passages, tokenized, in batches of about :data:`_KL_CHUNK` scored positions."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (ids, mask), right-padded
    n_tokens: int


def neutral_set(lm: LoadedModel, passages: Sequence[str] | None = None) -> NeutralSet:
    """Tokenize neutral passages for :func:`neutral_kl` (default: the shipped set)."""
    passages = list(passages) if passages is not None else neutral_passages()
    seqs = [lm.tokenizer(p).input_ids for p in passages]
    seqs = [s for s in seqs if len(s) >= 2]
    batches, cur, width = [], [], 0
    for s in sorted(seqs, key=len):
        if cur and (len(cur) + 1) * max(width, len(s)) > _KL_CHUNK * 2:
            batches.append(pad_batch(lm, cur))
            cur, width = [], 0
        cur.append(s)
        width = max(width, len(s))
    if cur:
        batches.append(pad_batch(lm, cur))
    # Every position but the last predicts a next token that exists.
    return NeutralSet(batches=batches, n_tokens=sum(len(s) - 1 for s in seqs))


def _log_probs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probabilities at every position that has a next token, ``[P, V]``."""
    hidden = final_hidden(lm, ids, mask)
    keep = mask.clone()
    keep[torch.arange(len(mask)), mask.sum(1) - 1] = 0  # the last token predicts nothing we can check
    return torch.log_softmax(lm.logits(hidden[keep.bool().to(hidden.device)]).float(), dim=-1)


def neutral_kl(
    lm: LoadedModel,
    fix: Fix,
    strengths: Sequence[float],
    neutral: NeutralSet,
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """Mean KL(model ‖ model with the fix) per token on neutral text, for each strength.

    The unfixed model's distributions are computed once per batch and compared
    with every strength, so a sweep costs one extra pass per strength.

    Returns:
        Nats per token, one per strength.
    """
    totals = [0.0] * len(strengths)
    with torch.inference_mode():
        for ids, mask in neutral.batches:
            base = _log_probs(lm, ids, mask)
            p = base.exp()
            for j, s in enumerate(strengths):
                with apply_fix(lm, fix, s, check_model=False):
                    fixed = _log_probs(lm, ids, mask)
                totals[j] += float((p * (base - fixed)).sum())
                if on_batch:
                    on_batch(1)
    return [t / max(neutral.n_tokens, 1) for t in totals]
