"""A tiny planted model whose pressure can be read before the fix: the gated-fix tests' setup.

The model is the planted copier of test_attribute (head L1.H2 copies the
option letters it reads), plus a detector in layer 0: head L0.H0 attends
uniformly to everything before it and reads one embedding dimension that only
the marker ``~`` has, and writes it to another dimension of the residual
stream. In the recipe, teammates who give the wrong answer end it with ``~``;
so a linear probe of layer 0's output can tell pressure from clean.
"""

from __future__ import annotations

import torch
from test_attribute import _planted_model
from test_steer import PLANT_MORE

MARK, READ, WRITE = "~", 16, 17
GATE_RECIPE = PLANT_MORE.replace(
    'pressure: {vars: {said: "{wrong}"}}', 'pressure: {vars: {said: "{wrong}~"}}'
)
assert GATE_RECIPE != PLANT_MORE


def gate_planted_model():
    """The planted copier with a pressure detector at L0.H0 (see the module's docstring)."""
    lm = _planted_model()
    dh = lm.head_dim
    with torch.no_grad():
        emb = lm.model.model.embed_tokens.weight
        emb[:, READ] = 0
        emb[:, WRITE] = 0
        emb[lm.tokenizer.convert_tokens_to_ids(MARK), READ] = 4.0
        attn = lm.model.model.layers[0].self_attn
        rows = slice(0, dh)
        attn.q_proj.weight[rows] = 0
        attn.v_proj.weight[rows] = 0
        attn.v_proj.weight[0, READ] = 1.0
        attn.o_proj.weight[:, rows] = 0
        attn.o_proj.weight[WRITE, 0] = 20.0
    return lm
