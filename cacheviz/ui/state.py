"""The shared sidebar: presets and the setup it describes (session state holds selections only)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st
import torch

from .. import store
from ..config import DEFAULT_MODEL, PAPER_VAL_ITEMS, Setup
from ..errors import CachevizError
from ..features import LayerInfo, list_layers
from .messages import message
from .roles import ASK_TEACHER, start_refusal

OFFLINE = "Digits · small CNN (offline)"
CIFAR = "CIFAR-10 · ResNet-20"
PAPER = "CIFAR-10 · ResNet-20 · paper protocol"
CUSTOM = "Custom"
PRESETS: dict[str, dict[str, Any]] = {
    # pool + relu3: the cache fixes a few of the network's test mistakes and breaks none.
    OFFLINE: dict(dataset="digits", model="digits-cnn", layers=["pool", "relu3"], fraction=100, flip=False,
                  protocol="default"),
    # One 4096-d key layer: a cold build takes about 2-3 minutes on a laptop CPU.
    CIFAR: dict(dataset="cifar10", model="resnet20", layers=["layer3.2.relu1"], fraction=100, flip=False,
                protocol="default"),
    # The author's keys (the model's defaults), every training image and its flip, his tuning.
    PAPER: dict(dataset="cifar10", model="resnet20", layers=[], fraction=100, flip=True, protocol="paper"),
}
PROTOCOLS = {"default": "tune on half the test set", "paper": "the paper's (held-out training items + flips)"}
DATASETS = {"digits": "Digits (8×8 gray, bundled, offline)", "cifar10": "CIFAR-10 (32×32 colour)"}
MODELS = {"digits": ["digits-cnn"], "cifar10": ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]}
TRAIN_SIZES = {"cifar10": 50_000}  # digits is measured (it loads instantly)
TEST_SIZES = {"cifar10": 10_000}
FRACTIONS = [1, 2, 5, 10, 20, 25, 50, 75, 100]

# Session-state keys of the sidebar widgets (selections only; never tensors).
K_PRESET, K_DATASET, K_MODEL, K_LAYERS = "cv_preset", "cv_dataset", "cv_model", "cv_layers"
K_FRACTION, K_FLIP, K_DEVICE, K_PROTOCOL = "cv_fraction", "cv_flip", "cv_device", "cv_protocol"
WIDGET_KEYS = (K_PRESET, K_DATASET, K_MODEL, K_LAYERS, K_FRACTION, K_FLIP, K_DEVICE, K_PROTOCOL)
# A copy of the selections outside the widgets' own keys: Streamlit drops a widget's state after
# a run that did not draw it, and a run cut short in a busy class must not reset the setup.
K_KEPT = "cv_kept"


def data_dir() -> Path:
    """`CACHEVIZ_DATA_DIR`, else ./data (read on every run, so tests can point it elsewhere)."""
    return Path(os.environ.get("CACHEVIZ_DATA_DIR") or "data").expanduser()


def setup_tag(s: Setup) -> str:
    """Short id of a Setup, for widget keys that must reset when the setup changes."""
    return store.config_hash(s.to_dict())[:8]


@dataclass(frozen=True)
class Choice:
    """The sidebar's setup, where it lives and what the model offers."""

    setup: Setup
    device: str
    data_dir: Path
    preset: str
    layer_infos: tuple = ()
    default_layers: tuple = ()
    problem: str | None = None  # one sentence: why this setup cannot be built here

    @property
    def layers(self) -> list[str]:
        return list(self.setup.layers) or list(self.default_layers)


@dataclass(frozen=True)
class ModelInfo:
    infos: tuple[LayerInfo, ...] = ()
    defaults: tuple[str, ...] = ()
    error: str | None = None


