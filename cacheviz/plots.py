"""Plotly figure builders: plain data in, `go.Figure` out (no Streamlit here)."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .errors import CachevizError

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


# The largest theta x lam grid drawn as a table of numbers (readable cell by cell); larger ones
# are drawn by `fig_grid`.
GRID_TABLE_MAX = 15


def grid_table_html(result: Mapping) -> str:
    """The theta x lam validation accuracies of an `evaluate` result as an HTML table, each cell
    coloured like `fig_grid`'s heatmap and the chosen one starred.

    The home page shows this rather than a plotly figure: it is what every student sees first,
    and a table costs a phone no plotting library to load, while the numbers stay readable."""
    import html

    from plotly.colors import sample_colorscale

    grid = result["grid"]
    thetas, lams = list(grid["thetas"]), list(grid["lams"])
    acc = np.asarray(grid["acc"], dtype=float) * 100
    lo, hi = float(np.nanmin(acc)), float(np.nanmax(acc))
    span = hi - lo if hi > lo else 1.0
    head = "".join(f"<th>{lam:g}</th>" for lam in lams)
    fracs = ((acc - lo) / span).ravel()
    colours = iter(sample_colorscale("Viridis", [float(f) for f in np.nan_to_num(fracs)]))
    rows = []
    for i, theta in enumerate(thetas):
        tds = []
        for j, lam in enumerate(lams):
            v, bg = acc[i, j], next(colours)
            fg = "black" if fracs[i * len(lams) + j] > 0.6 else "white"
            chosen = theta == result["theta"] and lam == result["lam"]
            text = f"{'★ ' if chosen else ''}{v:.1f}"
            weight = ";font-weight:700;outline:2px solid white;outline-offset:-3px" if chosen else ""
            tds.append(f'<td style="background:{bg};color:{fg}{weight}" '
                       f'title="θ = {theta:g}, λ = {lam:g}: {v:.2f}%">{text}</td>')
        rows.append(f'<tr><th>{theta:g}</th>{"".join(tds)}</tr>')
    caption = html.escape(f"Validation accuracy (%) over θ (rows) × λ (columns); ★ the chosen pair; "
                          f"without the cache: {result['baseline_acc_val']:.2%}")
    style = ("<style>table.cv-grid{border-collapse:collapse;font-size:0.85rem}"
             ".cv-grid th,.cv-grid td{padding:2px 6px;text-align:right;font-variant-numeric:tabular-nums;border:0}"
             ".cv-grid caption{caption-side:top;text-align:left;padding-bottom:4px}</style>")
    return (f'{style}<table class="cv-grid"><caption>{caption}</caption>'
            f'<tr><th>θ \\ λ</th>{head}</tr>{"".join(rows)}</table>')


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


# ---------------------------------------------------------------------------------------------
# The paper's sweeps (Figure 2, Figure 3, Table 1), from the rows of `cacheviz.sweeps`

# One colour per model in overlays; the cache / cache-only colours match the pages above.
MODEL_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
VARIANT_COLORS = {"baseline": COLORS["p_net"], "cache": COLORS["p"], "cache-only": COLORS["p_mem"], "cache3": "#ff7f0e"}


def _group_by_model(rows) -> dict[str, list]:
    """{"model": rows} from a flat list of sweep rows (a mapping is returned as it is)."""
    if isinstance(rows, Mapping):
        return {str(k): list(v) for k, v in rows.items()}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r.get("model", "?"), r.get("dataset", "")), []).append(r)
    several = len({ds for _, ds in groups}) > 1
    return {(f"{m} · {ds}" if several else str(m)): v for (m, ds), v in groups.items()}


def fig_layer_sweep(rows_by_model, height: int = 460) -> go.Figure:
    """Figure 2: test accuracy with each layer alone as keys against its depth l/L.

    `rows_by_model`: {"resnet20": sweep_layers rows, ...}, or one flat list of rows (grouped by
    their model). Per model: the curve, its baseline as a dashed horizontal line, a star on
    the best layer. Hover: layer name, key dimension (and the full one when projected), accuracy.
    """
    groups = _group_by_model(rows_by_model)
    fig = go.Figure()
    retuned, fixed = set(), set()
    for k, (model, rows) in enumerate(groups.items()):
        if not rows:
            continue
        color = MODEL_COLORS[k % len(MODEL_COLORS)]
        rows = sorted(rows, key=lambda r: float(r["depth"]))
        x = [float(r["depth"]) for r in rows]
        y = [100 * float(r["acc"]) for r in rows]
        dims = [
            f"{int(r['dim']):,}" + (f" (projected from {int(r['full_dim']):,})" if r.get("full_dim") and int(r["full_dim"]) != int(r["dim"]) else "")
            for r in rows
        ]
        custom = [[r["layer"], d] for r, d in zip(rows, dims)]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=model, legendgroup=model,
            line=dict(color=color, width=2), marker=dict(color=color, size=7),
            customdata=custom,
            hovertemplate=f"<b>{model}</b> · %{{customdata[0]}}<br>l/L = %{{x:.2f}} · dim %{{customdata[1]}}"
                          f"<br>accuracy %{{y:.2f}}%<extra></extra>",
        ))
        base = 100 * float(rows[0]["baseline_acc"])
        fig.add_trace(go.Scatter(
            x=[0, 1], y=[base, base], mode="lines", name=f"{model} baseline ({base:.2f}%)", legendgroup=model,
            line=dict(color=color, width=1.5, dash="dash"),
            hovertemplate=f"<b>{model}</b> network alone<br>accuracy {base:.2f}%<extra></extra>",
        ))
        best = max(range(len(rows)), key=lambda i: (y[i], x[i]))
        fig.add_trace(go.Scatter(
            x=[x[best]], y=[y[best]], mode="markers", name=f"{model} best: {rows[best]['layer']}", legendgroup=model,
            marker=dict(symbol="star", size=18, color=color, line=dict(color="black", width=1)),
            customdata=[custom[best]],
            hovertemplate=f"<b>{model}</b> best layer · %{{customdata[0]}}<br>l/L = %{{x:.2f}} · dim %{{customdata[1]}}"
                          f"<br>accuracy %{{y:.2f}}%<extra></extra>",
        ))
        for r in rows:
            (retuned if r.get("retuned") else fixed).add((r.get("theta"), r.get("lam")))
    if retuned and not fixed:
        how = "θ, λ re-tuned per layer"
    elif len(fixed) == 1 and not retuned:
        t, l = next(iter(fixed))
        how = f"θ = {t:g}, λ = {l:g}"
    else:
        how = "θ, λ as in the rows"
    fig.update_layout(
        title=f"Test accuracy with each layer alone as keys ({how})",
        xaxis=dict(title="normalised layer depth l/L (0 = input image, 1 = the output: logits and probs)", range=[-0.03, 1.03],
                   zeroline=False),
        yaxis=dict(title="test accuracy (%)"),
        height=height,
        margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        hovermode="closest",
    )
    return fig


def size_sweep_summary(rows) -> list[dict]:
    """Per cache fraction: mean and s.e.m. over seeds of the gain (percentage points) of the
    cache and of the cache-only model over the network; fraction 0 is the network (gain 0)."""
    by_frac: dict[float, list] = {}
    for r in rows:
        by_frac.setdefault(float(r["fraction"]), []).append(r)

    def stats(values):
        v = np.asarray(values, dtype=float)
        sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        return float(v.mean()), sem

    out = []
    for frac in sorted(by_frac):
        rs = by_frac[frac]
        g_cache = [100 * (float(r["cache_acc"]) - float(r["baseline_acc"])) for r in rs]
        g_only = [0.0 if r.get("cache_only_acc") is None else 100 * (float(r["cache_only_acc"]) - float(r["baseline_acc"]))
                  for r in rs]
        (mc, sc), (mo, so) = stats(g_cache), stats(g_only)
        out.append({
            "fraction": frac, "n_seeds": len(rs), "n_cache": int(round(np.mean([r.get("n_cache") or 0 for r in rs]))),
            "baseline_acc": float(np.mean([float(r["baseline_acc"]) for r in rs])),
            "gain_cache": mc, "sem_cache": sc, "gain_cache_only": mo, "sem_cache_only": so,
        })
    return out


def _pct(frac: float) -> str:
    p = 100 * frac
    return f"{p:.3g}%"


def fig_size_sweep(rows, height: int = 440) -> go.Figure:
    """Figure 3: gain over the network (percentage points, mean ± s.e.m. over seeds) against the
    cache size, for the cache model and the cache-only model. Fraction 0 is the network itself.

    The sizes are placed evenly (a category axis), so 1% and 3% stay readable beside 100%;
    hover shows the number of cache items.
    """
    summary = size_sweep_summary(rows)
    x = [_pct(s["fraction"]) + (" (network)" if s["fraction"] == 0 else "") for s in summary]
    seeds = sorted({s["n_seeds"] for s in summary})
    fig = go.Figure()
    for name, key, color in (("cache", "cache", COLORS["p"]), ("cache-only (λ = 1)", "cache_only", COLORS["p_mem"])):
        fig.add_trace(go.Scatter(
            x=x, y=[s[f"gain_{key}"] for s in summary], name=name, mode="lines+markers",
            line=dict(color=color, width=2), marker=dict(color=color, size=8),
            error_y=dict(type="data", array=[s[f"sem_{key}"] for s in summary], visible=True, thickness=1.5, width=5),
            customdata=[[s[f"sem_{key}"], s["n_cache"], s["n_seeds"]] for s in summary],
            hovertemplate=f"<b>{name}</b><br>cache %{{x}} · %{{customdata[1]:,}} items"
                          f"<br>gain %{{y:+.2f}} ± %{{customdata[0]:.2f}} points (s.e.m., %{{customdata[2]}} seeds)<extra></extra>",
        ))
    fig.add_hline(y=0, line=dict(color=COLORS["p_net"], dash="dash", width=1.5),
                  annotation_text="network alone", annotation_position="bottom right")
    n = "/".join(map(str, seeds)) if seeds else "0"
    fig.update_layout(
        title=f"Gain over the network against cache size (mean ± s.e.m. over {n} seeds)",
        xaxis=dict(title="cache size (% of the training items)", type="category"),
        yaxis=dict(title="gain over the network (percentage points)", zeroline=False),
        height=height,
        margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    return fig


TABLE1_VARIANTS = ("baseline", "cache", "cache-only", "cache3")


def fig_table1(rows, height: int = 380) -> go.Figure:
    """Table 1 as grouped bars: test error (%) of each variant per model and dataset."""
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['model']} · {r['dataset']}", {})[r["variant"]] = r
    labels = list(groups)
    fig = go.Figure()
    for variant in TABLE1_VARIANTS:
        ys = [100 * float(groups[g][variant]["error"]) if variant in groups[g] else None for g in labels]
        if all(v is None for v in ys):
            continue
        layers = ["+".join(groups[g][variant].get("layers") or []) or "—" if variant in groups[g] else "" for g in labels]
        fig.add_trace(go.Bar(
            x=labels, y=ys, name=variant, marker_color=VARIANT_COLORS.get(variant),
            text=[None if v is None else f"{v:.2f}" for v in ys], textposition="outside",
            customdata=layers,
            hovertemplate=f"<b>{variant}</b> · %{{x}}<br>error %{{y:.2f}}%<br>keys %{{customdata}}<extra></extra>",
        ))
    n = max(len(labels), 1)
    pad = max(0.5, (3 - n) / 2 + 0.5)  # one or two models: keep the bars from filling the width
    fig.update_layout(
        barmode="group", bargap=0.3, title="Test error per model (lower is better)",
        yaxis=dict(title="test error (%)"), xaxis=dict(type="category", range=[-pad, n - 1 + pad]),
        height=height, margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# PNG export (kaleido >= 1 drives a local Chrome/Chromium; nothing is downloaded)

PNG_WIDTH = 1000
CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_png_lock = threading.Lock()


def chrome_path() -> str | None:
    """The browser kaleido will drive: $BROWSER_PATH, else what kaleido's own finder (choreographer)
    picks (a Chrome it downloaded, then Chrome/Chromium on PATH or in the usual places), else the
    first of CHROME_NAMES on PATH; None when there is none."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
        if found and Path(found).is_file():
            return str(found)
    except Exception:  # an older or newer choreographer: look for ourselves
        pass
    for name in CHROME_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def png_problem() -> str | None:
    """Why PNG export cannot work here, in one sentence, or None. Cheap: starts no browser."""
    try:
        from importlib.metadata import version

        import kaleido  # noqa: F401
        major = int(version("kaleido").split(".")[0])
    except Exception:
        return "PNG export needs the kaleido package (pip install -r requirements.txt); the CSV download works without it."
    if major < 1:
        return "PNG export needs kaleido 1.0 or newer (pip install -U 'kaleido>=1'); the CSV download works without it."
    if chrome_path() is None:
        return ("PNG export needs Chrome or Chromium on this machine (apt-get install chromium, or set BROWSER_PATH); "
                "the CSV download works without it.")
    return None


