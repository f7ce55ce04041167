"""Tiny random models and a byte-level tokenizer, built in-process (no download)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mechfix.models import LoadedModel, wrap_model

SPECIALS = ["<pad>", "<bos>", "<eos>"]
VOCAB = len(SPECIALS) + 256

_COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# One small config per family in the architecture table: 3 layers, 4 heads.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4),
    "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, final_logit_softcapping=5.0, sliding_window=16),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=32, sliding_window=16),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fast byte-level tokenizer (one token per byte, BOS added), with offsets."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(arch: str = "llama", seed: int = 0) -> LoadedModel:
    """A random model of ``arch`` (a key of TINY_CONFIGS), wrapped for mechfix."""
    cfg = AutoConfig.for_model(arch, **_COMMON, **TINY_CONFIGS[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return wrap_model(model, byte_tokenizer(), name=f"tiny-{arch}")


def save_model_dir(lm: LoadedModel, folder):
    """Save a model and its tokenizer with save_pretrained (for --model on the CLI); returns the folder."""
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def gpt2_lora_fix(lm: LoadedModel, seed: int = 0, scale: float = 0.1, strength: float = 1.0):
    """A LoRA fix on a tiny GPT-2 (Conv1D projections) of layers 1 and 2, reading heads 0 and 3, with a trained-looking B."""
    import torch as _torch

    from mechfix.fixes.fix import Fix
    from mechfix.fixes.adapter import init_lora, lora_targets

    lora = init_lora(lora_targets(lm, [1, 2], [0, 3]), rank=3, head_dim=lm.head_dim, seed=seed)
    lora.b = [_torch.randn_like(b) * scale for b in lora.b]
    return Fix(op="lora", layers=[1, 2], heads=[], vectors=_torch.zeros(0), means=_torch.zeros(0), strength=strength,
               model=lm.identity, lora=lora)
