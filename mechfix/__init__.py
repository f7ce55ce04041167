"""mechfix: find why multi-agent LLM misbehaviour happens inside the model, and patch it.

The Python API for fixes (imported lazily, so that the CLI's ``--help`` stays instant)::

    from mechfix import load_model, load_fix, apply_fix
    lm = load_model()                                  # the embedded Gemma 3 270M
    fix = load_fix("conformity.fix.safetensors")      # or a LoRA fix's folder, "conformity.lora"
    with apply_fix(lm, fix):
        out = lm.model.generate(...)

A LoRA fix's folder is also a PEFT adapter: ``PeftModel.from_pretrained(lm.model, folder)``.
A gated fix (``mechfix steer --gate probe``) edits only where its probe fires,
and its probe alone is a pressure monitor for a running system::

    from mechfix import score_conversation
    result = score_conversation(lm, load_fix("conformity.gated.fix.safetensors"), messages, target="Sam")
    result.flagged, result.raisers()
"""

__version__ = "0.1.0.dev0"

_LAZY = {"load_fix": "mechfix.fixes.fix", "apply_fix": "mechfix.fixes.fix", "Fix": "mechfix.fixes.fix", "load_model": "mechfix.models",
         "score_conversation": "mechfix.stages.monitor"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mechfix' has no attribute {name!r}")