def fig_to_png(fig: go.Figure, width: int | None = None, height: int | None = None, scale: float = 2) -> bytes:
    """The figure as PNG bytes, rendered offline by kaleido in the local Chromium.

    Raises CachevizError (one sentence) when the renderer is unavailable or fails.
    """
    problem = png_problem()
    if problem:
        raise CachevizError(problem)
    import kaleido

    w = int(width or fig.layout.width or PNG_WIDTH)
    h = int(height or fig.layout.height or 500)
    opts = dict(format="png", width=w, height=h, scale=scale)
    try:
        with _png_lock:  # one browser at a time: pages may ask from several threads
            # plotly.js from the installed plotly package (kaleido's default) and no MathJax (its
            # default is a CDN): nothing is fetched from the network.
            data = kaleido.calc_fig_sync(fig.to_dict(), opts=opts, kopts={"mathjax": False, "timeout": 60})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no message"
        raise CachevizError(
            f"Rendering the PNG failed ({type(exc).__name__}: {first}); the CSV download still has the numbers."
        ) from exc
    if not data.startswith(b"\x89PNG"):
        raise CachevizError("The PNG renderer returned something that is not a PNG; the CSV download still has the numbers.")
    return data


# ---------------------------------------------------------------------------------------------
# The robustness lab (Tables 2-4 and the strength curves), from the rows of `cacheviz.robustness`

