"""Option groups: options several commands take, declared once.

A group is a dataclass of annotated options. A command names it as one
parameter (``models: ModelOptions``), and :func:`with_groups` unfolds the
group's options into the command's signature at that place, so ``--help``
lists them as before, then folds what the user gave back into one group
object for the command's body::

    @app.command()
    @with_groups
    def steer(attribution: ..., budget: BudgetOptions, models: ModelOptions, ...) -> None:
        lm, batch_size = models.load(trust_remote_code)
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from mechfix.cli.common import (
    BackendOpt,
    BatchOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    GateCleanOpt,
    GateLayerOpt,
    GateNeutralOpt,
    GateOpt,
    KlWeightOpt,
    LrOpt,
    MaxHelpfulLossOpt,
    MaxOvershootOpt,
    MaxKlOpt,
    MinCapabilityOpt,
    MinCleanMarginOpt,
    MinCleanOpt,
    ModelOpt,
    RankOpt,
    RemoteOpt,
    ScopeOpt,
    StepsOpt,
    gate_settings,
    load_command_model,
    parse_batch_size,
    resolve_batch_size,
)
from mechfix.defaults import MAX_HELPFUL_LOSS, MAX_KL, MAX_OVERSHOOT, MIN_CAPABILITY, MIN_CLEAN_AGREEMENT, MIN_CLEAN_MARGIN


class OptionGroup:
    """Base of the option groups (each a dataclass whose fields are annotated options with defaults)."""

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The group's options as a command's parameters, in declaration order."""
        hints = get_type_hints(cls, include_extras=True)
        return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name], default=f.default)
                for f in fields(cls)]  # type: ignore[arg-type]


def with_groups(command: Any) -> Any:
    """Unfold every :class:`OptionGroup` parameter of ``command`` into its options (see the module's docstring)."""
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, type[OptionGroup]] = {}
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        if isinstance(p.annotation, type) and issubclass(p.annotation, OptionGroup):
            groups[p.name] = p.annotation
            params += p.annotation.parameters()
        else:
            params.append(p)

    @functools.wraps(command)
    def unfolded(**given: Any) -> Any:
        for name, group in groups.items():
            given[name] = group(**{f.name: given.pop(f.name) for f in fields(group)})  # type: ignore[arg-type]
        return command(**given)

    unfolded.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    unfolded.__annotations__ = {p.name: p.annotation for p in params}
    return unfolded


@dataclass
class ModelOptions(OptionGroup):
    """Which model, where it runs, and how many sequences a pass takes (``--trust-remote-code`` stays a command's own)."""

    model: ModelOpt = None
    device: DeviceOpt = None
    dtype: DtypeOpt = None
    backend: BackendOpt = None
    remote: RemoteOpt = False
    device_map: DeviceMapOpt = None
    batch_size: BatchOpt = "auto"

    def batch(self) -> int | None:
        """``--batch-size`` checked (None: auto); call it before the model loads, so a bad value costs nothing."""
        return parse_batch_size(self.batch_size)

    def load(self, trust_remote_code: bool, default: str | None = None) -> tuple[Any, int]:
        """The model (``--model``, else ``default``, else the embedded one) on its backend, and the batch size to run."""
        batch = self.batch()
        spec = self.model if self.model is not None else default
        lm = load_command_model(spec, self.device, self.dtype, trust_remote_code, backend=self.backend, remote=self.remote,
                                device_map=self.device_map)
        return lm, resolve_batch_size(lm, batch)


@dataclass
class BudgetOptions(OptionGroup):
    """The side-effect budget a fix must keep (also verify's gates beside ``--min-reduction``)."""

    max_kl: MaxKlOpt = MAX_KL
    min_clean_agreement: MinCleanOpt = MIN_CLEAN_AGREEMENT
    min_capability: MinCapabilityOpt = MIN_CAPABILITY
    max_helpful_loss: MaxHelpfulLossOpt = MAX_HELPFUL_LOSS
    min_clean_margin: MinCleanMarginOpt = MIN_CLEAN_MARGIN
    max_overshoot: MaxOvershootOpt = MAX_OVERSHOOT

    def budget(self):
        """As steer's :class:`~mechfix.stages.sweep.Budget`."""
        from mechfix.stages.sweep import Budget

        return Budget(max_kl=self.max_kl, min_clean_agreement=self.min_clean_agreement, min_capability=self.min_capability,
                      max_helpful_loss=self.max_helpful_loss, min_clean_margin=self.min_clean_margin,
                      max_overshoot=self.max_overshoot)

    def gates(self, min_reduction: float) -> list:
        """As verify's gates, with ``--min-reduction``."""
        from mechfix.stages.verify import budget_gates

        return budget_gates(self.budget(), min_reduction)


@dataclass
class LoraOptions(OptionGroup):
    """How a LoRA fix is trained (``--kind lora``)."""

    rank: RankOpt = 4
    steps: StepsOpt = 40
    lr: LrOpt = 5e-3
    kl_weight: KlWeightOpt = 10.0
    lora_scope: ScopeOpt = "heads"

    def settings(self, seed: int):
        """As :class:`~mechfix.stages.lora.LoraSettings`, checked.

        Raises:
            BadInputError: For settings that cannot train.
        """
        from mechfix.stages.lora import LoraSettings, lora_settings_check

        return lora_settings_check(LoraSettings(rank=self.rank, steps=self.steps, lr=self.lr, kl_weight=self.kl_weight,
                                                scope=self.lora_scope, seed=seed))


@dataclass
class ProbeOptions(OptionGroup):
    """A probe gate: the fix acts only where a linear probe says the agent is under pressure."""

    gate: GateOpt = "none"
    gate_layer: GateLayerOpt = None
    gate_max_clean: GateCleanOpt = 0.05
    gate_max_neutral: GateNeutralOpt = 0.01

    def settings(self, kind: str):
        """As :class:`~mechfix.fixes.gate.GateSettings` (None for ``--gate none``), checked against the fix kind."""
        return gate_settings(self.gate, self.gate_layer, self.gate_max_clean, self.gate_max_neutral, kind)
