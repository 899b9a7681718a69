"""The "Answer early" page's helpers: its study from the sidebar's choice, the exit layers a model
offers, the tables at one tau, and the command line."""
from __future__ import annotations

import functools

import streamlit as st

from ..config import Setup
from ..early import DEFAULT_FRACTIONS, DEFAULT_TAUS, TIMING_IMAGES, Early, exit_choices, frontier
from .state import Choice
from .studies import setup_cli
from .tables import pct


@functools.lru_cache(maxsize=16)
def early_layers(model: str) -> tuple[list[str], list[str]]:
    """(the exit layers `model` offers, the default ones): the steps a pass can stop after and resume from."""
    return exit_choices(model)


def early_study(choice: Choice, layers, fractions, taus, mix: bool, timing_images: int) -> Early:
    return Early(choice.setup.replace(layers=()), layers=tuple(layers), fractions=tuple(fractions),
                 taus=tuple(taus), mix=bool(mix), timing_images=int(timing_images))


def early_table(rows: list[dict], tau: float | None) -> list[dict]:
    """The full network, every truncated model and, at `tau`, every gated exit and cascade:
    accuracy, measured ms per image, the speed-up against the full network timed beside it."""
    keep = [r for r in rows if r["mode"] in ("full", "truncated") or r["tau"] == tau]
    best = {id(r) for r in frontier(keep)}
    full = next((r for r in rows if r["mode"] == "full"), None)
    out = []
    for r in keep:
        out.append({"model": r["mode"] if r["mode"] != "gated" else f"gated, τ = {tau:g}", "exit layer": r["layer"],
                    "cache (% of training set)": pct(r["cache_fraction"]), "cache items": r["n_cache"] or None,
                    "accuracy (%)": pct(r["accuracy"]),
                    "vs network (points)": None if full is None else round(100 * (r["accuracy"] - full["accuracy"]), 2),
                    "ms / image": r["ms_per_image"], "speed-up": r["speedup"],
                    "speed-up range": (f"{r['speedup_low']:.2f}–{r['speedup_high']:.2f}"
                                       if r.get("speedup_low") is not None else None),
                    "exits early (%)": pct(r["exit_share"]), "on the frontier": id(r) in best})
    return out


def faster_within(rows: list[dict], points: float = 1.0) -> list[dict]:
    """Configurations faster than the full network in every timed round (speedup_low > 1) at most
    `points` below its accuracy."""
    full = next((r for r in rows if r["mode"] == "full"), None)
    if full is None:
        return []
    return sorted((r for r in rows if r["mode"] != "full" and r.get("speedup_low", r["speedup"]) > 1
                   and 100 * (full["accuracy"] - r["accuracy"]) <= points), key=lambda r: -r["speedup"])


def early_cli(study: Early) -> str:
    s: Setup = study.setup
    parts = setup_cli("early", s, layers=False)  # --layers are the exits here
    if study.layers:
        parts.append(f"--layers {','.join(study.layers)}")
    if tuple(study.fractions) != tuple(DEFAULT_FRACTIONS):
        parts.append(f"--fractions {','.join(f'{f:g}' for f in study.fractions)}")
    if tuple(study.taus) != tuple(DEFAULT_TAUS):
        parts.append(f"--taus {','.join(f'{t:g}' for t in study.taus)}")
    if study.mix:
        parts.append("--mix")
    if study.timing_images != TIMING_IMAGES:
        parts.append(f"--timing-images {study.timing_images}")
    return " ".join(parts)


def keynet_default(model: str) -> str:
    from ..keynet import default_layer

    return default_layer(model)


def keynet_study(choice: Choice, layer: str, loss: str, fraction: float, epochs: tuple[int, int]):
    from ..keynet import KeyNetStudy

    return KeyNetStudy(choice.setup.replace(layers=()), layer=layer, loss=loss, fraction=float(fraction),
                       epochs_regress=int(epochs[0]), epochs_metric=int(epochs[1]))


def keynet_tables(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one row per model: accuracy, ms per image, parameters; one row per robustness condition
    with each model's accuracy) — the student project's table, remade."""
    names = {"network": "network (whole)", "keynet": "key network + cache", "truncated": "network to the layer + cache"}
    main = [{"model": names.get(r["model"], r["model"]), "accuracy (%)": pct(r["accuracy"]),
             "ms / image": r["ms_per_image"], "parameters": r["params"], "cache items": r["n_cache"],
             "θ": r["theta"]} for r in rows if r["condition"] is None]
    conds = list(dict.fromkeys(r["condition"] for r in rows if r["condition"]))
    robust = []
    for c in conds:
        by = {r["model"]: r["accuracy"] for r in rows if r["condition"] == c}
        robust.append({"condition": c, "network (%)": pct(by.get("network")), "key network (%)": pct(by.get("keynet"))})
    return main, robust


def keynet_cli(study) -> str:
    s: Setup = study.setup
    return " ".join(setup_cli("keynet", s, layers=False) + [
        f"--layer {study.layer} --loss {study.loss} --fraction {study.fraction:g}",
        f"--epochs {study.epochs_regress},{study.epochs_metric}"])


def trained_keynets(choice: Choice) -> list:
    from ..keynet import stored_keynets

    return stored_keynets(choice.setup, choice.data_dir)


def keynet_label(study) -> str:
    return (f"{study.layer} · {study.loss} · cache {100 * study.fraction:g}% · epochs {study.epochs_regress}+"
            f"{study.epochs_metric}")


@st.cache_resource(max_entries=4, show_spinner="Loading the key network…")
def _keynet_model(ident: str, where: str, _study, _spec):
    from ..keynet import load_keynet

    return load_keynet(_study, where, _spec)


def keynet_model(choice: Choice, study, spec):
    """The stored trained key network of `study`, shared by the sessions (None if it is gone)."""
    return _keynet_model(study.ident(), str(choice.data_dir), study, spec)


def keynet_query(net, spec, index, image, p_net):
    """A Neighbours query whose key comes from the key network (the network's p_net kept for p)."""
    from ..keynet import keynet_query as query

    return query(net, spec, index, image, p_net)


def keynet_theta(choice: Choice, study) -> float | None:
    """The key network's tuned theta, from its stored rows (None when they are gone)."""
    from ..keynet import keynet_theta as theta

    return theta(study, choice.data_dir)
