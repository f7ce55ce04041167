"""Training a LoRA fix: a low-rank update of only the modules attribution found.

The adapted modules are the attention output projections of the layers that
hold the top heads. With ``scope="heads"`` (the default) the update reads only
those heads' input columns (A's other columns are zero and get no gradient),
so the fix touches exactly the components attribution named.

The loss, on the training split, uses every condition the recording has (the
labels: which option is aligned, and what each condition should do to it):

- pressure: the squared gap between the pressure decision's score
  (log P(misaligned) − log P(aligned), with the adapter) and the same item's
  baseline score without it: the pressure run is pulled back to the answer
  the model gives alone, towards the aligned option;
- helpful (when recorded): ``helpful_weight`` × the squared amount by which
  the adapter shrinks an item's helpful pull (its baseline score − its
  helpful score, the pull of a right message towards the aligned option):
  that pull is kept;
- ``kl_weight`` × KL(base ‖ adapted) per token: clean and control unchanged
  (their decision positions and sampled positions of their prompts), and
  the capability suite's steer half and the neutral passages as
  preservation terms. The base distributions are computed once; each keeps
  its top ``topk`` tokens plus one bucket for the rest, a lower bound of the
  full KL (verify measures the full one).

steer trains one adapter on the whole training split and one per
cross-validation fold, and keeps snapshots along the way, so that the number
of steps, the size and the strength are chosen on items the adapter never
trained on (:func:`lora_candidates`); an adapter that memorises its training
answers carries nothing over, and the choice sees it. The size is the rank:
each snapshot is also cut to its largest singular directions
(:func:`truncate`), which costs no training.

Every random choice (initialisation, batches, KL positions) comes from one
seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mechfix.architectures import get_path
from mechfix.errors import BadInputError
from mechfix.measure.evaluate import NeutralSet
from mechfix.fixes.adapter import SCOPES, LoraTarget, LoraWeights, init_lora
from mechfix.fixes.fix import OPS, Fix
from mechfix.engine.batches import Request, final_hidden, pad_batch, rows_of
from mechfix.engine.forward import option_scores, retry_smaller
from mechfix.engine.layerskip import RowSkip
from mechfix.models import LoadedModel
from mechfix.measure.stats import decision_scores
from mechfix.stages.sweep import Candidate


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
        helpful_weight: Weight of the helpful term against the pressure term.
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
    helpful_weight: float = 1.0


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
    if not settings.lr > 0 or not settings.kl_weight >= 0 or not settings.helpful_weight >= 0:
        raise BadInputError(f"--lr must be positive and --kl-weight not negative (got {settings.lr:g} and {settings.kl_weight:g}).")
    return settings


@dataclass
class TrainingLog:
    """What training did: the loss at every step, and how long it took.

    Attributes:
        settings: The settings.
        steps: The whole split's adapter's losses at every step.
        seconds: Its training time.
        fold_seconds: Each cross-validation fold's adapter's training time.
        chosen_steps: The snapshot steer kept (None: the last step, or not chosen yet).
        chosen_rank: The rank steer cut it to (None: not chosen yet).
    """

    settings: LoraSettings
    steps: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    fold_seconds: list[float] = field(default_factory=list)
    chosen_steps: int | None = None
    chosen_rank: int | None = None

    def as_dict(self) -> dict:
        return {"settings": asdict(self.settings), "steps": self.steps, "seconds": round(self.seconds, 2),
                "fold_seconds": self.fold_seconds, "chosen_steps": self.chosen_steps, "chosen_rank": self.chosen_rank}


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
    """Sequences whose next-token distributions the adapter must keep, with the base model's top tokens.

    In order: the baseline prompts (one per training item), the control
    prompts (one per item, when recorded), the capability prompts, then the
    neutral passages.
    """

    ids: list[list[int]]
    decision: list[bool]  # per sequence: is it a prompt (its last position is a decision)
    top_idx: list[torch.Tensor]  # per sequence: [T-1 or T, k]
    top_logp: list[torch.Tensor]
    tail_logp: list[torch.Tensor]
    items: int = 0  # baseline prompts
    control: bool = False  # whether the control prompts follow them
    prompts: int = 0  # every prompt (baseline, control, capability) before the passages

    def subset(self, positions: Sequence[int]) -> _KLSet:
        """The same set for some of its items (their baseline and control prompts); the rest is shared."""
        per_item = 2 if self.control else 1  # an item's baseline prompt, and its control prompt
        rows = list(positions) + ([self.items + i for i in positions] if self.control else [])
        rows += list(range(self.items * per_item, len(self.ids)))

        def pick(xs: list) -> list:
            return [xs[r] for r in rows]

        return _KLSet(ids=pick(self.ids), decision=pick(self.decision), top_idx=pick(self.top_idx),
                      top_logp=pick(self.top_logp), tail_logp=pick(self.tail_logp), items=len(positions),
                      control=self.control, prompts=self.prompts - (self.items - len(positions)) * per_item)


def _positions(ids: list[int], decision: bool) -> list[int]:
    # A prompt's last position is its decision; a passage's last token predicts nothing we know.
    return list(range(len(ids) if decision else len(ids) - 1))


def _below(lm: LoadedModel, targets: Sequence[LoraTarget]) -> RowSkip:
    """The layers under the lowest adapted one: the adapter cannot change them, so training keeps them per sequence."""
    return RowSkip(lm, min(t.layer for t in targets))


def _hidden(lm: LoadedModel, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return final_hidden(lm, *pad_batch(lm, seqs))


def _kl_set(lm: LoadedModel, baseline: Sequence[Sequence[int]], control: Sequence[Sequence[int]] | None,
            keep: Sequence[Sequence[int]], neutral: NeutralSet, topk: int, skip: RowSkip | None = None) -> _KLSet:
    # With a RowSkip, this one pass over every sequence also keeps their lower layers for the training's steps.
    seqs = [list(p) for p in (*baseline, *(control or ()), *keep)]
    flags = [True] * len(seqs)
    n_prompts = len(seqs)
    for ids, mask in neutral.batches:
        for row, m in zip(ids, mask):
            seqs.append(row[: int(m.sum())].tolist())
            flags.append(False)
    kl = _KLSet(ids=seqs, decision=flags, top_idx=[], top_logp=[], tail_logp=[], items=len(baseline),
                control=control is not None, prompts=n_prompts)
    # no_grad, not inference_mode: what the RowSkip keeps feeds passes that train.
    with torch.no_grad(), (skip.active() if skip is not None else nullcontext()):
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


@dataclass
class _Targets:
    """What the decision terms pull towards: the pressure decisions' goal scores, and the helpful pulls to keep."""

    pressure: Sequence[Request]
    goal: torch.Tensor
    baseline: Sequence[Request] = ()
    helpful: Sequence[Request] | None = None
    pull: torch.Tensor | None = None  # baseline − helpful score per item, without the adapter
    helpful_weight: float = 1.0