def _checkpoint_stamp(where: Path) -> str:
    """Changes when files are added to data_dir/checkpoints, so a failed load is retried."""
    ck = where / "checkpoints"
    try:
        return ",".join(sorted(f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}" for e in os.scandir(ck)))
    except OSError:
        return ""


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def _model_info(model: str, where: str, stamp: str, download: bool = True) -> ModelInfo:
    from ..models import architecture_only, load_model, untrained_digits_spec, weights_path

    try:
        if not download and model != "digits-cnn" and not weights_path(model, where).is_file():
            # a student picking a CIFAR preset must not start a download: the layers are known
            # from the architecture, and building it is the teacher's (roles.start_refusal)
            spec = architecture_only(model)
            if spec is None:
                return ModelInfo(error=ASK_TEACHER)
        elif model == "digits-cnn":
            try:
                spec = load_model(model, where, train_if_missing=False)
            except CachevizError:
                spec = untrained_digits_spec()  # its layers are known before the build trains it
        else:
            spec = load_model(model, where)
        return ModelInfo(tuple(list_layers(spec)), tuple(spec.default_layers))
    except CachevizError as exc:
        return ModelInfo(error=message(exc))


def model_info(model: str) -> ModelInfo:
    where = data_dir()
    return _model_info(model, str(where), _checkpoint_stamp(where), start_refusal() is None)


@st.cache_data(max_entries=8, show_spinner=False)
def _sizes(dataset: str, where: str) -> tuple[int | None, int | None]:
    if dataset == "digits":
        from ..data import load_dataset

        ds = load_dataset("digits", where)
        return len(ds.train_y), len(ds.test_y)
    return TRAIN_SIZES.get(dataset), TEST_SIZES.get(dataset)


def train_size(dataset: str, where: Path) -> int | None:
    return _sizes(dataset, str(where))[0]


def test_size(dataset: str, where: Path) -> int | None:
    return _sizes(dataset, str(where))[1]


def devices() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def apply_preset(name: str | None = None) -> None:
    """Widget callback: copy a preset's values into the sidebar's widgets."""
    name = name or st.session_state.get(K_PRESET, OFFLINE)
    p = PRESETS.get(name)
    if p is None:
        return
    s = st.session_state
    s[K_PRESET], s[K_DATASET], s[K_MODEL] = name, p["dataset"], p["model"]
    s[K_LAYERS], s[K_FRACTION], s[K_FLIP] = list(p["layers"]), p["fraction"], p["flip"]
    s[K_PROTOCOL] = p["protocol"]


def _matching_preset() -> str:
    s = st.session_state
    for name, p in PRESETS.items():
        if (s.get(K_DATASET), s.get(K_MODEL), list(s.get(K_LAYERS) or []), s.get(K_FRACTION), s.get(K_FLIP),
                s.get(K_PROTOCOL, "default")) == (p["dataset"], p["model"], p["layers"], p["fraction"], p["flip"],
                                                  p["protocol"]):
            return name
    return CUSTOM


def _mark_custom() -> None:
    st.session_state[K_PRESET] = _matching_preset()


def _on_dataset() -> None:
    ds = st.session_state[K_DATASET]
    if st.session_state.get(K_MODEL) not in MODELS[ds]:
        st.session_state[K_MODEL] = DEFAULT_MODEL.get(ds, MODELS[ds][0])
    st.session_state[K_LAYERS] = []
    _mark_custom()


def _on_model() -> None:
    st.session_state[K_LAYERS] = []
    _mark_custom()


def _init_state() -> None:
    s = st.session_state
    kept = s.get(K_KEPT) or {}
    for k in WIDGET_KEYS:
        if k not in s and k in kept:
            s[k] = kept[k]
    if K_PRESET not in s:
        apply_preset(OFFLINE)
    s.setdefault(K_DEVICE, "auto")
    if s.get(K_PROTOCOL) not in PROTOCOLS:
        s[K_PROTOCOL] = "default"
    # Keep every stored selection valid for the options it will be shown with.
    if s.get(K_DATASET) not in DATASETS:
        s[K_DATASET] = "digits"
    if s.get(K_MODEL) not in MODELS[s[K_DATASET]]:
        s[K_MODEL] = MODELS[s[K_DATASET]][0]
    if s.get(K_FRACTION) not in FRACTIONS:
        s[K_FRACTION] = 100
    if s.get(K_DEVICE) not in devices():
        s[K_DEVICE] = "auto"


def _layer_label(infos: dict[str, LayerInfo]) -> Callable[[str], str]:
    def fmt(name: str) -> str:
        i = infos.get(name)
        return name if i is None else f"{name} · {'×'.join(map(str, i.shape))} · l/L {i.depth:.2f}"

    return fmt


def current() -> Choice:
    """The setup the sidebar's widgets describe (cheap: the model load is cached)."""
    _init_state()
    s = st.session_state
    info = model_info(s[K_MODEL])
    names = [i.name for i in info.infos]
    chosen = [l for l in (s.get(K_LAYERS) or []) if l in names]
    if names and chosen != list(s.get(K_LAYERS) or []):
        s[K_LAYERS] = chosen
    order = {n: k for k, n in enumerate(names)}
    layers = tuple(sorted(chosen, key=order.__getitem__))
    where = data_dir()
    n_train = train_size(s[K_DATASET], where)
    frac = int(s[K_FRACTION])
    limit = max(10, int(round(n_train * frac / 100))) if frac < 100 and n_train else None
    if s[K_PROTOCOL] == "paper":
        # 5,000 held out of CIFAR-10's 50,000; a tenth of a smaller training set
        held = min(PAPER_VAL_ITEMS, max(1, (limit or n_train or 0) // 10))
        setup = Setup.paper_protocol(dataset=s[K_DATASET], model=s[K_MODEL], layers=layers, train_limit=limit,
                                     val_from_train=held)
    else:
        setup = Setup(dataset=s[K_DATASET], model=s[K_MODEL], layers=layers, flip=bool(s[K_FLIP]), train_limit=limit)
    return Choice(setup, s[K_DEVICE], where, s[K_PRESET], info.infos, info.defaults, info.error)


def key_bytes(choice: Choice, layers: list[str] | tuple[str, ...] | None = None, rows: int | None = None) -> int:
    """Bytes of the cache's float32 keys for `layers` (default: the setup's); `rows` counts flips too."""
    dims = {i.name: i.dim for i in choice.layer_infos}
    d = sum(dims.get(l, 0) for l in (layers or choice.layers))
    if rows is None:
        n = choice.setup.train_limit or train_size(choice.setup.dataset, choice.data_dir) or 0
        rows = int(n) * (2 if choice.setup.flip else 1)
    return int(rows) * d * 4


def sidebar() -> Choice:
    """Draw the shared sidebar (presets and the setup) and return the current choice.

    Called from the entry script (app.py), not from pages: widgets created by a page belong to
    that page and would lose their values when the user switches pages.
    """
    _init_state()
    s = st.session_state
    for k in WIDGET_KEYS:
        # Set through the Session State API on every run, so each widget's message carries its
        # value: a browser that lost its own copy of the sidebar's widget states (a run cut short
        # by a page switch, under load) would otherwise fall back to each widget's default (1% of
        # the cache, no key layers) and send that back as the user's choice.
        if k in s:
            s[k] = s[k]
    sb = st.sidebar
    sb.subheader("Setup")
    sb.selectbox("Preset", [*PRESETS, CUSTOM], key=K_PRESET, on_change=apply_preset,
                 help="Digits works offline and builds in seconds; CIFAR-10 needs the data and weights "
                      "in the data directory (or a network) and a few minutes.")
    sb.selectbox("Dataset", list(DATASETS), key=K_DATASET, format_func=DATASETS.get, on_change=_on_dataset)
    sb.selectbox("Model", MODELS[st.session_state[K_DATASET]], key=K_MODEL, on_change=_on_model)
    choice = current()
    infos = {i.name: i for i in choice.layer_infos}
    sb.multiselect(
        "Key layers", list(infos), key=K_LAYERS, format_func=_layer_label(infos), on_change=_mark_custom,
        placeholder=f"model default: {', '.join(choice.default_layers) or '—'}",
        help="Activations of these layers, concatenated and normalised to unit length, are the cache's keys. "
             "Shape per image and depth l/L (0 = input, 1 = output) are shown.",
        disabled=not infos,
    )
    sb.select_slider("Cache size (% of the training set)", FRACTIONS, key=K_FRACTION, on_change=_mark_custom,
                     help="A class-balanced, seeded subset of the training set is stored.")
    paper = st.session_state.get(K_PROTOCOL) == "paper"
    sb.checkbox("Also store horizontal flips", key=K_FLIP, on_change=_mark_custom, disabled=paper,
                help="Doubles the cache with mirrored images (the author's code did, for CIFAR)."
                     + (" The paper protocol always stores them." if paper else ""))
    sb.selectbox("Protocol", list(PROTOCOLS), key=K_PROTOCOL, format_func=lambda p: f"{p}: {PROTOCOLS[p]}",
                 on_change=_mark_custom,
                 help="default: θ and λ are tuned on a seeded half of the test set and the other half is reported. "
                      "paper: the author's CIFAR protocol — every training image and its flip in the cache, θ and λ "
                      "tuned on 5,000 held-out training images and their flips (a tenth of smaller training sets) "
                      "on a 33×33 grid, the whole test set reported.")
    sb.selectbox("Device", devices(), key=K_DEVICE)
    choice = current()
    st.session_state[K_KEPT] = {k: st.session_state[k] for k in WIDGET_KEYS if k in st.session_state}
    if choice.problem:
        sb.warning("This setup cannot be loaded here; the page says why.", icon=":material/warning:")
        sb.button(f"Use {OFFLINE}", on_click=apply_preset, args=(OFFLINE,), key="sb_offline")
    else:
        n = choice.setup.train_limit
        gb = key_bytes(choice) / 2**30
        sb.caption(
            f"Keys: {', '.join(choice.layers)} · cache: {'all' if n is None else n} training items"
            f"{' + flips' if choice.setup.flip else ''}" + (f" · keys ≈ {gb:.1f} GB in memory" if gb >= 0.1 else "")
        )
        if gb > 4:
            sb.warning("These keys need a lot of memory; pick a narrower layer or lower the cache size.")
    return choice
