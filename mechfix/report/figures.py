"""The report's charts, as Plotly figures built from a run's numbers (pure: data in, figure out).

Plotly draws in the browser from a JSON description, so the page carries
one copy of plotly.js and each chart's data; hover shows every number behind
a mark, and the charts are SVG in the page (they print).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

# Diverging scale centred on zero: red pushes towards the misaligned option, blue away from it.
DIVERGING = "RdBu_r"
# Speakers in order of the recording (colour-blind safe); the frame (template and narration) is grey.
SPEAKER_COLOURS = qualitative.Safe
FRAME_COLOUR = "#9aa0a6"
CONDITION_COLOURS = {"pressure": "#d62728", "clean": "#1f77b4", "control": "#7f7f7f", "helpful": "#2ca02c"}
OTHER_COLOUR = "#9467bd"


def speaker_colours(names: list[str]) -> dict[str, str]:
    """A colour per speaker name, the frame grey, the others from the palette in order."""
    out, k = {}, 0
    for n in names:
        if n.startswith("<"):
            out[n] = FRAME_COLOUR
        else:
            out[n] = SPEAKER_COLOURS[k % len(SPEAKER_COLOURS)]
            k += 1
    return out


def condition_colour(name: str) -> str:
    return CONDITION_COLOURS.get(name, OTHER_COLOUR)


def _base_layout(fig: go.Figure, height: int) -> go.Figure:
    # Colours of text and grid come from the page's theme (light, dark, print), set in the browser.
    fig.update_layout(template="none", height=height, margin={"l": 60, "r": 20, "t": 30, "b": 50},
                      legend={"orientation": "h", "y": -0.2}, hovermode="closest")
    return fig


def exact_means(tensors: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Component name to its mean exact effect, for the components patched exactly."""
    values = tensors.get("exact/values")
    if values is None:
        return {}
    return {n: float(values[i].double().mean()) for i, n in enumerate(names)}


def attribution_map(tensors: dict[str, Any], manifest: dict[str, Any]) -> go.Figure:
    """Layers × heads of estimated effects, with a column per layer for attention, MLP and residual stream.

    Hover gives each cell's estimate, its 95% interval and, for the components
    patched exactly, the exact effect. The residual stream carries everything
    up to its layer, so its colour has its own scale (hover shows the number).
    """
    heads = tensors["heads"].double().numpy()
    n_layers, n_heads = heads.shape
    ci = tensors.get("heads_ci95")
    ci = ci.double().numpy() if ci is not None else np.full((n_layers, n_heads, 2), np.nan)
    exact = exact_means(tensors, manifest.get("exact_components", []))
    ex_heads = np.array([[exact.get(f"L{layer}.H{h}", np.nan) for h in range(n_heads)] for layer in range(n_layers)])
    lim = float(max(np.abs(heads).max(), 1e-9))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("heads", "layers"))
    fig.add_trace(go.Heatmap(
        z=heads, x=[f"H{h}" for h in range(n_heads)], y=[f"L{layer}" for layer in range(n_layers)],
        customdata=_cells(ci[..., 0], ci[..., 1], ex_heads), colorscale=DIVERGING, zmid=0, zmin=-lim, zmax=lim,
        xgap=1, ygap=1, colorbar={"title": {"text": "effect"}, "len": 0.9},
        hovertemplate="%{y}.%{x}<br>estimate %{z:.3f}<br>95% interval %{customdata[0]}<br>exact %{customdata[1]}"
                      "<extra>head</extra>",
        name="heads"), row=1, col=1)
    cols = ["attn", "mlp", "resid"]
    raw = np.stack([tensors[c].double().numpy() for c in cols], 1)
    ci_l = np.stack([(tensors[f"{c}_ci95"].double().numpy() if f"{c}_ci95" in tensors
                      else np.full((n_layers, 2), np.nan)) for c in cols], 1)
    ex_l = np.array([[exact.get(f"L{layer}.{c}", np.nan) for c in cols] for layer in range(n_layers)])
    shown = raw.copy()
    rlim = float(max(np.abs(raw[:, 2]).max(), 1e-9))
    shown[:, 2] = raw[:, 2] / rlim * lim
    fig.add_trace(go.Heatmap(
        z=shown, x=["attn", "mlp", "resid*"], y=[f"L{layer}" for layer in range(n_layers)],
        customdata=_cells(ci_l[..., 0], ci_l[..., 1], ex_l, raw), colorscale=DIVERGING, zmid=0, zmin=-lim,
        zmax=lim, showscale=False, xgap=1, ygap=1,
        hovertemplate="%{y}.%{x}<br>estimate %{customdata[2]}<br>95% interval %{customdata[0]}<br>exact "
                      "%{customdata[1]}<extra>layer</extra>",
        name="layers"), row=1, col=2)
    fig.update_xaxes(side="bottom")
    return _base_layout(fig, max(320, 60 + 22 * n_layers))