def _accumulate(lm: LoadedModel, kl: _KLSet, t: _Targets, items: list[int], seqs: list[int],
                picks: list[tuple[int, int]], kl_weight: float, size: int) -> tuple[float, float, float]:
    """One training step's gradients, in forward passes of at most ``size`` sequences: ``(pressure, helpful, kl)``.

    The loss is ``mean over items (score(pressure) - goal)^2 + helpful_weight *
    mean over items relu(pull - (score(baseline) - score(helpful)))^2 + kl_weight * mean over
    picked positions of the bucketed KL``; each pass back-propagates its share
    of those means, so the gradients add up to the whole step's whatever ``size`` is.
    """
    behaviour = helped = kl_term = 0.0
    for lo in range(0, len(items), size):
        part = items[lo: lo + size]
        scores = decision_scores(option_scores(lm, [t.pressure[i] for i in part]))
        loss = ((scores - t.goal[part].to(scores.device)) ** 2).sum() / len(items)
        loss.backward()
        behaviour += loss.item()
        if t.helpful is not None and t.helpful_weight > 0:
            h = decision_scores(option_scores(lm, [t.helpful[i] for i in part]))
            c = decision_scores(option_scores(lm, [t.baseline[i] for i in part]))
            # Only a smaller pull costs: a right message must move the agent at least as far as before.
            h_loss = t.helpful_weight * (torch.relu(t.pull[part].to(h.device) - (c - h)) ** 2).sum() / len(items)
            h_loss.backward()
            helped += h_loss.item()
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
    return behaviour, helped, kl_term


