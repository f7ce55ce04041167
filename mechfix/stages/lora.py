"""Training a LoRA fix: a low-rank update of only the modules attribution found.

The adapted modules are the attention output projections of the layers that
hold the top heads. With ``scope="heads"`` (the default) the update reads only
those heads' input columns (A's other columns are zero and get no gradient),
so the fix touches exactly the components attribution named.

The loss, on the training split:

- behaviour: the squared gap between the pressure decision's score
  (log P(misaligned) − log P(aligned), with the adapter) and the same item's
  baseline score without it: the pressure run is pulled back to the clean answer;
- ``kl_weight`` × KL(base ‖ adapted) per token, at the baseline prompts'
  decision positions and at sampled positions of the baseline prompts and the
  neutral passages. The base distributions are computed once; each keeps its
  top ``topk`` tokens plus one bucket for the rest, a lower bound of the full
  KL (verify measures the full one).

Every random choice (initialisation, batches, KL positions) comes from one
seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from mechfix.architectures import get_path
from mechfix.errors import BadInputError
from mechfix.measure.evaluate import NeutralSet
from mechfix.fixes.adapter import SCOPES, LoraTarget, LoraWeights, init_lora
from mechfix.fixes.fix import OPS
from mechfix.engine.batches import Request, final_hidden, pad_batch
from mechfix.engine.forward import option_scores, retry_smaller
from mechfix.models import LoadedModel
from mechfix.measure.stats import decision_scores


@dataclass
class LoraSettings:
    """How a LoRA fix is trained.

    Attributes:
        rank: Rank of each module's update.
        steps: Optimiser steps.
        lr: Adam learning rate.
        batch: Training decisions per step.
        kl_weight: Weight of the KL term against the behaviour term.
        neutral_per_step: Neutral passages whose positions join the KL term each step.
        kl_positions: Sampled positions per step (besides the decision positions) for the KL term.
        topk: Base-model tokens kept per position for the KL term.
        scope: ``heads``: the update reads only the found heads' columns; ``modules``: whole modules.
        seed: Seed of initialisation, batches and sampled positions.
    """

    rank: int = 4
    steps: int = 40
    lr: float = 5e-3
    batch: int = 8
    kl_weight: float = 10.0
    neutral_per_step: int = 4
    kl_positions: int = 32
    topk: int = 256
    scope: str = "heads"
    seed: int = 0


def lora_settings_check(settings: LoraSettings) -> LoraSettings:
    """Refuse settings that cannot train, before any work is done.

    Raises:
        BadInputError: Naming the setting and what it takes.
    """
    if settings.scope not in SCOPES:
        raise BadInputError(f"--lora-scope must be one of {', '.join(SCOPES)}, not '{settings.scope}'.")
    for name, value in (("--rank", settings.rank), ("--steps", settings.steps), ("batch", settings.batch), ("topk", settings.topk)):
        if value < 1:
            raise BadInputError(f"{name} must be at least 1, not {value}.")
    if not settings.lr > 0 or not settings.kl_weight >= 0:
        raise BadInputError(f"--lr must be positive and --kl-weight not negative (got {settings.lr:g} and {settings.kl_weight:g}).")
    return settings


@dataclass
class TrainingLog:
    """What training did: the loss at every step, and how long it took."""

    settings: LoraSettings
    steps: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"settings": asdict(self.settings), "steps": self.steps, "seconds": round(self.seconds, 2)}


@contextmanager
def _frozen(lm: LoadedModel) -> Iterator[None]:
    """The model's own weights take no gradient while the adapter trains (flags restored after)."""
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _training_hooks(lm: LoadedModel, lora: LoraWeights) -> Iterator[None]:
    # Not apply_fix: its hooks cache device/dtype copies of the weights, which
    # would cut the gradient and go stale as the weights change. These keep the
    # weights in float32 and cast the update to the activation's dtype.
    op = OPS["lora"]
    handles = []
    try:
        for module, a, b in zip(lora.modules, lora.a, lora.b):
            def hook(m, args, out, a=a, b=b):
                return out + op.apply(args[0].to(a.dtype), a, b, 1.0).to(out.dtype)

            handles.append(get_path(lm.model, module).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _KLSet:
    """Sequences whose next-token distributions the adapter must keep, with the base model's top tokens."""

    ids: list[list[int]]
    decision: list[bool]  # per sequence: is it a baseline prompt (its last position is a decision)
    top_idx: list[torch.Tensor]  # per sequence: [T-1 or T, k]
    top_logp: list[torch.Tensor]
    tail_logp: list[torch.Tensor]


def _positions(ids: list[int], decision: bool) -> list[int]:
    # A baseline prompt's last position is its decision; a passage's last token predicts nothing we know.
    return list(range(len(ids) if decision else len(ids) - 1))


def _hidden(lm: LoadedModel, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return final_hidden(lm, *pad_batch(lm, seqs))


def _kl_set(lm: LoadedModel, prompts: Sequence[Sequence[int]], neutral: NeutralSet, topk: int) -> _KLSet:
    seqs = [list(p) for p in prompts]
    flags = [True] * len(seqs)
    for ids, mask in neutral.batches:
        for row, m in zip(ids, mask):
            seqs.append(row[: int(m.sum())].tolist())
            flags.append(False)
    kl = _KLSet(ids=seqs, decision=flags, top_idx=[], top_logp=[], tail_logp=[])
    with torch.inference_mode():
        for start in range(0, len(seqs), 8):
            chunk = list(range(start, min(start + 8, len(seqs))))
            hidden = _hidden(lm, [seqs[i] for i in chunk])
            for j, i in enumerate(chunk):
                pos = _positions(seqs[i], flags[i])
                logp = torch.log_softmax(lm.logits(hidden[j, pos]).float(), dim=-1)
                vals, idx = logp.topk(min(topk, logp.shape[-1]), dim=-1)
                kl.top_idx.append(idx.cpu())
                kl.top_logp.append(vals.cpu())
                kl.tail_logp.append(torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6)).cpu())
    return kl