ROBUST_MODELS = ("network", "cache", "cache-only")
ROBUST_COLORS = {"network": COLORS["p_net"], "cache": COLORS["p"], "cache-only": COLORS["p_mem"]}
# What the strength of each attack is, for axis titles and tables.
STRENGTH_LABELS = {
    "fgsm": "ε (L∞, normalised input space)",
    "ifgsm": "ε (L∞, normalised input space)",
    "l2": "ε (L2 norm, normalised input space)",
    "blur": "σ of the Gaussian blur (pixels)",
    "brightness": "brightness factor (1 = unchanged)",
    "contrast": "contrast factor (1 = unchanged)",
    "gamma": "gamma (1 = unchanged)",
    "pixel": "the flipped pixel",
    "hopskipjump": "L2 distance (normalised input space)",
}


def strength_label(attack: str) -> str:
    return STRENGTH_LABELS.get(str(attack), "strength")


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def fig_attack(rows, height: int = 380) -> go.Figure:
    """Tables 2-4 as bars: each model's accuracy (%) on the adversarials beside its clean
    accuracy; the attacked model is marked, the success rate and mean rho_adv are in the title."""
    rows = [r for r in rows if r.get("model") in ROBUST_MODELS]
    if not rows:
        return go.Figure()
    first = rows[0]
    against, source = first.get("against"), first.get("source_model")
    transfer = source and source != first.get("net")
    labels = [r["model"] + (" (attacked)" if r["model"] == against and not transfer else "") for r in rows]
    fig = go.Figure()
    for name, key, colors in (("clean images", "clean_accuracy", ["#c7c7c7"] * len(rows)),
                              ("adversarial images", "accuracy", [ROBUST_COLORS[r["model"]] for r in rows])):
        ys = [100 * float(r[key]) for r in rows]
        fig.add_trace(go.Bar(
            x=labels, y=ys, name=name, marker_color=colors, text=[f"{v:.1f}" for v in ys], textposition="outside",
            hovertemplate=f"<b>%{{x}}</b><br>{name}: accuracy %{{y:.2f}}%<extra></extra>",
        ))
    n, failed = int(first.get("n") or 0), int(first.get("n_failed") or 0)
    rho = first.get("rho_adv")
    rho_text = f"mean ρ_adv {rho:.3g} over {n - failed} successes" if rho is not None else "no adversarial found"
    who = f"the {source} network (transfer)" if transfer else f"the {against}"
    fig.update_layout(
        barmode="group", bargap=0.3,
        title=f"{first.get('attack')} against {who}: success {100 * float(first.get('success_rate') or 0):.0f}% · "
              f"{rho_text} · {failed} of {n} failed",
        yaxis=dict(title="accuracy (%)", range=[0, 110]), xaxis=dict(type="category"),
        height=height, margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    return fig


def _curve_traces(rows, showlegend: bool, marker_size: int) -> list[go.Scatter]:
    """Per model: its ±1 s.e.m. band, then its line, accuracy (%) against the strength."""
    traces = []
    for m in ROBUST_MODELS:
        rs = sorted((r for r in rows if r.get("model") == m), key=lambda r: float(r["epsilon"]))
        if not rs:
            continue
        x = [float(r["epsilon"]) for r in rs]
        y = [100 * float(r["accuracy"]) for r in rs]
        e = [100 * float(r.get("sem") or 0.0) for r in rs]
        color = ROBUST_COLORS[m]
        traces.append(go.Scatter(
            x=x + x[::-1], y=[min(100.0, a + b) for a, b in zip(y, e)] + [max(0.0, a - b) for a, b in zip(y, e)][::-1],
            mode="lines", fill="toself", fillcolor=_rgba(color, 0.18), line=dict(width=0), hoverinfo="skip",
            showlegend=False, legendgroup=m, name=f"{m} ± s.e.m."))
        traces.append(go.Scatter(
            x=x, y=y, mode="lines+markers", name=m, legendgroup=m, showlegend=showlegend,
            line=dict(color=color, width=2), marker=dict(color=color, size=marker_size), customdata=e,
            hovertemplate=f"<b>{m}</b><br>strength %{{x:g}}<br>accuracy %{{y:.2f}} ± %{{customdata:.2f}}%<extra></extra>"))
    return traces


def fig_robustness_curve(rows, height: int = 420) -> go.Figure:
    """Accuracy (%) against the strength, one line per model with a band of ±1 s.e.m. over the
    images; a linear strength axis (0 and the factors below 1 stay on it)."""
    fig = go.Figure()
    attack = rows[0].get("attack") if rows else ""
    for trace in _curve_traces(rows, showlegend=True, marker_size=7):
        fig.add_trace(trace)
    against = rows[0].get("against") if rows else None
    n = rows[0].get("n") if rows else 0
    fig.update_layout(
        title=f"{attack}{f' against the {against}' if against else ''}: accuracy (mean ± s.e.m. over {n} images)",
        xaxis=dict(title=strength_label(attack), zeroline=False),
        yaxis=dict(title="accuracy (%)", range=[0, 105]),
        height=height, margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        hovermode="closest",
    )
    return fig


def fig_attack_strengths(strength, success, attack: str, height: int = 260) -> go.Figure:
    """The distribution of the per-image minimal strengths (successes only)."""
    s = np.asarray(strength, dtype=float)
    ok = np.asarray(success, dtype=bool) & np.isfinite(s)
    fig = go.Figure(go.Histogram(x=s[ok], nbinsx=30, marker_color=COLORS["p_mem"],
                                 hovertemplate="%{x}<br>%{y} images<extra></extra>"))
    fig.update_layout(
        title=f"Minimal strength per image ({int(ok.sum())} successes, {int((~ok).sum())} failures left out)",
        xaxis_title=strength_label(attack), yaxis_title="images", height=height, bargap=0.05,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def fig_curve_grid(panels: list[list[dict]], cols: int = 3, panel_height: int = 260) -> go.Figure:
    """Several strength curves (each a list of Curve rows) as a grid of small panels, one legend:
    accuracy (%) against the strength, a line per model with its ±1 s.e.m. band."""
    from plotly.subplots import make_subplots

    rows_n = max(1, -(-len(panels) // cols))
    titles = []
    for rows in panels:
        a, t = rows[0].get("attack"), rows[0].get("against")
        titles.append(f"{a}{f' against the {t}' if t else ''}")
    fig = make_subplots(rows=rows_n, cols=cols, subplot_titles=titles, horizontal_spacing=0.06,
                        vertical_spacing=0.12 if rows_n > 1 else 0.1)
    for i, rows in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        for trace in _curve_traces(rows, showlegend=i == 0, marker_size=5):
            fig.add_trace(trace, row=r, col=c)
        fig.update_xaxes(title_text=strength_label(rows[0].get("attack")), title_font=dict(size=11), row=r, col=c)
        fig.update_yaxes(range=[0, 102], title_text="accuracy (%)" if c == 1 else None, row=r, col=c)
    n = panels[0][0].get("n") if panels and panels[0] else 0
    fig.update_layout(height=panel_height * rows_n + 80, margin=dict(l=10, r=10, t=70, b=10),
                      title=f"Accuracy against strength (mean ± s.e.m. over {n} images)",
                      legend=dict(orientation="h", yanchor="bottom", y=1.03, xanchor="right", x=1.0))
    return fig


def fig_jacobian_spectrum(summary_rows: list[dict], height: int = 380) -> go.Figure:
    """Figure 4a: the mean singular value of J at each index 1..C per model (log scale), ±1 s.e.m.
    over the images; the mean and the median |J| in the legend (the norms are heavy-tailed)."""
    fig = go.Figure()
    for s in summary_rows:
        m = s["model"]
        mean = s["mean_singular_values"]
        sem = s["sem_singular_values"]
        k = list(range(1, len(mean) + 1))
        fig.add_trace(go.Scatter(
            x=k, y=mean, mode="lines+markers", line=dict(color=ROBUST_COLORS[m], width=2),
            error_y=dict(type="data", array=sem, visible=True, thickness=1),
            name=f"{m}: mean |J| {s['mean_norm']:.3g}, median {s['median_norm']:.3g}",
        ))
    n = summary_rows[0]["n"] if summary_rows else 0
    fig.update_layout(
        title=f"Mean singular values of the input-output Jacobian ({n} test images)",
        xaxis=dict(title="singular value index", dtick=1), yaxis=dict(title="singular value", type="log"),
        height=height, margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="right", x=1.0),
    )
    return fig


def fig_jacobian_scatter(rows: list[dict], other: str, height: int = 380) -> go.Figure:
    """Figure 4b/c: per-image |J| of the network against `other` (cache or cache-only), log-log,
    with the diagonal; a point below it is an image where the cache model's Jacobian is smaller."""
    net = {r["index"]: r["norm"] for r in rows if r["model"] == "network"}
    oth = {r["index"]: r["norm"] for r in rows if r["model"] == other}
    idx = [i for i in net if i in oth and net[i] > 0 and oth[i] > 0]
    x = [net[i] for i in idx]
    y = [oth[i] for i in idx]
    below = sum(1 for a, b in zip(x, y) if b < a)
    lo, hi = (min(x + y), max(x + y)) if idx else (1e-6, 1.0)
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#888", dash="dash"), hoverinfo="skip",
                   showlegend=False),
        go.Scatter(x=x, y=y, mode="markers", marker=dict(color=ROBUST_COLORS[other], size=5, opacity=0.6),
                   customdata=idx, hovertemplate="test #%{customdata}<br>network %{x:.3g}<br>" + other
                   + " %{y:.3g}<extra></extra>", showlegend=False),
    ])
    fig.update_layout(
        title=f"|J| per image:<br>network against {other} ({below} of {len(idx)} below the diagonal)",
        xaxis=dict(title="|J(x)| network", type="log"), yaxis=dict(title=f"|J(x)| {other}", type="log"),
        height=height, margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def fig_norm_vs_rho(rows: list[dict], attack: str, correlations: list[dict] | None = None,
                    title: str = "", height: int = 420) -> go.Figure:
    """Beyond the paper: per image and model, |J| against the minimal rho_adv of `attack` against
    that model (log-log), one colour per model, Spearman's rank correlation in the legend."""
    col = f"rho_adv_{attack}"
    corr = {c["model"]: c for c in correlations or []}
    fig = go.Figure()
    for m in ROBUST_COLORS:
        pts = [(r["norm"], r[col], r["index"]) for r in rows
               if r["model"] == m and r.get(col) is not None and r["norm"] > 0 and r[col] > 0]
        if not pts:
            continue
        x, y, idx = zip(*pts)
        c = corr.get(m)
        name = f"{m} (Spearman {c['spearman']:+.2f}, n = {c['n']})" if c else m
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=name, customdata=idx,
                                 marker=dict(color=ROBUST_COLORS[m], size=5, opacity=0.6),
                                 hovertemplate="test #%{customdata}<br>|J| %{x:.3g}<br>ρ_adv %{y:.3g}<extra>" + m
                                 + "</extra>"))
    fig.update_layout(title=title or f"|J(x)| against the minimal {attack} ρ_adv of the same image, per model",
                      xaxis=dict(title="|J(x)| (Frobenius)", type="log"),
                      yaxis=dict(title=f"minimal ρ_adv ({attack} against that model)", type="log"),
                      height=height, margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2))
    return fig