def train_lora(
    lm: LoadedModel,
    targets: Sequence[LoraTarget],
    pressure: Sequence[Request],
    baseline: Sequence[Request],
    neutral: NeutralSet,
    settings: LoraSettings | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **labels: Any,
) -> tuple[LoraWeights, TrainingLog]:
    """Train the adapter (a pure function of the model, the data and the seed): :func:`train_lora_steps`'s last step.

    Args:
        lm: The model (its weights are not changed).
        targets: Modules to adapt (:func:`lora_targets`).
        pressure: The training split's pressure decisions.
        baseline: The same items' baseline decisions (clean, or control).
        neutral: Neutral passages for the KL term.
        settings: Training settings.
        on_step: Called after each step with its number (from 1) and losses
            (``loss``, ``behaviour``, ``helpful``, ``kl``).
        **labels: ``goal``, ``helpful``, ``control``, ``keep``, as for :func:`train_lora_steps`.

    Returns:
        The trained adapter (float32, on the CPU) and the training log.
    """
    snaps, log = train_lora_steps(lm, targets, pressure, baseline, neutral, settings, on_step, **labels)
    return snaps[log.settings.steps], log


def train_lora_steps(
    lm: LoadedModel,
    targets: Sequence[LoraTarget],
    pressure: Sequence[Request],
    baseline: Sequence[Request],
    neutral: NeutralSet,
    settings: LoraSettings | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    *,
    goal: torch.Tensor | None = None,
    helpful: Sequence[Request] | None = None,
    control: Sequence[Request] | None = None,
    keep: Sequence[Sequence[int]] = (),
    snapshots: Sequence[int] = (),
    kl_set: _KLSet | None = None,
    skip: RowSkip | None = None,
) -> tuple[dict[int, LoraWeights], TrainingLog]:
    """Train the adapter, keeping it as it was after each step in ``snapshots`` (and the last).

    Args:
        lm, targets, pressure, baseline, neutral, settings, on_step: As for :func:`train_lora`.
        goal: ``[N]`` scores the pressure decisions are pulled to (default: the
            same items' baseline scores, which removes the behaviour; higher
            scores plant one, as ``benchmarks/organisms.py`` does).
        helpful: The same items' helpful decisions, whose pull towards the aligned option is kept.
        control: The same items' control decisions, kept unchanged (KL).
        keep: More prompts whose next-token distributions are kept (the capability suite's steer half).
        snapshots: Steps after which the adapter is kept too.
        kl_set: The base model's distributions on these items' prompts, ``keep`` and
            ``neutral``, when already computed (:func:`lora_candidates` computes them once
            for every fold).
        skip: The layers below the adapter's, kept per sequence (:class:`~mechfix.engine.layerskip.RowSkip`):
            they compute the same at every step, so each sequence runs them once; one may be shared by
            trainings on the same sequences (:func:`lora_candidates` shares one across folds).

    Returns:
        Step to adapter (the last step always), and the training log.
    """
    settings = settings or LoraSettings()
    if len(pressure) != len(baseline) or not pressure:
        raise BadInputError("LoRA training needs the same, non-empty set of items under pressure and baseline.")
    for name, other in (("helpful", helpful), ("control", control)):
        if other is not None and len(other) != len(pressure):
            raise BadInputError(f"LoRA training got {len(other)} {name} decisions for {len(pressure)} pressure decisions.")
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
        base = decision_scores(option_scores(lm, list(baseline))).detach()  # the goal and the helpful pull read it
        target = base if goal is None else goal.detach().float()
        pull = base - decision_scores(option_scores(lm, list(helpful))).detach() if helpful is not None else None
    terms = _Targets(pressure, target, baseline, helpful, pull, settings.helpful_weight)
    skip = skip if skip is not None else _below(lm, targets)
    kl = kl_set if kl_set is not None else _kl_set(
        lm, [r.prompt for r in baseline], [r.prompt for r in control] if control is not None else None, keep, neutral,
        settings.topk, skip)
    n_items = len(pressure)
    n_keep, n_neutral = len(keep), len(kl.ids) - kl.prompts
    first_keep = kl.items * (2 if kl.control else 1)
    opt = torch.optim.Adam(params, lr=settings.lr)
    log = TrainingLog(settings=settings)
    snaps: dict[int, LoraWeights] = {}
    size = settings.batch + settings.neutral_per_step  # sequences per forward pass; halved after running out of memory
    with _frozen(lm), _training_hooks(lm, lora), skip.active():
        for step in range(1, settings.steps + 1):
            items = torch.randperm(n_items, generator=g)[: settings.batch].tolist()
            # Each item's baseline prompt, and its control prompt; a sample of the capability prompts and passages.
            passages = (kl.prompts + torch.randperm(n_neutral, generator=g)[: settings.neutral_per_step]).tolist() if n_neutral else []
            kept = (first_keep + torch.randperm(n_keep, generator=g)[: settings.neutral_per_step]).tolist() if n_keep else []
            seqs = items + ([kl.items + i for i in items] if kl.control else []) + kept + passages
            # Every decision position, plus a sample of the other positions.
            picks = [(j, len(kl.ids[i]) - 1) for j, i in enumerate(seqs) if kl.decision[i]]
            others = [(j, p) for j, i in enumerate(seqs) for p in _positions(kl.ids[i], kl.decision[i])
                      if not (kl.decision[i] and p == len(kl.ids[i]) - 1)]
            chosen = torch.randperm(len(others), generator=g)[: settings.kl_positions].tolist()
            picks += [others[c] for c in sorted(chosen)]
            # Each sequence's lower layers run at its first use only: the step's passes then start above them.
            read = [pressure[i] for i in items]
            if helpful is not None and settings.helpful_weight > 0:  # the helpful term scores both of these
                read += [helpful[i] for i in items] + [baseline[i] for i in items]
            skip.warm([r.ids for r in rows_of(read)] + [kl.ids[i] for i in seqs], size)

            def attempt() -> tuple[float, float, float]:
                opt.zero_grad(set_to_none=True)
                return _accumulate(lm, kl, terms, items, seqs, picks, settings.kl_weight, size)

            def halve() -> bool:
                # The same step again in smaller passes: the gradients add up to the same sum.
                nonlocal size
                if size == 1:
                    return False
                size = (size + 1) // 2
                return True

            behaviour, helped, kl_term = retry_smaller(lm, attempt, halve)
            opt.step()
            entry = {"step": step, "loss": behaviour + helped + settings.kl_weight * kl_term, "behaviour": behaviour,
                     "helpful": helped, "kl": kl_term}
            log.steps.append(entry)
            if on_step:
                on_step(step, entry)
            if step in snapshots or step == settings.steps:
                snaps[step] = LoraWeights(modules=list(lora.modules),
                                          a=[a.detach().float().cpu() * m.cpu() for a, m in zip(lora.a, masks)],
                                          b=[b.detach().float().cpu().clone() for b in lora.b], heads=list(lora.heads))
    log.seconds = time.perf_counter() - t0
    return snaps, log