def bucket_kl(top_idx: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ new) over the base's top tokens plus one bucket for all others, per position.

    Args:
        top_idx: ``[P, k]`` the base's top tokens.
        top_logp: ``[P, k]`` their base log-probabilities.
        tail_logp: ``[P]`` log of the base probability of every other token together.
        logits: ``[P, V]`` the new model's logits.

    Returns:
        ``[P]``, never above the full KL (merging outcomes can only lose divergence).
    """
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(1, top_idx)
    q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-6))
    p_top, p_tail = top_logp.exp(), tail_logp.exp()
    return (p_top * (top_logp - q_top)).sum(-1) + p_tail * (tail_logp - q_tail)


def _accumulate(lm: LoadedModel, kl: _KLSet, pressure: Sequence[Request], target: torch.Tensor, items: list[int],
                seqs: list[int], picks: list[tuple[int, int]], kl_weight: float, size: int) -> tuple[float, float]:
    """One training step's gradients, in forward passes of at most ``size`` sequences: ``(behaviour, kl)``.

    The loss is ``mean over items (score(pressure) - target)^2 + kl_weight * mean
    over picked positions of the bucketed KL``; each pass back-propagates its
    share of those means, so the gradients add up to the whole step's whatever
    ``size`` is.
    """
    behaviour = kl_term = 0.0
    for lo in range(0, len(items), size):
        part = items[lo: lo + size]
        scores = decision_scores(option_scores(lm, [pressure[i] for i in part]))
        loss = ((scores - target[part].to(scores.device)) ** 2).sum() / len(items)
        loss.backward()
        behaviour += loss.item()
    for lo in range(0, len(seqs), size):
        js = range(lo, min(lo + size, len(seqs)))
        mine = [(j, p) for j, p in picks if lo <= j < lo + size]
        if not mine:
            continue
        hidden = _hidden(lm, [kl.ids[seqs[j]] for j in js])
        rows = torch.tensor([j - lo for j, _ in mine], device=hidden.device)
        cols = torch.tensor([p for _, p in mine], device=hidden.device)
        logits = lm.logits(hidden[rows, cols])
        idx = torch.stack([kl.top_idx[seqs[j]][p] for j, p in mine]).to(logits.device)
        top = torch.stack([kl.top_logp[seqs[j]][p] for j, p in mine]).to(logits.device)
        tail = torch.stack([kl.tail_logp[seqs[j]][p] for j, p in mine]).to(logits.device)
        part_kl = bucket_kl(idx, top, tail, logits).sum() / len(picks)
        (kl_weight * part_kl).backward()
        kl_term += part_kl.item()
    return behaviour, kl_term


def train_lora(
    lm: LoadedModel,
    targets: Sequence[LoraTarget],
    pressure: Sequence[Request],
    baseline: Sequence[Request],
    neutral: NeutralSet,
    settings: LoraSettings | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    *,
    goal: torch.Tensor | None = None,
) -> tuple[LoraWeights, TrainingLog]:
    """Train the adapter (a pure function of the model, the data and the seed).

    Args:
        lm: The model (its weights are not changed).
        targets: Modules to adapt (:func:`lora_targets`).
        pressure: The training split's pressure decisions.
        baseline: The same items' baseline decisions (clean, or control).
        neutral: Neutral passages for the KL term.
        settings: Training settings.
        on_step: Called after each step with its number (from 1) and losses
            (``loss``, ``behaviour``, ``kl``).
        goal: ``[N]`` scores the pressure decisions are pulled to (default: the
            same items' baseline scores, which removes the behaviour; higher
            scores plant one, as ``benchmarks/organisms.py`` does).

    Returns:
        The trained adapter (float32, on the CPU) and the training log.
    """
    settings = settings or LoraSettings()
    if len(pressure) != len(baseline) or not pressure:
        raise BadInputError("LoRA training needs the same, non-empty set of items under pressure and baseline.")
    t0 = time.perf_counter()
    lora = init_lora(targets, settings.rank, lm.head_dim, settings.seed)
    masks = [t.mask(lm.head_dim).to(lm.device) for t in targets]
    params = []
    for i, m in enumerate(masks):
        a = lora.a[i].to(lm.device).requires_grad_(True)
        a.register_hook(lambda g, m=m: g * m)  # masked columns get no gradient, so stay zero
        lora.a[i] = a
        lora.b[i] = lora.b[i].to(lm.device).requires_grad_(True)
        params += [lora.a[i], lora.b[i]]
    g = torch.Generator().manual_seed(settings.seed + 1)
    if goal is not None and len(goal) != len(pressure):
        raise BadInputError(f"LoRA training got {len(goal)} goal scores for {len(pressure)} pressure decisions.")
    with torch.no_grad():
        target = decision_scores(option_scores(lm, list(baseline))).detach() if goal is None else goal.detach().float()
    kl = _kl_set(lm, [r.prompt for r in baseline], neutral, settings.topk)
    n_items, n_neutral = len(pressure), len(kl.ids) - len(baseline)
    opt = torch.optim.Adam(params, lr=settings.lr)
    log = TrainingLog(settings=settings)
    size = settings.batch + settings.neutral_per_step  # sequences per forward pass; halved after running out of memory
    with _frozen(lm), _training_hooks(lm, lora):
        for step in range(1, settings.steps + 1):
            items = torch.randperm(n_items, generator=g)[: settings.batch].tolist()
            passages = (len(baseline) + torch.randperm(n_neutral, generator=g)[: settings.neutral_per_step]).tolist() if n_neutral else []
            seqs = items + passages
            # Every decision position, plus a sample of the other positions.
            picks = [(j, len(kl.ids[i]) - 1) for j, i in enumerate(seqs) if kl.decision[i]]
            others = [(j, p) for j, i in enumerate(seqs) for p in _positions(kl.ids[i], kl.decision[i])
                      if not (kl.decision[i] and p == len(kl.ids[i]) - 1)]
            chosen = torch.randperm(len(others), generator=g)[: settings.kl_positions].tolist()
            picks += [others[c] for c in sorted(chosen)]

            def attempt() -> tuple[float, float]:
                opt.zero_grad(set_to_none=True)
                return _accumulate(lm, kl, pressure, target, items, seqs, picks, settings.kl_weight, size)

            def halve() -> bool:
                # The same step again in smaller passes: the gradients add up to the same sum.
                nonlocal size
                if size == 1:
                    return False
                size = (size + 1) // 2
                return True

            behaviour, kl_term = retry_smaller(lm, attempt, halve)
            opt.step()
            entry = {"step": step, "loss": behaviour + settings.kl_weight * kl_term, "behaviour": behaviour, "kl": kl_term}
            log.steps.append(entry)
            if on_step:
                on_step(step, entry)
    log.seconds = time.perf_counter() - t0
    trained = LoraWeights(
        modules=list(lora.modules),
        a=[a.detach().float().cpu() * m.cpu() for a, m in zip(lora.a, masks)],
        b=[b.detach().float().cpu() for b in lora.b],
        heads=list(lora.heads),
    )
    return trained, log
