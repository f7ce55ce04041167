"""Activations at every position, written to disk as they are captured.

``record --all-positions`` keeps ``[N, T, L, ...]`` per condition and site: on a
large model that is more than the host's memory. :class:`ActStore` gives each
condition and site a tensor backed by a file (``torch.from_file``, shared), sized
once the prompts are tokenized, and fills it one request at a time; the
artifact writer then streams it to the safetensors file in slices
(:func:`mechfix.artifacts.write_safetensors`). The backing files are unlinked as
soon as they are mapped, so nothing is left behind, whatever happens.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mechfix.models import LoadedModel

ACT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_act_dtype(lm: LoadedModel) -> torch.dtype:
    """The dtype activations are kept in: float16 on a GPU (half the memory and disk), float32 elsewhere."""
    return torch.float16 if lm.device.type == "cuda" or lm.remote else torch.float32


def site_shape(lm: LoadedModel, site: str) -> tuple[int, ...]:
    """One position's activation shape at a site: ``[L, H, dh]`` for heads, ``[L, d]`` otherwise."""
    return (lm.n_layers, lm.n_heads, lm.head_dim) if site == "heads" else (lm.n_layers, lm.hidden)


def disk_tensor(shape: Sequence[int], dtype: torch.dtype, folder: str | Path | None = None) -> torch.Tensor:
    """A zero-filled tensor backed by an (already unlinked) file in ``folder`` (default: the temp folder)."""
    numel = 1
    for n in shape:
        numel *= int(n)
    fd, name = tempfile.mkstemp(prefix=".mechfix-acts-", dir=str(folder) if folder else None)
    try:
        os.ftruncate(fd, max(1, numel * torch.finfo(dtype).bits // 8))  # sparse: zeros cost no disk until written
        out = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(*shape)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the data; the name goes now
    return out


class ActStore:
    """Per condition and site, ``[N, T, L, ...]`` activations on disk, filled request by request.

    Args:
        lm: The model (for the sites' shapes).
        conditions: Condition names, in the order their requests are numbered.
        n: Decisions per condition.
        widths: Per condition, the longest prompt (positions kept per decision).
        sites: Sites to keep.
        dtype: The dtype to keep them in.
        folder: Where the backing files go (default: the temp folder); pick a disk with room.
    """

    def __init__(self, lm: LoadedModel, conditions: Sequence[str], n: int, widths: dict[str, int],
                 sites: Sequence[str], dtype: torch.dtype, folder: str | Path | None = None):
        self.conditions, self.n, self.dtype = list(conditions), n, dtype
        self.tensors = {
            c: {s: disk_tensor((n, widths[c], *site_shape(lm, s)), dtype, folder) for s in sites} for c in conditions
        }

    def put(self, request: int, acts: dict[str, torch.Tensor]) -> None:
        """Write request ``request``'s activations (``[T, L, ...]`` per site) into its row."""
        cond, row = self.conditions[request // self.n], request % self.n
        for site, x in acts.items():
            self.tensors[cond][site][row, : x.shape[0]] = x.to(self.dtype)
