"""LoRA weights: the low-rank update, the modules it adapts, and its folder on disk.

A LoRA fix on disk is a PEFT adapter folder that also is a mechfix artifact.

The folder holds what ``peft.PeftModel.from_pretrained(model, folder)`` reads,
and nothing it would not understand:

- ``adapter_config.json``: a LoRA config (``peft_type = LORA``) naming the
  adapted modules by their full dotted path, with ``lora_alpha = r`` (PEFT's
  scaling is 1; the update's size lives in the weights) and no absolute paths.
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight``
  ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` per module, PEFT's own key
  names. Its ``__metadata__`` carries the mechfix kind, schema and manifest,
  so ``mechfix show``, ``verify`` and :func:`mechfix.load_fix` read it like
  any other artifact.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechfix.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Artifact,
    artifact_metadata,
    atomic_dir,
    check_writable_dir,
    sha256_file,
    write_safetensors,
)
from mechfix.architectures import get_path
from mechfix.errors import ArtifactError, BadInputError
from mechfix.models import LoadedModel
from mechfix.textio import load_json, read_text
from mechfix.untrusted import visible


@dataclass
class LoraWeights:
    """A low-rank update of some linear modules, as PEFT's LoRA computes it: ``W x + B A x``.

    PEFT's ``lora_alpha / r`` scaling is folded into ``B`` (mechfix writes
    ``lora_alpha = r``), so ``B A`` is the whole update.

    Attributes:
        modules: Dotted path of each module from the causal-LM module
            (``model.layers.12.self_attn.o_proj``), as PEFT names its targets.
        a: ``[r, in]`` per module. Columns outside ``heads`` are zero.
        b: ``[out, r]`` per module.
        heads: Per module, the heads whose input columns the update reads, or
            None for every column.
    """

    modules: list[str]
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    heads: list[list[int] | None]

    @property
    def rank(self) -> int:
        return int(self.a[0].shape[0]) if self.a else 0


SCOPES = ("heads", "modules")

@dataclass
class LoraTarget:
    """One module to adapt.

    Attributes:
        module: Dotted path from the causal-LM module (PEFT's target name).
        layer: Its decoder layer.
        heads: Heads whose input columns the update may read (None: all).
        in_features: Input width.
        out_features: Output width.
        fan_in_fan_out: The module stores its weight as ``[in, out]`` (GPT-2's Conv1D).
    """

    module: str
    layer: int
    heads: list[int] | None
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False

    def mask(self, head_dim: int) -> torch.Tensor:
        """``[in]``: 1 on the columns the update may read."""
        if self.heads is None:
            return torch.ones(self.in_features)
        m = torch.zeros(self.in_features)
        for h in self.heads:
            m[h * head_dim : (h + 1) * head_dim] = 1.0
        return m

def lora_targets(lm: LoadedModel, layers: Sequence[int], heads: Sequence[int], scope: str = "heads") -> list[LoraTarget]:
    """The attention output projections of the layers holding the given heads.

    Args:
        lm: The model.
        layers: Layer of each found head.
        heads: Index of each found head.
        scope: ``heads`` to restrict each update to its found heads' columns, ``modules`` for whole modules.

    Raises:
        BadInputError: For an unknown scope.
    """
    if scope not in SCOPES:
        raise BadInputError(f"--lora-scope must be one of {', '.join(SCOPES)}, not '{scope}'.")
    by_layer: dict[int, list[int]] = {}
    for layer, h in zip(layers, heads):
        by_layer.setdefault(int(layer), []).append(int(h))
    out = []
    for layer in sorted(by_layer):
        path = f"{lm.spec.layers}.{layer}.{lm.spec.attn_out}"
        weight = get_path(lm.model, path).weight
        rows, cols = weight.shape
        flip = lm.spec.attn_out_fan_in_fan_out
        in_f, out_f = (rows, cols) if flip else (cols, rows)
        out.append(LoraTarget(path, layer, sorted(by_layer[layer]) if scope == "heads" else None, in_f, out_f, flip))
    return out

def init_lora(targets: Sequence[LoraTarget], rank: int, head_dim: int, seed: int) -> LoraWeights:
    """PEFT's default start: A uniform in ±1/sqrt(in) (masked), B zero, so the update starts at zero."""
    if rank < 1:
        raise BadInputError(f"--rank must be at least 1, not {rank}.")
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for t in targets:
        bound = 1.0 / t.in_features**0.5
        a.append((torch.rand(rank, t.in_features, generator=g) * 2 - 1) * bound * t.mask(head_dim))
        b.append(torch.zeros(t.out_features, rank))
    return LoraWeights(modules=[t.module for t in targets], a=a, b=b, heads=[t.heads for t in targets])


_PREFIX = "base_model.model."


def weight_keys(module: str) -> tuple[str, str]:
    """PEFT's key names of a module's A and B matrices."""
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def adapter_tensors(lora: LoraWeights) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    out = {}
    for module, a, b in zip(lora.modules, lora.a, lora.b):
        ka, kb = weight_keys(module)
        out[ka], out[kb] = a.float(), b.float()
    return out


def peft_config(lora: LoraWeights, base_model: str | None, fan_in_fan_out: bool = False) -> dict[str, Any]:
    """A PEFT LoRA config for the adapter.

    Only long-standing LoRA keys are written, so older and newer PEFT versions
    read it. ``base_model_name_or_path`` is a Hugging Face id or None, never a
    local path (the folder stays valid on another machine).

    Args:
        lora: The adapter.
        base_model: The base model's hub id, if it has one.
        fan_in_fan_out: The adapted modules store their weight as ``[in, out]`` (GPT-2's Conv1D).
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": lora.rank,
        "lora_alpha": lora.rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": list(lora.modules),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def hub_id(source: str | None) -> str | None:
    """A model source that is a Hugging Face id (``org/name``), else None (local paths stay out of the config)."""
    if not source or source.endswith(".gguf") or source.startswith((".", "/", "~")) or os.path.exists(source):
        return None
    return source if source.count("/") == 1 else None


def save_adapter(path: str | Path, artifact: Artifact, config: dict[str, Any]) -> str:
    """Write a LoRA fix folder atomically (an earlier adapter folder at ``path`` is replaced).

    Args:
        path: The folder.
        artifact: A ``fix`` artifact whose tensors are PEFT-named LoRA weights.
        config: The PEFT config (:func:`peft_config`).

    Returns:
        The sha256 of the weights file.
    """
    path = check_writable_dir(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in artifact.tensors.items()}
    with atomic_dir(path) as tmp:
        write_safetensors(tensors, tmp / ADAPTER_WEIGHTS, artifact_metadata(artifact))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        digest = sha256_file(tmp / ADAPTER_WEIGHTS)
    artifact.path, artifact.sha256 = str(path), digest
    return digest


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ArtifactError(f"'{folder}' has no {ADAPTER_CONFIG}; it is not a complete adapter. Make it again with `mechfix steer --kind lora`.")
    try:
        cfg = load_json(read_text(cfg_path, "adapter config", 2**20, ArtifactError))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"'{cfg_path}' is not valid JSON ({exc}). Make the adapter again with `mechfix steer --kind lora`.") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA" or not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise ArtifactError(f"'{cfg_path}' is not a LoRA config (it needs peft_type LORA and a positive r). Make it again with `mechfix steer --kind lora`.")
    return cfg


def lora_from_artifact(art: Artifact) -> tuple[LoraWeights, list[int]]:
    """The adapter of a loaded LoRA fix folder, with PEFT's scaling folded into B, and each module's layer.

    The scaling is read from ``adapter_config.json`` exactly as PEFT reads it
    (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA), so mechfix applies the
    same update PEFT would, even to a hand-edited config.

    Raises:
        ArtifactError: For a missing or foreign config, or weights that do not match the manifest.
    """
    if art.path is None or not Path(art.path).is_dir():
        raise ArtifactError(f"'{art.path}' is a lora fix but not an adapter folder. Give the folder `mechfix steer --kind lora` wrote.")
    cfg = _read_config(Path(art.path))
    model = art.manifest.get("model", {})
    made_for = hub_id(model.get("source"))
    named = cfg.get("base_model_name_or_path")
    # mechfix writes the base model's hub id there, or nothing for a model without one (a local folder, a GGUF file,
    # the embedded default): any other name means the config is another adapter's.
    if named and named != made_for:
        made = f"'{made_for}'" if made_for else f"{visible(model.get('name'))}, which has no hub id"
        raise ArtifactError(
            f"'{art.path}': {ADAPTER_CONFIG} names the base model '{visible(named)}', but the adapter's manifest says it "
            f"was made for {made}. The folder was edited or mixed up with another adapter; mechfix will not apply it. "
            "Make the adapter again with `mechfix steer --kind lora`."
        )
    desc = art.manifest.get("fix", {})
    entries = desc.get("modules") or []
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    modules, a, b, heads, layers = [], [], [], [], []
    for e in entries:
        ka, kb = weight_keys(e["module"])
        if ka not in art.tensors or kb not in art.tensors:
            raise ArtifactError(f"'{art.path}' lacks the weights of module '{e['module']}' that its manifest names. Make it again with `mechfix steer --kind lora`.")
        A, B = art.tensors[ka].float(), art.tensors[kb].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ArtifactError(f"'{art.path}': module '{e['module']}' has A {tuple(A.shape)} and B {tuple(B.shape)}, which do not fit rank {r}.")
        modules.append(e["module"])
        a.append(A)
        b.append(B * scaling)
        heads.append(e.get("heads"))
        layers.append(int(e["layer"]))
    if not modules:
        raise ArtifactError(f"'{art.path}' names no adapted modules in its manifest. Make it again with `mechfix steer --kind lora`.")
    return LoraWeights(modules=modules, a=a, b=b, heads=heads), layers
