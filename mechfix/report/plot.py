"""Heatmap of an attribution: layers × heads, with the per-layer MLP and residual stream beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mechfix.textio import atomic_target


def heatmap(tensors: dict[str, torch.Tensor], path: str | Path, title: str, label: str) -> Path:
    """Write the attribution heatmap to ``path`` (format from its suffix: png, pdf, svg), atomically.

    Args:
        tensors: An attribution artifact's tensors (``heads [L, H]``, ``mlp [L]``, ``resid [L]``).
        path: Image file to write.
        title: Figure title.
        label: Colour-bar label (what the numbers are).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed, in CI or over ssh
    import matplotlib.pyplot as plt

    heads = tensors["heads"].numpy()
    layer_cols = np.stack([tensors["attn"].numpy(), tensors["mlp"].numpy(), tensors["resid"].numpy()], axis=1)
    n_layers, n_heads = heads.shape
    lim = float(max(np.abs(heads).max(), np.abs(layer_cols[:, :2]).max(), 1e-9))
    fig, (ax_h, ax_l) = plt.subplots(
        1, 2, figsize=(3 + 0.6 * n_heads + 2.2, 1.2 + 0.3 * n_layers), gridspec_kw={"width_ratios": [n_heads, 3]}
    )
    im = ax_h.imshow(heads, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_xticks(range(n_heads))
    ax_h.set_yticks(range(n_layers))
    for (layer, head), v in np.ndenumerate(heads):
        if abs(v) >= 0.25 * lim:
            ax_h.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=7)
    # The residual stream carries everything up to its layer, so it gets its own scale.
    rlim = float(max(np.abs(layer_cols[:, 2]).max(), 1e-9))
    shown = layer_cols / np.array([lim, lim, rlim]) * lim
    ax_l.imshow(shown, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    ax_l.set_xticks(range(3))
    ax_l.set_xticklabels(["attn", "mlp", "resid*"])
    ax_l.set_yticks(range(n_layers))
    for (layer, col), v in np.ndenumerate(layer_cols):
        ax_l.text(col, layer, f"{v:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=[ax_h, ax_l], label=label, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.01, "* resid on its own colour scale", fontsize=6)
    path = Path(path)
    try:
        with atomic_target(path, suffix=path.suffix) as tmp:  # savefig picks the format from the suffix
            fig.savefig(tmp, dpi=130)
    finally:
        plt.close(fig)
    return path