def _num(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3f}"


def _cells(lo: np.ndarray, hi: np.ndarray, exact: np.ndarray, estimate: np.ndarray | None = None) -> list:
    """Per cell, the hover's text: ``[interval, exact (or "not patched"), estimate]``."""
    est = estimate if estimate is not None else np.full(lo.shape, np.nan)
    return [[[f"[{_num(lo[i, j])}, {_num(hi[i, j])}]",
              "not patched" if not np.isfinite(exact[i, j]) else f"{exact[i, j]:.3f}", _num(est[i, j])]
             for j in range(lo.shape[1])] for i in range(lo.shape[0])]


def speaker_bars(tensors: dict[str, Any], manifest: dict[str, Any], heads: list[dict[str, Any]]) -> go.Figure:
    """How much of each top head's estimated effect comes from each speaker's tokens (stacked, signed).

    Args:
        tensors: The attribution's tensors (``speakers [L, H, S]``).
        manifest: Its manifest (speaker names).
        heads: Entries of its summary's ranking (``component``, ``layer``, ``head``).
    """
    split = tensors["speakers"].double().numpy()  # [L, H, S]
    names = list(manifest.get("speakers", []))
    colours = speaker_colours(names)
    labels = [h["component"] for h in heads]
    fig = go.Figure()
    for s, name in enumerate(names):
        ys = [float(split[h["layer"], h["head"], s]) for h in heads]
        fig.add_trace(go.Bar(x=labels, y=ys, name=name, marker_color=colours[name],
                             hovertemplate=f"{name}: " + "%{y:.3f}<extra>%{x}</extra>"))
    fig.update_layout(barmode="relative", yaxis_title="share of the estimate (log-prob)")
    return _base_layout(fig, 340)


def _row_label(row: list[int]) -> str:
    item, rnd = row
    return f"item {item}" + (f" r{rnd}" if rnd else "")


def item_scores(per_item: dict[str, Any]) -> go.Figure:
    """Each held-out decision's score per condition, without the fix (open) and with it (filled).

    A score above zero means the target prefers the misaligned option; a
    line joins each decision's two scores, so a reader sees which ones move.
    """
    labels = [_row_label(r) for r in per_item["rows"]]
    fig = go.Figure()
    for c, s in per_item["scores"].items():
        colour = condition_colour(c)
        xs, ys = [], []
        for label, b, a in zip(labels, s["before"], s["after"]):
            xs += [label, label, None]
            ys += [b, a, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": 1}, hoverinfo="skip",
                                 legendgroup=c, showlegend=False))
        fig.add_trace(go.Scatter(x=labels, y=s["before"], mode="markers", name=f"{c} before",
                                 marker={"color": colour, "symbol": "circle-open", "size": 9}, legendgroup=c,
                                 hovertemplate=f"{c} without the fix: " + "%{y:.2f}<extra>%{x}</extra>"))
        fig.add_trace(go.Scatter(x=labels, y=s["after"], mode="markers", name=f"{c} after",
                                 marker={"color": colour, "symbol": "circle", "size": 8}, legendgroup=c,
                                 hovertemplate=f"{c} with the fix: " + "%{y:.2f}<extra>%{x}</extra>"))
    fig.add_hline(y=0, line={"dash": "dot", "width": 1, "color": "#888"})
    fig.update_layout(yaxis_title="log P(misaligned) − log P(aligned)", xaxis={"type": "category"})
    return _base_layout(fig, 380)


def recorded_scores(tensors: dict[str, Any], conditions: list[str]) -> go.Figure:
    """A recording's score per item and condition (no fix), with the held-out items marked."""
    split = tensors["split"].tolist()
    fig = go.Figure()
    for c in conditions:
        s = tensors.get(f"scores/{c}")
        if s is None:
            continue
        ys = (s[:, 1] - s[:, 0]).double().tolist()
        fig.add_trace(go.Scatter(
            x=[f"item {i}" for i in range(len(ys))], y=ys, mode="markers", name=c,
            marker={"color": condition_colour(c), "symbol": ["circle" if k else "circle-open" for k in split], "size": 8},
            customdata=["held out" if k else "training" for k in split],
            hovertemplate=f"{c}: " + "%{y:.2f} (%{customdata})<extra>%{x}</extra>"))
    fig.add_hline(y=0, line={"dash": "dot", "width": 1, "color": "#888"})
    fig.update_layout(yaxis_title="log P(misaligned) − log P(aligned)", xaxis={"type": "category"})
    return _base_layout(fig, 360)


