"""Measuring a fix: decision scores with and without it, and its side effects on neutral text.

Shared by steer (the strength sweep, on the training split) and verify (the
held-out split). A fix acts at every position, so these are whole forward
passes with the fix's hooks on, not patched decision positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch

from mechfix.errors import BadInputError
from mechfix.fixes.fix import Fix, apply_fix
from mechfix.engine.backends import backend_of
from mechfix.engine.batches import Request, final_hidden, pad_batch
from mechfix.engine.forward import retry_smaller, run_requests
from mechfix.engine.kl import KL_CHUNK, keep_mask, kept_hidden
from mechfix.models import LoadedModel
from mechfix.textio import read_text


NEUTRAL_SETS = {"select": "data/neutral-select.txt", "verify": "data/neutral-verify.txt"}


def neutral_passages(path: str | None = None, part: str = "select") -> list[str]:
    """The neutral passages side effects are measured on.

    Args:
        path: A text file of passages separated by blank lines (``#`` lines are
            comments); default one of the two sets that ship with mechfix.
        part: Which shipped set: ``select`` (steer's budget) or ``verify``
            (verify's gate). They share no passage, so that verify's KL is an
            independent check of a strength steer chose.
    """
    if path is None:
        text = resources.files("mechfix").joinpath(NEUTRAL_SETS[part]).read_text(encoding="utf-8")
    else:
        text = read_text(path, "neutral text file")
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
    on_rows: Callable[[list[int]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Option scores ``[N, K]`` per condition, with the fix applied when given.

    Args:
        lm: The model.
        requests: Condition to its decisions.
        fix: The fix, or None for the model as it is.
        strength: Override of the fix's strength.
        batch_size: Sequences per forward pass.
        on_batch: Progress callback (decisions finished).
        on_rows: Called before each forward pass with the request index (within its condition) of each row.
    """
    out: dict[str, torch.Tensor] = {}
    for c, reqs in requests.items():
        if fix is None:
            res = run_requests(lm, reqs, batch_size=batch_size, sites=(), on_batch=on_batch, on_rows=on_rows)
        else:
            with apply_fix(lm, fix, strength, check_model=False):
                res = run_requests(lm, reqs, batch_size=batch_size, sites=(), on_batch=on_batch, on_rows=on_rows)
        out[c] = torch.stack([r.scores for r in res])
    return out


def clean_agreement(before: torch.Tensor, after: torch.Tensor) -> float:
    """Share of decisions whose preferred option is the same before and after (``[N, K]`` scores)."""
    if not len(before):
        return float("nan")
    return float((before.argmax(1) == after.argmax(1)).float().mean())


@dataclass
class NeutralSet:
    """Neutral passages, tokenized, in batches of about :data:`KL_CHUNK` scored positions.

    ``base`` caches, per batch, what KL needs of the unfixed model (see
    :func:`neutral_kl`), so that every fix and strength measured on the same
    set reuses one pass of the unfixed model.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (ids, mask), right-padded
    n_tokens: int
    base: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stride: int = 1  # KL is measured at every stride-th position (every position still reads its whole context)
    positions: int = 0  # positions that have a next token, measured or not
    # Per batch, the first measured position: the stride counts on across a batch split after running out of memory.
    firsts: list[int] = field(default_factory=list)

    def pick(self, i: int) -> slice:
        """Which of batch ``i``'s positions with a next token are measured."""
        return slice(self.firsts[i] if self.firsts else 0, None, self.stride)

    def split(self, i: int) -> None:
        """Split batch ``i`` in two halves of its rows (it ran out of memory), measuring the same positions.

        The cached unfixed terms of batch ``i`` are dropped (its halves compute
        their own); those of the other batches are kept.
        """
        if not self.firsts:
            self.firsts = [0] * len(self.batches)
        ids, mask = self.batches[i]
        h = (len(ids) + 1) // 2
        halves = []
        for rows in (slice(0, h), slice(h, None)):
            width = int(mask[rows].sum(1).max())
            halves.append((ids[rows, :width], mask[rows, :width]))
        first = self.firsts[i]
        self.batches[i: i + 1] = halves
        self.firsts[i: i + 1] = [first, (first - int(keep_mask(halves[0][1]).sum())) % self.stride]
        self.base = {(k if k < i else k + 1): v for k, v in self.base.items() if k != i}


def neutral_set(lm: LoadedModel, passages: Sequence[str] | None = None, stride: int = 1) -> NeutralSet:
    """Tokenize neutral passages for :func:`neutral_kl` (default: the shipped selection set).

    Args:
        lm: The model.
        passages: The passages.
        stride: Measure KL at every ``stride``-th position only (counted through
            each batch in order). Every position still reads its whole context;
            only the output head, which dominates KL's cost for a large
            vocabulary, runs less often. steer's search uses 4, verify 1.
    """
    passages = list(passages) if passages is not None else neutral_passages()
    seqs = [lm.tokenizer(p).input_ids for p in passages]
    seqs = [s for s in seqs if len(s) >= 2]
    batches, cur, width = [], [], 0
    for s in sorted(seqs, key=len):
        if cur and (len(cur) + 1) * max(width, len(s)) > KL_CHUNK * 2:
            batches.append(pad_batch(lm, cur))
            cur, width = [], 0
        cur.append(s)
        width = max(width, len(s))
    if cur:
        batches.append(pad_batch(lm, cur))
    measured = sum(len(range(0, int(keep_mask(m).sum()), stride)) for _, m in batches)
    # Every position but the last predicts a next token that exists.
    return NeutralSet(batches=batches, n_tokens=measured, stride=stride, positions=sum(len(s) - 1 for s in seqs),
                      firsts=[0] * len(batches))


def _log_probs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice = slice(None)) -> torch.Tensor:
    """Full-vocabulary log-probabilities at the ``pick`` of the positions that have a next token, ``[P, V]``."""
    return torch.log_softmax(lm.logits(kept_hidden(lm, ids, mask, pick)).float(), dim=-1)


def _plain_head(lm: LoadedModel, fix: Fix) -> bool:
    """Whether the logits are ``W h + b`` with the fix on: no soft-capping, and the fix leaves the output head alone."""
    if lm.spec.logit_softcap and getattr(lm.model.config, lm.spec.logit_softcap, None):
        return False
    head = lm.model.get_output_embeddings()
    if fix.lora is not None:
        from mechfix.architectures import get_path

        return not any(get_path(lm.model, m) is head for m in fix.lora.modules)
    return True


def _base_terms(lm: LoadedModel, neutral: NeutralSet, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfixed model's part of KL at every position of batch ``i``: ``(c, e)``, cached on the set.

    With logits ``z = W h + b`` and base probabilities ``p``,
    ``KL(p || q) = sum(p z) - lse(z) - (e . h_q + p . b) + lse(z_q)``
    where ``e = p W`` and ``h_q``, ``z_q`` are the fixed model's hidden state and
    logits; ``c`` holds ``sum(p z) - lse(z) - p . b`` per position.
    """
    if i not in neutral.base:
        ids, mask = neutral.batches[i]
        neutral.base[i] = backend_of(lm).kl_base(lm, ids, mask, neutral.pick(i))
    return neutral.base[i]


def _fixed_kl(lm: LoadedModel, fix: Fix, strength: float, ids: torch.Tensor, mask: torch.Tensor, pick: slice,
              c: torch.Tensor, e: torch.Tensor) -> float:
    """Summed KL over one neutral batch with the fix applied at ``strength`` (in a trace on NDIF)."""
    with apply_fix(lm, fix, strength, check_model=False):
        return backend_of(lm).kl_fixed(lm, ids, mask, pick, c, e)


def _batch_kl(lm: LoadedModel, fix: Fix, strengths: Sequence[float], neutral: NeutralSet, i: int, plain: bool) -> list[float]:
    """Summed KL over neutral batch ``i``, one number per strength (see :func:`neutral_kl`)."""
    ids, mask = neutral.batches[i]
    pick = neutral.pick(i)
    if plain:
        c, e = _base_terms(lm, neutral, i)
        return [_fixed_kl(lm, fix, s, ids, mask, pick, c, e) for s in strengths]
    base = _log_probs(lm, ids, mask, pick)
    p = base.exp()
    out = []
    for s in strengths:
        with apply_fix(lm, fix, s, check_model=False):
            fixed = _log_probs(lm, ids, mask, pick)
        out.append(float((p * (base - fixed)).sum()))
    return out


def neutral_kl(
    lm: LoadedModel,
    fix: Fix,
    strengths: Sequence[float],
    neutral: NeutralSet,
    on_batch: Callable[[int], None] | None = None,
    reuse: bool = False,
    stop_above: float | None = None,
) -> list[float]:
    """Mean KL(model ‖ model with the fix) per token on neutral text, for each strength.

    Where the logits are linear in the final hidden state (no soft-capping, and
    a fix that leaves the output head alone), the unfixed model enters KL only
    through two numbers per position and one ``d``-vector, cached on ``neutral``
    (:func:`_base_terms`): each strength then costs one pass of the fixed model,
    with no full-vocabulary product of the two distributions. Otherwise the
    unfixed distributions are computed once per batch and compared with every strength.
    ``reuse`` says that more calls on the same set will follow (steer's search),
    so the cached terms are worth their one-off cost even for one strength.
    ``stop_above`` (one strength only): stop as soon as the KL summed so far
    already exceeds that many nats per token of the whole set (KL is never
    negative, so the rest can only add to it); the value returned is then that
    partial sum per token, a lower bound above ``stop_above``.

    Returns:
        Nats per token, one per strength.
    """
    totals = [0.0] * len(strengths)
    linear = _plain_head(lm, fix)
    if lm.edits_in_traces and not linear:
        # On NDIF only the cached terms travel: a full-vocabulary distribution per position would not.
        raise BadInputError(
            "KL on neutral text through traces needs logits linear in the final hidden state, and this model "
            "soft-caps them (or the fix edits the output head). Run steer and verify for it where the weights are."
        )
    # The cached terms cost more than one plain pass of the unfixed model: worth it when they will be reused. The
    # backends that compute KL inside their passes always use them (one number per batch back); locally, a soft-capped head
    # falls back to comparing full distributions outside them.
    plain = linear and (backend_of(lm).kl_terms_only or reuse or bool(neutral.base) or len(strengths) > 1)
    with torch.inference_mode():
        i = 0
        while i < len(neutral.batches):

            def halve() -> bool:
                # For good: later strengths and calls reuse the smaller batches.
                if len(neutral.batches[i][0]) == 1:
                    return False
                neutral.split(i)
                return True

            part = retry_smaller(lm, lambda: _batch_kl(lm, fix, strengths, neutral, i, plain), halve)
            for j, v in enumerate(part):
                totals[j] += v
            if on_batch:
                on_batch(len(strengths))
            i += 1
            if stop_above is not None and len(strengths) == 1 and totals[0] > stop_above * max(neutral.n_tokens, 1):
                break
    return [t / max(neutral.n_tokens, 1) for t in totals]


def prefixed(ids: Sequence[int], prefix: Sequence[int], bos: int | None) -> list[int]:
    """Token ids with ``prefix`` in front of the text (after a leading BOS, which stays first)."""
    head = 1 if ids and bos is not None and ids[0] == bos else 0
    return [*ids[:head], *prefix, *ids[head:]]


def prefix_ids(lm: LoadedModel, text: str) -> list[int]:
    """The tokens of a text an agent reads before anything else (no special tokens; a blank line after it)."""
    return list(lm.tokenizer(text + "\n\n", add_special_tokens=False).input_ids)


def carried_kl(lm: LoadedModel, prefix: Sequence[int], neutral: NeutralSet,
               on_batch: Callable[[int], None] | None = None) -> float:
    """Mean KL(model on the text ‖ model on the text after ``prefix``) per token of neutral text.

    What a text the agent carries everywhere (an instruction) changes in what
    it writes elsewhere: the same next-token predictions over each passage,
    with and without the prefix in front of it. Every position that predicts
    a token of the passage counts.
    """
    total, count = 0.0, 0
    bos = lm.tokenizer.bos_token_id
    with torch.inference_mode():
        for ids, mask in neutral.batches:
            for row, m in zip(ids, mask):
                seq = row[: int(m.sum())].tolist()
                pos = list(range(len(seq) - 1))
                if not pos:
                    continue
                plain = final_hidden(lm, *pad_batch(lm, [seq]))[0, pos]
                after = final_hidden(lm, *pad_batch(lm, [prefixed(seq, prefix, bos)]))[0, [p + len(prefix) for p in pos]]
                logp, logq = (torch.log_softmax(lm.logits(h).float(), dim=-1) for h in (plain, after))
                total += float((logp.exp() * (logp - logq)).sum())
                count += len(pos)
            if on_batch:
                on_batch(1)
    return total / max(count, 1)

