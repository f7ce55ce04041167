"""Restoring whole modules at every position: the exact effect a change of a module's weights can have.

A fix that changes weights (a LoRA update of an attention output projection,
say) acts at every position, not only where the answer is given: a module may
do its part where a trigger is read, many tokens before the decision. Patching
at the decision position cannot see that, and attribution patching summed over
positions is a linear guess. This is the exact measure: for each decision and
each unit (a layer's attention output or its MLP output), the pressure prompt
is run with that unit's activations at every prompt position set to the
baseline prompt's; the score change is the unit's effect (computed by the
caller, :mod:`mechfix.stages.attribute`).

It needs prompts that are token-aligned (the same length in both conditions,
so position ``t`` of one is position ``t`` of the other); the caller checks.

The overwrite is an edit (:func:`mechfix.engine.edits.add_hook`), so it runs on
every backend the way a fix does; which unit and values a row takes is set
before each batch from the rows' request indices, as per-row fixes are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mechfix.engine.batches import Request
from mechfix.engine.edits import add_hook
from mechfix.engine.forward import run_requests
from mechfix.models import LoadedModel

# The units that can be restored, by the site of :mod:`mechfix.engine.batches` that holds their activations:
# a layer's attention output is its output projection's input (the heads, together; the projection is linear,
# so restoring its input restores its output), the MLP's is its output.
UNIT_SITES = {"attn": "heads", "mlp": "mlp"}


@dataclass(frozen=True)
class Unit:
    """One module restored at every position: ``kind`` (``attn`` or ``mlp``) of decoder layer ``layer``."""

    kind: str
    layer: int


class _Restorer:
    """The edits: each row of a batch takes one job's unit and one decision's baseline activations."""

    def __init__(self, lm: LoadedModel, jobs: Sequence[tuple[int, Unit]], values: Sequence[dict[str, torch.Tensor]]):
        self.lm, self.jobs, self.values = lm, jobs, values
        self.current: dict[Unit, list[tuple[int, torch.Tensor]]] = {}

    def select(self, requests: list[int]) -> None:
        """Before a batch: which rows restore which unit, and with what (``[T, width]`` per row)."""
        self.current = {}
        for row, job in enumerate(requests):
            item, unit = self.jobs[job]
            acts = self.values[item][UNIT_SITES[unit.kind]][:, unit.layer]  # [T, ...]
            self.current.setdefault(unit, []).append((row, acts.reshape(acts.shape[0], -1)))

    def overwrite(self, unit: Unit, x: torch.Tensor) -> torch.Tensor | None:
        rows = self.current.get(unit)
        if not rows:
            return None
        x = x.clone()
        for row, acts in rows:
            n = min(acts.shape[0], x.shape[1])  # the prompt's positions; option tokens after it are left alone
            x[row, :n] = acts[:n].to(device=x.device, dtype=x.dtype)
        return x

    def hook(self, unit: Unit) -> Callable:
        if unit.kind == "attn":
            def pre(module, args, unit=unit):
                new = self.overwrite(unit, args[0])
                return None if new is None else (new, *args[1:])

            return pre

        def post(module, args, out, unit=unit):
            first = out[0] if isinstance(out, tuple) else out
            new = self.overwrite(unit, first)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return post


@contextmanager
def _restoring(lm: LoadedModel, units: Sequence[Unit], restorer: _Restorer) -> Iterator[None]:
    handles = []
    try:
        for u in units:
            module = lm.attn_out(u.layer) if u.kind == "attn" else lm.mlp(u.layer)
            handles.append(add_hook(lm, module, restorer.hook(u), pre=u.kind == "attn"))
        yield
    finally:
        for h in handles:
            h.remove()


def all_units(n_layers: int, kinds: Sequence[str] = tuple(UNIT_SITES)) -> list[Unit]:
    """Every layer's units, layer by layer."""
    return [Unit(k, i) for i in range(n_layers) for k in kinds]


def restored_scores(
    lm: LoadedModel,
    pressure: Sequence[Request],
    baseline: Sequence[Request],
    units: Sequence[Unit],
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Option scores of the pressure decisions as they are and with each unit restored at every position.

    Args:
        lm: The model.
        pressure: The decisions under pressure.
        baseline: The same decisions in the baseline condition, each prompt as long as its pressure prompt.
        units: Units to restore.
        batch_size: Sequences per forward pass.
        on_batch: Progress: called with the number of patched runs finished.

    Returns:
        ``(plain [N, K], restored [N, U, K])``: summed log-probabilities of each option.

    Raises:
        ValueError: When a pair of prompts differs in length.
    """
    if len(pressure) != len(baseline) or any(len(p.prompt) != len(b.prompt) for p, b in zip(pressure, baseline)):
        raise ValueError("restoring at every position needs token-aligned pressure and baseline prompts")
    sites = sorted({UNIT_SITES[u.kind] for u in units})
    values = [r.acts for r in run_requests(lm, baseline, batch_size=batch_size, sites=sites, all_positions=True)]
    # Unpatched scores from the same kind of pass as the patched ones, so that a difference is the patch alone.
    plain = torch.stack([r.scores for r in run_requests(lm, pressure, batch_size=batch_size, sites=())])
    jobs = [(j, u) for j in range(len(pressure)) for u in units]
    restorer = _Restorer(lm, jobs, values)
    with _restoring(lm, units, restorer):
        res = run_requests(lm, [pressure[j] for j, _ in jobs], batch_size=batch_size, sites=(),
                           on_rows=restorer.select, on_batch=on_batch)
    return plain, torch.stack([r.scores for r in res]).view(len(pressure), len(units), -1)