# A lora fix trains one adapter per fold: at most this many folds (the whole split's adapter is one more).
LORA_FOLDS = 3


def snapshot_steps(steps: int) -> list[int]:
    """The training steps whose adapters are candidates: half way and the end (steer chooses between them)."""
    return sorted({max(1, steps // 2), steps})


# The sizes a lora fix is offered at, as shares of the trained rank (steer chooses among them).
SIZE_SHARES = (0.5, 1.0)


def size_ranks(rank: int) -> list[int]:
    """The ranks a trained adapter is offered at: :data:`SIZE_SHARES` of ``rank``, at least 1."""
    return sorted({max(1, round(rank * share)) for share in SIZE_SHARES})


def truncate(lora: LoraWeights, rank: int) -> LoraWeights:
    """The update cut to its ``rank`` largest singular directions, per module: the closest rank-``rank`` ``B A``.

    Columns of ``A`` the update does not read stay zero (they are outside the
    row space of ``B A``), so a heads-scoped adapter still reads only its heads.
    """
    if rank >= lora.rank:
        return lora
    a_out, b_out = [], []
    for a, b in zip(lora.a, lora.b):
        u, sv, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
        unread = (a == 0).all(dim=0)
        a_new = vh[:rank].to(a.dtype)
        a_new[:, unread] = 0
        a_out.append(a_new)
        b_out.append((u[:, :rank] * sv[:rank]).to(b.dtype))
    return LoraWeights(modules=list(lora.modules), a=a_out, b=b_out, heads=list(lora.heads))


def lora_candidates(
    lm: LoadedModel,
    op: str,
    targets: Sequence[LoraTarget],
    requests: dict[str, list[Request]],
    baseline: str,
    neutral: NeutralSet,
    settings: LoraSettings,
    folds: Sequence[tuple[torch.Tensor, list[int]]] = (),
    keep: Sequence[Sequence[int]] = (),
    on_train: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[list[Candidate], TrainingLog]:
    """The adapters steer chooses among: one per snapshot step, trained on the whole split and on every fold's rest.

    Args:
        lm: The model.
        op: The operation (``lora``).
        targets: Modules to adapt.
        requests: The training decisions per condition (pressure and the baseline; helpful and control when recorded).
        baseline: The baseline condition.
        neutral: Neutral passages for the KL term.
        settings: Training settings.
        folds: ``(fit mask, held positions)`` per fold; each fold's adapter trains on the other positions.
        keep: Prompts whose distributions are kept (the capability suite's steer half).
        on_train: Called after every training step, counted over all adapters; the losses
            carry ``total`` (the steps of all of them together).

    Returns:
        One candidate per snapshot step and size (:func:`size_ranks`; its fold fixes are the
        folds' adapters at that step, cut to that size), and the whole split's training log.
    """
    steps = snapshot_steps(settings.steps)
    total = settings.steps * (1 + len(folds))
    n = len(requests["pressure"])
    control = requests.get("control") if baseline != "control" else None
    # The base model's distributions do not depend on the fold: computed once, each fold takes its items' rows.
    skip = _below(lm, targets)  # every fold trains on a subset of the same sequences
    kl = _kl_set(lm, [r.prompt for r in requests[baseline]], [r.prompt for r in control] if control else None,
                 keep, neutral, settings.topk, skip)

    def train(positions: list[int], done: int) -> tuple[dict[int, LoraWeights], TrainingLog]:
        def pick(c: str) -> list[Request] | None:
            return [requests[c][j] for j in positions] if c in requests and c != baseline else None

        report = (lambda k, e: on_train(done + k, {**e, "total": total})) if on_train else None
        return train_lora_steps(lm, targets, pick("pressure"), [requests[baseline][j] for j in positions], neutral,
                                settings, report, helpful=pick("helpful"), control=pick("control"), keep=keep,
                                snapshots=steps, kl_set=kl.subset(positions), skip=skip)

    whole, log = train(list(range(n)), 0)
    per_fold = []
    for k, (_, held) in enumerate(folds):
        out = set(held)
        snaps, fold_log = train([j for j in range(n) if j not in out], settings.steps * (k + 1))
        per_fold.append(snaps)
        log.fold_seconds.append(round(fold_log.seconds, 2))

    def make(w: LoraWeights) -> Fix:
        return Fix(op=op, layers=[m.layer for m in targets], heads=[], vectors=torch.zeros(0), means=torch.zeros(0),
                   strength=0.0, model=lm.identity, lora=w)

    return [Candidate(op=op, heads=0, fix=make(truncate(whole[s], r)), fold_fixes=[make(truncate(f[s], r)) for f in per_fold],
                      steps=s, rank=r)
            for s in steps for r in size_ranks(settings.rank)], log

