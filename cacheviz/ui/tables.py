"""Sweep rows as tables for display, and their downloads (CSV, PNG)."""
from __future__ import annotations

import threading

import streamlit as st

from .. import plots
from ..errors import CachevizError
from ..rows import csv_bytes


def parse_numbers(text: str, what: str, kind: type = float) -> list:
    """'0, 0.01; 1' -> [0.0, 0.01, 1.0]; CachevizError with one sentence on anything else."""
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = [kind(float(p)) if kind is int else kind(p) for p in parts]
        if kind is int and any(float(p) != int(float(p)) for p in parts):
            raise ValueError
    except ValueError:
        raise CachevizError(f"Give the {what} as numbers separated by commas, e.g. "
                            f"{'0, 1' if kind is int else '0, 0.1, 1'}; '{text}' is not.") from None
    return values


def pct(x) -> float | None:
    return None if x is None else round(100 * float(x), 2)


def layer_table(rows: list[dict]) -> list[dict]:
    return [{
        "model": r["model"], "layer": r["layer"], "l/L": round(float(r["depth"]), 3), "key dim": r["dim"],
        "full dim": r.get("full_dim"), "cache acc %": pct(r["acc"]), "cache-only acc %": pct(r.get("cache_only_acc")),
        "baseline acc %": pct(r["baseline_acc"]), "θ": r["theta"], "λ": r["lam"],
        "cache items": r.get("n_cache"), "test items": r.get("n_test"),
    } for r in rows]


def size_table(rows: list[dict]) -> list[dict]:
    return [{
        "fraction": r["fraction"], "seed": r["seed"], "cache items": r.get("n_cache"),
        "baseline acc %": pct(r["baseline_acc"]), "cache acc %": pct(r["cache_acc"]),
        "cache-only acc %": pct(r.get("cache_only_acc")), "gain (points)": r.get("gain"),
        "θ": r.get("theta"), "λ": r.get("lam"), "θ cache-only": r.get("theta_cache_only"),
    } for r in rows]


def size_summary_table(rows: list[dict]) -> list[dict]:
    return [{
        "cache size": f"{100 * s['fraction']:.3g}%", "cache items": s["n_cache"], "seeds": s["n_seeds"],
        "cache gain (points)": round(s["gain_cache"], 2), "cache s.e.m.": round(s["sem_cache"], 2),
        "cache-only gain (points)": round(s["gain_cache_only"], 2), "cache-only s.e.m.": round(s["sem_cache_only"], 2),
    } for s in plots.size_sweep_summary(rows)]


def table1_wide(rows: list[dict], dataset_column: bool = True) -> list[dict]:
    """The paper's layout: one row per model and dataset, the error (%) of each variant in a
    column, then the cache size, hyper-parameters and key layers (with their key dimension)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"]), {})[r["variant"]] = r
    out = []
    for (model, dataset), v in groups.items():
        get = lambda name, k: v.get(name, {}).get(k)  # noqa: E731
        hp = lambda name: (f"{get(name, 'theta'):g}, {get(name, 'lam'):g}"  # noqa: E731
                           if get(name, "theta") is not None else "—")
        keys = lambda name: f"{'+'.join(get(name, 'layers') or []) or '—'} ({get(name, 'key_dim') or 0:,})"  # noqa: E731
        out.append({
            "model": model, **({"dataset": dataset} if dataset_column else {}),
            "baseline %": pct(get("baseline", "error")), "cache %": pct(get("cache", "error")),
            "cache-only %": pct(get("cache-only", "error")), "cache3 %": pct(get("cache3", "error")),
            "cache θ, λ": hp("cache"), "cache keys": keys("cache"),
            "cache-only θ": f"{get('cache-only', 'theta'):g}" if get("cache-only", "theta") is not None else "—",
            "cache3 θ, λ": hp("cache3"), "cache3 keys": keys("cache3"),
            "cache items": get("cache", "n_cache"),
        })
    return out


_PNG_CACHE: dict[str, bytes] = {}
_PNG_LOCK = threading.Lock()


def _png_of(fig_json: str) -> bytes:
    """PNG bytes of a figure (as JSON), rendered once per figure (the newest 16 are kept)."""
    import plotly.io as pio

    with _PNG_LOCK:
        hit = _PNG_CACHE.get(fig_json)
    if hit is not None:
        return hit
    data = plots.fig_to_png(pio.from_json(fig_json))
    with _PNG_LOCK:
        _PNG_CACHE[fig_json] = data
        while len(_PNG_CACHE) > 16:
            _PNG_CACHE.pop(next(iter(_PNG_CACHE)))
    return data


def export_buttons(fig, rows: list[dict], stem: str, key: str) -> None:
    """'PNG' (rendered when clicked) and 'CSV' downloads of a figure and its rows; where PNG
    cannot be rendered here, the one sentence saying why stands in its place."""
    row = st.container(horizontal=True, vertical_alignment="center", gap="small")
    row.download_button("CSV", data=csv_bytes(rows), file_name=f"{stem}.csv", mime="text/csv", key=f"{key}_csv",
                        icon=":material/download:", on_click="ignore", help="The rows, as `--out X.csv` writes them.")
    problem = plots.png_problem()
    if problem:
        row.caption(problem)
        return
    fig_json = fig.to_json()
    row.download_button("PNG", data=lambda: _png_of(fig_json), file_name=f"{stem}.png", mime="image/png",
                        key=f"{key}_png", icon=":material/image:", on_click="ignore",
                        help="The figure as a PNG image, rendered when you click (a few seconds).")