def fig_jacobian_scatter_pair(rows: list[dict], height: int = 420) -> go.Figure:
    """Figure 4b and 4c side by side (for a static export; the app shows them as two charts)."""
    from plotly.subplots import make_subplots

    parts = [fig_jacobian_scatter(rows, m) for m in ("cache", "cache-only")]
    titles = []
    for m, part in zip(("cache", "cache-only"), parts):
        x, y = part.data[1].x or (), part.data[1].y or ()
        titles.append(f"network vs {m}: {sum(b < a for a, b in zip(x, y))} of {len(x)} below")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.1)
    for k, (m, part) in enumerate(zip(("cache", "cache-only"), parts), start=1):
        for tr in part.data:
            fig.add_trace(tr, row=1, col=k)
        fig.update_xaxes(type="log", title_text="|J(x)| network", row=1, col=k)
        fig.update_yaxes(type="log", title_text=f"|J(x)| {m}", row=1, col=k)
    fig.update_layout(title="|J| per image (a point below the diagonal: the cache model's Jacobian is smaller)",
                      height=height, margin=dict(l=10, r=10, t=80, b=10), showlegend=False)
    return fig


def fig_jacobian_heatmaps(maps: np.ndarray, classes: Sequence[str], title: str = "", height: int = 260) -> go.Figure:
    """One small heat-map per class c of |dp_c/dx| (C, H, W), on one shared colour scale so the
    classes' sensitivities compare."""
    from plotly.subplots import make_subplots

    maps = np.asarray(maps, dtype=float)
    c = len(maps)
    cols = min(c, 10)
    rows = -(-c // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[str(k) for k in classes[:c]],
                        horizontal_spacing=0.01, vertical_spacing=0.08)
    top = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    for i in range(c):
        fig.add_trace(go.Heatmap(z=maps[i][::-1], zmin=0, zmax=top, colorscale="Viridis", showscale=i == 0,
                                 hovertemplate=f"{classes[i]}: %{{z:.3g}}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, scaleanchor="x", constrain="domain")
    fig.update_layout(title=title, height=height * rows, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def fig_singular_values(series: Mapping[str, Sequence[float]], title: str = "", height: int = 300) -> go.Figure:
    """Singular values 1..C of one image's J (log scale), one line per named series."""
    fig = go.Figure()
    for name, values in series.items():
        v = [float(s) for s in values]
        fig.add_trace(go.Scatter(x=list(range(1, len(v) + 1)), y=v, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis=dict(title="singular value index", dtick=1),
                      yaxis=dict(title="singular value", type="log"), height=height,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


# ---------------------------------------------------------------------------------------------
# Answering early (seed 003)


def fig_early_frontier(rows: list[dict], tau: float | None = None, height: int = 460) -> go.Figure:
    """Accuracy against measured time per image: one point per exit layer x cache size for the
    truncated models (marker size grows with the cache), the gated exits (and cascades) at `tau`
    as diamonds, the full network as a star with its accuracy as a dashed line; hover names the
    configuration."""
    full = next((r for r in rows if r["layer"] == "full"), None)
    fig = go.Figure()
    layers = list(dict.fromkeys(r["layer"] for r in rows if r["mode"] == "truncated"))
    fracs = sorted({r["cache_fraction"] for r in rows if r["cache_fraction"] is not None})
    size = {f: 7 + 4 * i for i, f in enumerate(fracs)}
    for k, layer in enumerate(layers):
        color = MODEL_COLORS[k % len(MODEL_COLORS)]
        for mode, symbol, dash in (("truncated", "circle", "dot"), ("gated", "diamond", "solid")):
            pts = [r for r in rows if r["layer"] == layer and r["mode"] == mode
                   and (mode == "truncated" or (tau is not None and r["tau"] == tau))]
            if not pts:
                continue
            pts.sort(key=lambda r: r["cache_fraction"])
            fig.add_trace(go.Scatter(
                x=[r["ms_per_image"] for r in pts], y=[100 * r["accuracy"] for r in pts], mode="lines+markers",
                name=f"{layer} · {'truncated' if mode == 'truncated' else f'gated, τ = {tau:g}'}",
                line=dict(color=color, dash=dash, width=1), marker=dict(color=color, symbol=symbol,
                                                                         size=[size[r['cache_fraction']] for r in pts]),
                customdata=[[_pct(r["cache_fraction"]), r["n_cache"], 100 * r["exit_share"]] for r in pts],
                hovertemplate=f"<b>{layer}</b> ({mode})<br>cache %{{customdata[0]}} · %{{customdata[1]:,}} items"
                              "<br>%{y:.1f}% · %{x:.3g} ms/image<br>exit early: %{customdata[2]:.0f}%<extra></extra>"))
    casc = [r for r in rows if r["mode"] == "cascade" and tau is not None and r["tau"] == tau]
    if casc:
        casc.sort(key=lambda r: r["cache_fraction"])
        fig.add_trace(go.Scatter(
            x=[r["ms_per_image"] for r in casc], y=[100 * r["accuracy"] for r in casc], mode="lines+markers",
            name=f"cascade {casc[0]['layer']}, τ = {tau:g}", line=dict(color="#333", width=1),
            marker=dict(symbol="square", color="#333", size=[size[r["cache_fraction"]] for r in casc]),
            customdata=[[_pct(r["cache_fraction"]), 100 * r["exit_share"]] for r in casc],
            hovertemplate="<b>cascade</b><br>cache %{customdata[0]}<br>%{y:.1f}% · %{x:.3g} ms/image"
                          "<br>exit early: %{customdata[1]:.0f}%<extra></extra>"))
    if full:
        fig.add_trace(go.Scatter(x=[full["ms_per_image"]], y=[100 * full["accuracy"]], mode="markers",
                                 name="full network", marker=dict(symbol="star", size=16, color=COLORS["p_net"]),
                                 hovertemplate="<b>full network</b><br>%{y:.1f}% · %{x:.3g} ms/image<extra></extra>"))
        fig.add_hline(y=100 * full["accuracy"], line=dict(color=COLORS["p_net"], dash="dash", width=1))
        fig.add_vline(x=full["ms_per_image"], line=dict(color=COLORS["p_net"], dash="dash", width=1))
    fig.update_layout(
        title="Answering early: accuracy against measured time",
        xaxis=dict(title="ms per image, measured (left of the dashed line: faster than the network)", type="log"),
        yaxis=dict(title="test accuracy (%)"), height=height, margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="v", font=dict(size=10)))
    return fig


# ---------------------------------------------------------------------------------------------
# The knowledge store: per-class test accuracy of two versions

STORE_MODELS = {"network": "network", "cache": "cache model", "cache_only": "cache-only"}


def fig_store_per_class(classes: Sequence[str], before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                        names: tuple[str, str] = ("before", "after"), height: int = 360) -> go.Figure:
    """Per class, each model's test accuracy (%) at two versions: faint bars before, solid after,
    so an edit shows as the gap between a model's two bars (the network's never moves)."""
    fig = go.Figure()
    for key, label in STORE_MODELS.items():
        color = ROBUST_COLORS["cache-only" if key == "cache_only" else key]
        for when, acc, alpha in ((names[0], before[key], 0.35), (names[1], after[key], 1.0)):
            ys = [None if np.isnan(a) else 100 * float(a) for a in np.asarray(acc, float)]
            fig.add_trace(go.Bar(
                x=list(classes), y=ys, name=f"{label} · {when}", marker_color=_rgba(color, alpha),
                offsetgroup=f"{key}-{when}", legendgroup=key,
                hovertemplate=f"<b>%{{x}}</b><br>{label}, {when}: %{{y:.1f}}%<extra></extra>"))
    fig.update_layout(
        barmode="group", bargap=0.25, yaxis=dict(title="test accuracy (%)", range=[0, 105]),
        xaxis=dict(type="category", title="class"), height=height, margin=dict(l=10, r=10, t=30, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0, font=dict(size=10)))
    return fig


def fig_incremental(panels: Mapping[str, Sequence[Mapping]], height: int = 420) -> go.Figure:
    """Accuracy on the classes seen so far after each task: one panel per run (title -> its
    `incremental` rows), the store solid and the fine-tuned head dashed, class- and
    task-incremental in two colours; the head's class-incremental fall is the forgetting."""
    from plotly.subplots import make_subplots

    titles = list(panels)
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, shared_yaxes=True)
    colors = {"class": "#d62728", "task": "#1f77b4"}
    for col, title in enumerate(titles, start=1):
        rows = panels[title]
        for scenario in ("class", "task"):
            for method, dash in (("store", "solid"), ("finetune", "dash")):
                pts = sorted((r["task"], 100 * r["accuracy_seen"]) for r in rows
                             if r["scenario"] == scenario and r["method"] == method)
                if not pts:
                    continue
                fig.add_trace(go.Scatter(
                    x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                    line=dict(color=colors[scenario], dash=dash),
                    name=f"{'store' if method == 'store' else 'fine-tuned head'}, {scenario}-incremental",
                    legendgroup=f"{method}-{scenario}", showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="after task", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="accuracy on the classes seen so far (%)", range=[0, 102], row=1, col=1)
    fig.update_layout(height=height, legend=dict(orientation="h", y=-0.25), margin=dict(t=40))
    return fig
