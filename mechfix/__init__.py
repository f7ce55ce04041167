"""mechfix: find why multi-agent LLM misbehaviour happens inside the model, and patch it.

The pipeline from Python (imported lazily, so that the CLI's ``--help`` stays instant)::

    import mechfix

    lm = mechfix.load_model()                                   # the embedded Gemma 3 270M
    rec = mechfix.record("conformity", lm)                      # a recipe file or a built-in name
    att = mechfix.attribute(rec, lm)
    fix = mechfix.steer(att, rec, lm)                           # a GateError when no fix keeps the budget
    report = mechfix.verify("conformity", fix, lm)              # report["passed"], report["reduction"]
    result = mechfix.run("conformity", "runs/conformity")      # all four; every artifact in the folder

Each returns what the command of the same name saves (an artifact, a verify
report) and saves it too when given ``out=``.

Fixes in a running system::

    from mechfix import load_model, load_fix, apply_fix
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

# Public name -> the module that defines it (looked up on first use).
_LAZY = {
    "load_model": "mechfix.models",
    "use_backend": "mechfix.engine.backends",
    "load_fix": "mechfix.fixes.fix",
    "apply_fix": "mechfix.fixes.fix",
    "Fix": "mechfix.fixes.fix",
    "score_conversation": "mechfix.stages.monitor",
    "record": "mechfix.stages.pipeline",
    "attribute": "mechfix.stages.pipeline",
    "steer": "mechfix.stages.pipeline",
    "verify": "mechfix.stages.pipeline",
    "verify_all": "mechfix.stages.pipeline",
    "run": "mechfix.stages.pipeline",
    "RunResult": "mechfix.stages.pipeline",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mechfix' has no attribute {name!r}")
