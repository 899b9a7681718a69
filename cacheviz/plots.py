"""Plotly figure builders: plain data in, `go.Figure` out (no Streamlit here)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

# One colour per quantity, the same on every page.
COLORS = {"p_net": "#8c8c8c", "p_mem": "#1f77b4", "p": "#d62728"}
MATCH = (46, 125, 50)  # neighbour's label equals the prediction: green frame
MISMATCH = (198, 40, 40)  # it does not: red frame


def fig_grid(result: Mapping) -> go.Figure:
    """The theta x lam validation accuracy heatmap of an `evaluate` result, best cell marked."""
    grid = result["grid"]
    thetas, lams = list(grid["thetas"]), list(grid["lams"])
    acc = np.asarray(grid["acc"], dtype=float) * 100
    fig = go.Figure(
        go.Heatmap(
            z=acc,
            x=[f"{l:g}" for l in lams],
            y=[f"{t:g}" for t in thetas],
            colorscale="Viridis",
            colorbar=dict(title="val acc %"),
            hovertemplate="θ = %{y}<br>λ = %{x}<br>validation accuracy %{z:.2f}%<extra></extra>",
            text=np.vectorize(lambda v: f"{v:.1f}")(acc),
            texttemplate="%{text}" if acc.size <= 144 else None,
            textfont=dict(size=10),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[f"{result['lam']:g}"], y=[f"{result['theta']:g}"], mode="markers",
            marker=dict(symbol="star", size=18, color="white", line=dict(color="black", width=1.5)),
            name="chosen θ, λ", hoverinfo="skip", showlegend=False,
        )
    )
    fig.update_layout(
        title=f"Validation accuracy over θ × λ (baseline {result['baseline_acc_val']:.2%})",
        xaxis_title="λ (weight of the cache)",
        yaxis_title="θ (sharpness)",
        height=420,
        margin=dict(l=10, r=10, t=50, b=10),
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def fig_probs(
    classes: Sequence[str],
    series: Mapping[str, np.ndarray],
    title: str = "",
    height: int = 300,
) -> go.Figure:
    """Grouped bars of probability vectors over the classes, e.g. {"p_net": ..., "p_mem": ..., "p": ...}."""
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(
            go.Bar(
                x=list(classes), y=np.asarray(values, dtype=float), name=name,
                marker_color=COLORS.get(name),
                hovertemplate="%{x}: %{y:.3f}<extra>" + name + "</extra>",
            )
        )
    fig.update_layout(
        barmode="group",
        title=title or None,
        yaxis=dict(range=[0, 1], title="probability"),
        xaxis=dict(type="category"),
        height=height,
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    return fig


def fig_shares(labels: Sequence[str], shares: np.ndarray, sims: np.ndarray, match: Sequence[bool]) -> go.Figure:
    """The top-k neighbours' shares of the similarity mass, coloured by label = prediction."""
    color = [f"rgb{MATCH}" if m else f"rgb{MISMATCH}" for m in match]
    ranks = [f"#{i + 1} {l}" for i, l in enumerate(labels)]
    fig = go.Figure(
        go.Bar(
            x=ranks, y=np.asarray(shares, dtype=float) * 100, marker_color=color,
            customdata=np.asarray(sims, dtype=float),
            hovertemplate="%{x}<br>σ = %{y:.2f}%<br>cosine %{customdata:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        yaxis_title="σₖ, % of the similarity mass", height=240, margin=dict(l=10, r=10, t=10, b=10),
        xaxis=dict(type="category"),
    )
    return fig