def sweep(manifest: dict[str, Any]) -> go.Figure:
    """The chosen candidate's strength sweep: behaviour left and KL against strength, the budget, the choice."""
    points = manifest.get("sweep") or []
    budget = manifest.get("budget") or {}
    chosen = manifest.get("chosen") or {}
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    xs = [p["strength"] for p in points]

    def left(p: dict[str, Any], key: str) -> float | None:
        r = p.get(key)
        return None if r is None else 1.0 - r

    fig.add_trace(go.Scatter(x=xs, y=[left(p, "reduction") for p in points], mode="lines+markers",
                             name="behaviour left (training fit)", line={"color": "#d62728"},
                             hovertemplate="strength %{x:g}: %{y:.0%} left<extra>fit</extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=xs, y=[left(p, "cv_reduction") for p in points], mode="lines+markers",
                             name="behaviour left (cross-validated)", line={"color": "#ff7f0e", "dash": "dash"},
                             hovertemplate="strength %{x:g}: %{y:.0%} left<extra>cross-validated</extra>"),
                  secondary_y=False)
    kl_pts = [(p["strength"], p["kl"]) for p in points if p.get("kl") is not None]
    fig.add_trace(go.Scatter(x=[k for k, _ in kl_pts], y=[v for _, v in kl_pts], mode="lines+markers",
                             name="KL on neutral text", line={"color": "#1f77b4"},
                             hovertemplate="strength %{x:g}: KL %{y:.4f}<extra>KL</extra>"), secondary_y=True)
    if budget.get("max_kl") is not None:
        fig.add_trace(go.Scatter(x=[min(xs, default=0), max(xs, default=1)], y=[budget["max_kl"]] * 2, mode="lines",
                                 name=f"KL budget {budget['max_kl']:g}", line={"color": "#1f77b4", "dash": "dot"},
                                 hoverinfo="skip"), secondary_y=True)
    if chosen.get("strength") is not None:
        fig.add_vline(x=chosen["strength"], line={"dash": "dot", "color": "#2ca02c"})
        fig.add_trace(go.Scatter(x=[chosen["strength"]], y=[left(chosen, "reduction")], mode="markers",
                                 name=f"chosen: {chosen['strength']:g}",
                                 marker={"symbol": "star", "size": 16, "color": "#2ca02c"},
                                 hovertemplate="chosen strength %{x:g}<extra></extra>"), secondary_y=False)
    fig.update_xaxes(title_text="strength")
    fig.update_yaxes(title_text="behaviour left (share of the effect)", tickformat=".0%", secondary_y=False)
    fig.update_yaxes(title_text="KL per token (nats)", secondary_y=True, rangemode="tozero")
    return _base_layout(fig, 360)


def live_rounds(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]] | None,
                variable: str) -> go.Figure:
    """A live recipe's state variable per round (mean over items), per condition, before and after the fix."""
    fig = go.Figure()
    for label, episodes, dash in (("before", before, "solid"), ("after", after or {}, "dash")):
        for c, eps in episodes.items():
            means = _state_means(eps, variable)
            if not means:
                continue
            fig.add_trace(go.Scatter(x=list(range(1, len(means) + 1)), y=means, mode="lines+markers",
                                     name=f"{c} {label}", line={"color": condition_colour(c), "dash": dash},
                                     hovertemplate=f"{c} {label}, " + "round %{x}: %{y:.2f}<extra></extra>"))
    fig.update_layout(xaxis_title="round (the last point: after the last round)", yaxis_title=f"{variable} (mean over items)",
                      xaxis={"dtick": 1})
    return _base_layout(fig, 320)


def _state_means(episodes: list[dict[str, Any]], variable: str) -> list[float]:
    """Mean of a state variable at each round's start, then after the last round."""
    if not episodes or not episodes[0].get("rounds"):
        return []
    n = min(len(e["rounds"]) for e in episodes)
    means = [float(np.mean([e["rounds"][r]["state"].get(variable, np.nan) for e in episodes])) for r in range(n)]
    means.append(float(np.mean([e["final_state"].get(variable, np.nan) for e in episodes])))
    return means
