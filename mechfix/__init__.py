"""mechfix: find why multi-agent LLM misbehaviour happens inside the model, and patch it."""

__version__ = "0.1.0.dev0"
