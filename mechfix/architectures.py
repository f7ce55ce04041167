"""Where each model family keeps the parts mechfix reads and patches.

This is a table of data, not code: supporting a new family means adding one
row. Paths are dotted attribute paths; ``layers`` is from the causal-LM
module, ``attn_out`` and ``mlp`` are from one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mechfix.errors import ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its decoder layers and their parts.

    Attributes:
        backbone: Module whose output's first element is the final, normed hidden state.
        layers: The list of decoder layers (from the causal-LM module).
        attn_out: The attention output projection inside a layer. Its *input*
            is the per-head attention output, heads concatenated.
        mlp: The MLP inside a layer; its output is the MLP output site.
        n_heads: Config keys that may hold the number of attention heads.
        head_dim: Config keys that may hold the head width (else hidden / heads).
        hidden: Config keys that may hold the residual width.
        logit_softcap: Config key of a final logit soft-cap (Gemma 2/3), if any.
        gguf_arch: The family's name in llama.cpp (``general.architecture`` of its
            GGUF files), written as a control vector's ``model_hint``.
        attn_out_fan_in_fan_out: The attention output projection stores its
            weight as ``[in, out]`` (GPT-2's Conv1D), which a LoRA adapter's
            config must say.
        attn_out_bias: Whether the attention output projection can carry a bias
            in a checkpoint (a merged fix's constant term): ``always`` (it has
            one), a config key that switches biases on (``attention_bias``), or
            None (the family builds it without one, whatever the config says).
        bias_with: The modules of a layer that the config key also gives a bias
            (a merged checkpoint writes theirs as zeros).
    """

    backbone: str
    layers: str
    attn_out: str
    mlp: str
    n_heads: tuple[str, ...] = ("num_attention_heads",)
    head_dim: tuple[str, ...] = ("head_dim",)
    hidden: tuple[str, ...] = ("hidden_size",)
    logit_softcap: str | None = None
    gguf_arch: str | None = None
    attn_out_fan_in_fan_out: bool = False
    attn_out_bias: str | None = None
    bias_with: tuple[str, ...] = ()


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LIKE = ArchSpec(backbone="model", layers="model.layers", attn_out="self_attn.o_proj", mlp="mlp", gguf_arch="llama",
                       attn_out_bias="attention_bias", bias_with=_QKV)
# Mistral, Qwen2 and Phi-3 build their output projection without a bias, whatever the config says.
_NO_BIAS = replace(_LLAMA_LIKE, attn_out_bias=None, bias_with=())
_GEMMA = ArchSpec(
    backbone="model",
    layers="model.layers",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    logit_softcap="final_logit_softcapping",
    gguf_arch="gemma",
    attn_out_bias="attention_bias",
    bias_with=_QKV,
)

# Keyed by ``config.model_type``.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gemma": _GEMMA,
    "gemma2": replace(_GEMMA, gguf_arch="gemma2"),
    "gemma3_text": replace(_GEMMA, gguf_arch="gemma3"),
    "llama": _LLAMA_LIKE,
    "mistral": _NO_BIAS,  # llama.cpp runs Mistral as "llama"
    "qwen2": replace(_NO_BIAS, gguf_arch="qwen2"),
    "qwen3": replace(_LLAMA_LIKE, gguf_arch="qwen3"),
    "phi3": replace(_NO_BIAS, gguf_arch="phi3"),
    "gpt2": ArchSpec(
        backbone="transformer",
        layers="transformer.h",
        attn_out="attn.c_proj",
        mlp="mlp",
        n_heads=("n_head",),
        head_dim=(),
        hidden=("n_embd",),
        gguf_arch="gpt2",
        attn_out_fan_in_fan_out=True,
        attn_out_bias="always",
    ),
    "gpt_neox": ArchSpec(
        backbone="gpt_neox",
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        mlp="mlp",
        gguf_arch="gptneox",
        attn_out_bias="attention_bias",
        bias_with=("attention.query_key_value",),
    ),
}


def spec_for(model_type: str) -> ArchSpec:
    """Look up a family's row.

    Raises:
        ModelLoadError: For a family the table does not cover.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(
            f"mechfix does not know where the attention heads of '{model_type}' models live "
            f"(supported: {known}). Add a row to mechfix/architectures.py, or pick a supported model."
        ) from None


def config_value(config: object, keys: tuple[str, ...]) -> int | None:
    """First of ``keys`` that the config sets to a value."""
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    return None


def get_path(root: object, dotted: str) -> object:
    """Follow a dotted attribute path (``model.layers``) from ``root``."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
