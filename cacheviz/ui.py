"""Streamlit glue: the shared sidebar, cached resources, background builds with progress.

The only module of `cacheviz` that imports Streamlit. Pages read widgets, ask this module for
the current `Setup` and for cached engine objects, call the engine, and draw.

Sharing between sessions (one server process):
* results and features persist in the engine's store, so a restart costs nothing;
* heavy objects (workspace, cache index, query similarities) are `st.cache_resource` entries
  with `max_entries` bounds;
* builds run in background threads on a process-wide job board keyed by (kind, Setup, data
  dir): a second session asking for the same build follows the running one instead of starting
  another, and a page switch does not cancel it. A lock keyed by the Setup also guards every
  cached loader, so two sessions never extract the same features at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import streamlit as st
import torch

from . import experiment, images, retrieval, store
from .config import DEFAULT_MODEL, Setup
from .errors import CachevizError
from .features import LayerInfo, list_layers

log = logging.getLogger("cacheviz.app")

OFFLINE = "Digits · small CNN (offline)"
CIFAR = "CIFAR-10 · ResNet-20"
CUSTOM = "Custom"
PRESETS: dict[str, dict[str, Any]] = {
    # pool + relu3: the cache fixes a few of the network's test mistakes and breaks none.
    OFFLINE: dict(dataset="digits", model="digits-cnn", layers=["pool", "relu3"], fraction=100, flip=False),
    # One 4096-d key layer: a cold build takes about 2-3 minutes on a laptop CPU.
    CIFAR: dict(dataset="cifar10", model="resnet20", layers=["layer3.2.relu1"], fraction=100, flip=False),
}
DATASETS = {"digits": "Digits (8×8 gray, bundled, offline)", "cifar10": "CIFAR-10 (32×32 colour)"}
MODELS = {"digits": ["digits-cnn"], "cifar10": ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]}
TRAIN_SIZES = {"cifar10": 50_000}  # digits is measured (it loads instantly)
FRACTIONS = [1, 2, 5, 10, 20, 25, 50, 75, 100]
BUILD_STAGES = ("load data", "extract train features", "extract test features", "grid search", "test")

# Session-state keys of the sidebar widgets (selections only; never tensors).
K_PRESET, K_DATASET, K_MODEL, K_LAYERS = "cv_preset", "cv_dataset", "cv_model", "cv_layers"
K_FRACTION, K_FLIP, K_DEVICE = "cv_fraction", "cv_flip", "cv_device"


def data_dir() -> Path:
    """`CACHEVIZ_DATA_DIR`, else ./data (read on every run, so tests can point it elsewhere)."""
    return Path(os.environ.get("CACHEVIZ_DATA_DIR") or "data").expanduser()


def _hash_setup(s: Setup) -> str:
    return store.config_hash(s.to_dict())


def setup_tag(s: Setup) -> str:
    """Short id of a Setup, for widget keys that must reset when the setup changes."""
    return _hash_setup(s)[:8]


_HASH = {Setup: _hash_setup}


# ---------------------------------------------------------------------------------------------
# Messages: engine errors are one sentence; a few name CLI flags, which mean nothing here.

_APP_WORDING = [
    (" or pass --checkpoint PATH", ""),
    ("use --dataset digits, which works offline", "use the offline Digits preset"),
    ("; use --device cpu", "; choose the cpu device in the sidebar"),
    ("lower --train-limit", "lower the cache size"),
]


def app_message(exc: BaseException | str) -> str:
    msg = str(exc)
    for old, new in _APP_WORDING:
        msg = msg.replace(old, new)
    return msg


def use_offline_preset_button(key: str) -> None:
    st.button(f"Switch to the offline preset ({OFFLINE})", key=key, on_click=apply_preset, args=(OFFLINE,),
              type="primary")


def show_problem(msg: str, key: str = "offline_from_problem") -> None:
    """One sentence, where the data lives, and the way out: the offline preset."""
    st.error(app_message(msg))
    st.caption(f"Data directory: `{data_dir().resolve()}` (set `CACHEVIZ_DATA_DIR` to use another).")
    use_offline_preset_button(key)


@contextmanager
def guard(key: str = "guard"):
    """Turn any error of a page into a message: never a traceback in the browser."""
    try:
        yield
    except CachevizError as exc:
        show_problem(str(exc), key=f"{key}_offline")
    except MemoryError:
        st.error("The machine ran out of memory; lower the cache size or pick a narrower key layer.")
    except Exception as exc:  # Streamlit's stop/rerun are BaseExceptions and pass through
        log.error("unexpected error in the app:\n%s", traceback.format_exc())
        st.error(
            f"Something unexpected went wrong ({type(exc).__name__}); reload the page, and if it happens "
            f"again report it with the server log."
        )


# ---------------------------------------------------------------------------------------------
# Locks and background jobs (process-wide: shared by every session)


class _Locks:
    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[Any, threading.Lock] = {}

    def __call__(self, key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


@st.cache_resource(show_spinner=False)
def _locks() -> _Locks:
    return _Locks()


def setup_lock(setup: Setup, where: Path | str) -> threading.Lock:
    """The lock of one Setup in one data directory: held around anything that builds for it."""
    return _locks()((_hash_setup(setup), str(Path(where).resolve())))


@dataclass
class Job:
    """A build running in a background thread, reporting per-stage progress."""

    key: tuple
    title: str
    state: str = "running"  # running | done | failed
    stage: str = ""
    detail: str = ""
    done: int = 0
    total: int = 1
    t0: float = field(default_factory=time.time)
    stage_t0: float = field(default_factory=time.time)
    finished: list = field(default_factory=list)  # [(stage, seconds)]
    error: str | None = None
    seconds: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def progress(self, done: int, total: int, message: str) -> None:
        stage, _, detail = str(message).partition(": ")
        now = time.time()
        with self._lock:
            if stage != self.stage:
                if self.stage:
                    self.finished.append((self.stage, now - self.stage_t0))
                self.stage, self.stage_t0 = stage, now
            self.detail, self.done, self.total = detail, int(done), max(int(total), 1)

    def finish(self, error: str | None = None) -> None:
        now = time.time()
        with self._lock:
            if self.stage and error is None:
                self.finished.append((self.stage, now - self.stage_t0))
                self.stage = ""
            self.error = error
            self.seconds = now - self.t0
            self.state = "failed" if error else "done"

    def snapshot(self) -> dict:
        with self._lock:
            return dict(
                state=self.state, stage=self.stage, detail=self.detail, done=self.done, total=self.total,
                elapsed=time.time() - self.t0, stage_elapsed=time.time() - self.stage_t0,
                finished=list(self.finished), error=self.error, seconds=self.seconds, title=self.title,
            )


class JobBoard:
    """At most one running job per key; finished jobs stay listed so late visitors see them."""

    def __init__(self):
        self._jobs: dict[tuple, Job] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def start(self, key: tuple, title: str, work: Callable[[Callable], Any], lock: threading.Lock) -> Job:
        """Start `work(progress)` under `lock` unless a job with `key` is already running."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state == "running":
                return job
            job = Job(key, title)
            self._jobs[key] = job
            if len(self._jobs) > 64:  # forget the oldest finished jobs
                for k in [k for k, j in self._jobs.items() if j.state != "running"][: len(self._jobs) - 64]:
                    del self._jobs[k]

        def run():
            try:
                if not lock.acquire(blocking=False):
                    job.progress(0, 1, "waiting for another build of the same setup")
                    lock.acquire()
                try:
                    work(job.progress)
                finally:
                    lock.release()
                job.finish()
            except CachevizError as exc:
                job.finish(app_message(exc))
            except MemoryError:
                job.finish("The machine ran out of memory; lower the cache size or pick a narrower key layer.")
            except Exception as exc:
                log.error("build %s failed:\n%s", title, traceback.format_exc())
                job.finish(f"The build failed unexpectedly ({type(exc).__name__}); see the server log and try again.")

        threading.Thread(target=run, name=f"cacheviz-{title}", daemon=True).start()
        return job


@st.cache_resource(show_spinner=False)
def jobs() -> JobBoard:
    return JobBoard()


# ---------------------------------------------------------------------------------------------
# The setup chosen in the sidebar


@dataclass(frozen=True)
class Choice:
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
class _ModelInfo:
    infos: tuple[LayerInfo, ...] = ()
    defaults: tuple[str, ...] = ()
    error: str | None = None


def _checkpoint_stamp(where: Path) -> str:
    """Changes when files are added to data_dir/checkpoints, so a failed load is retried."""
    ck = where / "checkpoints"
    try:
        return ",".join(sorted(f"{e.name}:{e.stat().st_size}" for e in os.scandir(ck)))
    except OSError:
        return ""


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def _model_info(model: str, where: str, stamp: str) -> _ModelInfo:
    from .models import DIGITS_LAYERS, DIGITS_MEAN, DIGITS_STD, DigitsCNN, ModelSpec, load_model

    try:
        if model == "digits-cnn":
            try:
                spec = load_model(model, where, train_if_missing=False)
            except CachevizError:
                # Not trained yet: the architecture is enough to list its layers; the build trains it.
                spec = ModelSpec(name="digits-cnn", net=DigitsCNN().eval(), input_size=(8, 8), in_channels=1,
                                 mean=DIGITS_MEAN, std=DIGITS_STD, classes=[str(d) for d in range(10)],
                                 layers=list(DIGITS_LAYERS), default_layers=["relu3"], weights_id="untrained")
        else:
            spec = load_model(model, where)
        return _ModelInfo(tuple(list_layers(spec)), tuple(spec.default_layers))
    except CachevizError as exc:
        return _ModelInfo(error=app_message(exc))


def model_info(model: str) -> _ModelInfo:
    where = data_dir()
    return _model_info(model, str(where), _checkpoint_stamp(where))


@st.cache_data(max_entries=8, show_spinner=False)
def _train_size(dataset: str, where: str) -> int | None:
    if dataset == "digits":
        from .data import load_dataset

        return len(load_dataset("digits", where).train_y)
    return TRAIN_SIZES.get(dataset)


def devices() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def apply_preset(name: str | None = None) -> None:
    """Widget callback: copy a preset's values into the sidebar's widgets."""
    name = name or st.session_state.get(K_PRESET, OFFLINE)
    p = PRESETS.get(name)
    if p is None:
        return
    st.session_state[K_PRESET] = name
    st.session_state[K_DATASET] = p["dataset"]
    st.session_state[K_MODEL] = p["model"]
    st.session_state[K_LAYERS] = list(p["layers"])
    st.session_state[K_FRACTION] = p["fraction"]
    st.session_state[K_FLIP] = p["flip"]


def _matching_preset() -> str:
    s = st.session_state
    for name, p in PRESETS.items():
        if (s.get(K_DATASET), s.get(K_MODEL), list(s.get(K_LAYERS) or []), s.get(K_FRACTION), s.get(K_FLIP)) == (
            p["dataset"], p["model"], p["layers"], p["fraction"], p["flip"]
        ):
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
    if K_PRESET not in s:
        apply_preset(OFFLINE)
    s.setdefault(K_DEVICE, "auto")
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
        if i is None:
            return name
        return f"{name} · {'×'.join(map(str, i.shape))} · l/L {i.depth:.2f}"

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
    n_train = _train_size(s[K_DATASET], str(where))
    frac = int(s[K_FRACTION])
    limit = None
    if frac < 100 and n_train:
        limit = max(10, int(round(n_train * frac / 100)))
    setup = Setup(dataset=s[K_DATASET], model=s[K_MODEL], layers=layers, flip=bool(s[K_FLIP]), train_limit=limit)
    return Choice(setup, s[K_DEVICE], where, s[K_PRESET], info.infos, info.defaults, info.error)


def page_config() -> None:
    st.set_page_config(page_title="cacheviz · cache models", page_icon=":material/memory:", layout="wide")


# Streamlit keeps a compatibility mode for apps with a pages/ folder beside the entry script:
# until some run has called st.navigation, a request for a page URL (say the first visitor of a
# freshly started server opens /neighbours) runs that page file ALONE, without app.py, so no
# sidebar, and the mode sticks for the whole process. Pages therefore check that app.py ran in
# this script run and, when it did not, run it (its st.navigation then ends that mode).
_RUN = threading.local()


def entrypoint_started() -> None:
    """Called first thing by app.py in every script run."""
    _RUN.entry = True


def ensure_entrypoint(app_path: str | Path) -> None:
    """Called first thing by every page: run app.py (which runs this page) if it did not run."""
    ran = getattr(_RUN, "entry", False)
    _RUN.entry = False
    if ran:
        return
    import runpy

    runpy.run_path(str(app_path), run_name="__main__")
    st.stop()


def sidebar() -> Choice:
    """Draw the shared sidebar (presets and the setup) and return the current choice.

    Called from the entry script (app.py), not from pages: widgets created by a page belong to
    that page and would lose their values when the user switches pages.
    """
    _init_state()
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
    sb.checkbox("Also store horizontal flips", key=K_FLIP, on_change=_mark_custom,
                help="Doubles the cache with mirrored images (the author's code did, for CIFAR).")
    sb.selectbox("Device", devices(), key=K_DEVICE)
    choice = current()
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


def key_bytes(choice: Choice, layers: list[str] | tuple[str, ...] | None = None, rows: int | None = None) -> int:
    """Bytes of the cache's float32 keys for `layers` (default: the setup's); `rows` counts flips too."""
    dims = {i.name: i.dim for i in choice.layer_infos}
    d = sum(dims.get(l, 0) for l in (layers or choice.layers))
    if rows is None:
        n = choice.setup.train_limit or _train_size(choice.setup.dataset, str(choice.data_dir)) or 0
        rows = int(n) * (2 if choice.setup.flip else 1)
    return int(rows) * d * 4


def compare_defaults(choice: Choice) -> tuple[str, str]:
    """Layer A: the first key layer; layer B: the layer of at most 4096 dims farthest from it in depth."""
    infos = [i for i in choice.layer_infos if i.name not in ("input", "logits")] or list(choice.layer_infos)
    names = [i.name for i in infos]
    a = choice.layers[0] if choice.layers and choice.layers[0] in names else names[-1]
    depth = {i.name: i.depth for i in infos}
    small = [i for i in infos if i.name != a and i.dim <= 4096] or [i for i in infos if i.name != a] or infos
    b = max(small, key=lambda i: abs(i.depth - depth[a])).name
    return a, b


def missing_data_note(choice: Choice) -> str | None:
    """A sentence when the dataset is neither in the data directory nor downloaded before."""
    ds = choice.setup.dataset
    if ds == "digits":
        return None
    local = choice.data_dir / ds
    if (local / "train").is_dir() and (local / "test").is_dir():
        return None
    if any((choice.data_dir / "tensors").glob(f"{ds}-*.safetensors")):  # decoded before (e.g. downloaded)
        return None
    return (
        f"{DATASETS.get(ds, ds)} is not in {local}/{{train,test}}/<class>/; the build will try to download it "
        f"into {choice.data_dir / 'downloads'} — without a network, copy the image-folder tree there first."
    )


# ---------------------------------------------------------------------------------------------
# Builds: evaluate (the whole pipeline) and comparison caches


def stored_result(choice: Choice) -> dict | None:
    """The evaluate result of the current setup if it is already stored (instant), else None."""
    if choice.problem or not experiment.result_path(choice.setup, choice.data_dir).exists():
        return None
    return experiment.evaluate(choice.setup, choice.data_dir, device=choice.device)


def _build_key(kind: str, setup: Setup, where: Path) -> tuple:
    return (kind, _hash_setup(setup), str(Path(where).resolve()))


def build_job(choice: Choice) -> Job | None:
    return jobs().get(_build_key("evaluate", choice.setup, choice.data_dir))


def start_build(choice: Choice) -> Job:
    setup, where, device = choice.setup, choice.data_dir, choice.device
    title = f"{setup.dataset}/{setup.model}/{','.join(choice.layers)}"
    return jobs().start(
        _build_key("evaluate", setup, where), title,
        lambda progress: experiment.evaluate(setup, where, device=device, progress=progress),
        setup_lock(setup, where),
    )


def _index_setup(choice: Choice, layers: tuple[str, ...]) -> Setup:
    return choice.setup.replace(layers=tuple(layers)) if layers else choice.setup


def start_index_job(choice: Choice, layers: tuple[str, ...] = ()) -> Job:
    """Make sure the cache items' features for `layers` are in the store, in the background.

    They are, right after a build, and then this takes a fraction of a second; for another key
    layer (a comparison) or after the store was cleared it extracts them, with progress.
    """
    setup, where, device = _index_setup(choice, layers), choice.data_dir, choice.device

    def work(progress):
        progress(0, 1, "load data")
        ws = experiment.prepare(setup, where, device, progress=lambda d, t, m: progress(d, t, f"load data: {m}"))
        progress(0, 1, "extract train features")
        ws.features("train", ws.split.cache_test_idx, ws.layers, flip=setup.flip,
                    progress=lambda d, t, m: progress(d, t, f"extract train features: {m}"))

    title = f"keys {','.join(layers or choice.layers)}"
    return jobs().start(_build_key("index", setup, where), title, work, setup_lock(setup, where))


def index_job(choice: Choice, layers: tuple[str, ...] = ()) -> Job | None:
    return jobs().get(_build_key("index", _index_setup(choice, layers), choice.data_dir))


def load_index(choice: Choice, layers: tuple[str, ...] = (), key: str = "index") -> retrieval.CacheIndex | None:
    """The cache keyed on `layers` (default: the setup's); while its features are extracted, the
    progress is shown and None returned when that fails."""
    layers = tuple(layers)
    job = index_job(choice, layers)
    if job is not None and job.state == "failed":
        st.error(job.error or "Preparing these keys failed.")
        if not st.button("Try again", key=f"{key}_retry"):
            return None
        job = None
    if job is None:
        job = start_index_job(choice, layers)
        for _ in range(20):  # keys already in the store load in a moment: spare the page a flash of progress
            if job.state != "running":
                break
            time.sleep(0.1)
    if job.state == "running":
        show_progress(job, ("load data", "extract train features"))
        return None
    if job.state == "failed":
        st.rerun()  # shown, with "Try again", by the next run
    return cache_index(choice.setup, str(choice.data_dir), choice.device, layers)


def _fmt_s(sec: float) -> str:
    sec = max(0.0, float(sec))
    return f"{sec:.0f} s" if sec < 90 else f"{sec // 60:.0f} min {sec % 60:02.0f} s"


def _draw_snapshot(snap: dict, stages: tuple[str, ...]) -> None:
    finished = dict(snap["finished"])
    lines = []
    for name in stages:
        if name in finished:
            lines.append(f":green[:material/check_circle:] {name} — {_fmt_s(finished[name])}")
        elif name == snap["stage"]:
            lines.append(f":blue[:material/progress_activity:] **{name}**")
        else:
            lines.append(f":gray[:material/radio_button_unchecked: {name}]")
    st.markdown("  \n".join(lines))
    if snap["state"] == "running":
        frac = min(max(snap["done"] / snap["total"], 0.0), 1.0)
        el = snap["stage_elapsed"]
        eta = f" · ETA {_fmt_s(el / frac - el)}" if 0.02 < frac < 1 and el > 1 else ""
        detail = f" — {snap['detail']}" if snap["detail"] else ""
        count = f" {snap['done']}/{snap['total']}" if snap["total"] > 1 else ""
        st.progress(frac, text=f"{snap['stage'] or 'starting'}{detail}{count} · {_fmt_s(el)} in this stage{eta}")
        st.caption(f"Elapsed {_fmt_s(snap['elapsed'])}. You may switch pages; the build goes on.")


@st.fragment(run_every=1.0)
def show_progress(job: Job, stages: tuple[str, ...] = BUILD_STAGES) -> None:
    """The job's stages, progress bar, elapsed time and ETA, redrawn every second on its own.

    A fragment, so the page's script run ends at once (the session stays responsive, nothing
    on the page goes stale); when the job ends, the whole page runs again and shows the result.
    """
    snap = job.snapshot()
    if snap["state"] != "running":
        st.rerun()
    _draw_snapshot(snap, stages)


def build_panel(choice: Choice, key: str) -> dict | None:
    """The stored result, or the "Build cache" button and, while it runs, its progress."""
    if choice.problem:
        show_problem(choice.problem, key=f"{key}_problem")
        return None
    result = stored_result(choice)
    if result is not None:
        return result
    job = build_job(choice)
    if job is not None and job.state == "running":
        # Also when another session started it: follow that build instead of starting a second one.
        show_progress(job)
        return None
    note = missing_data_note(choice)
    if note and job is None:
        st.info(note)
    if st.button("Build cache", type="primary", key=f"{key}_build", icon=":material/play_arrow:"):
        start_build(choice)
        st.rerun()  # the next run shows the progress in the button's place
    if job is not None and job.state == "failed":
        show_problem(job.error or "The last build failed; try again.", key=f"{key}_failed")
    return None


# ---------------------------------------------------------------------------------------------
# Cached engine objects


@st.cache_resource(max_entries=3, show_spinner="Loading the data set and the model…", hash_funcs=_HASH)
def workspace(setup: Setup, where: str, device: str):
    with setup_lock(setup, where):
        return experiment.prepare(setup, where, device)


@st.cache_resource(max_entries=4, show_spinner="Loading the cache…", hash_funcs=_HASH)
def cache_index(setup: Setup, where: str, device: str, layers: tuple[str, ...] = ()) -> retrieval.CacheIndex:
    ws = workspace(setup, where, device)
    keyed = setup.replace(layers=tuple(layers)) if layers else setup
    with setup_lock(keyed, where):
        return retrieval.build_index(ws, list(layers) or None)


@st.cache_resource(max_entries=3, show_spinner=False, hash_funcs=_HASH)
def picks(setup: Setup, where: str) -> retrieval.TestPicks:
    return retrieval.load_picks(setup, where)


@st.cache_resource(max_entries=64, show_spinner=False, hash_funcs=_HASH)
def query(setup: Setup, where: str, device: str, layers: tuple[str, ...], image_key: str,
          _image: np.ndarray) -> retrieval.Query:
    """The query's key, p_net and similarity to the whole cache; `image_key` identifies `_image`."""
    ws = workspace(setup, where, device)
    index = cache_index(setup, where, device, layers)
    return retrieval.make_query(ws, index, _image)


@st.cache_data(max_entries=32, show_spinner=False)
def decode(data: bytes, name: str) -> np.ndarray:
    """images.decode_upload, cached by content so slider moves do not decode the file again."""
    return images.decode_upload(data, name)


def image_key(image: np.ndarray) -> str:
    a = np.ascontiguousarray(image)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:24]


def thumbnails(imgs: np.ndarray, colors: list, size: int = 96) -> list[np.ndarray]:
    return [images.framed(images.enlarge(im, size), c, width=max(3, size // 20)) for im, c in zip(imgs, colors)]


# ---------------------------------------------------------------------------------------------
# Navigation: every page of the app, in sections (app.py passes this to st.navigation)


def pages(root: str | Path) -> dict[str, list]:
    """The app's pages, grouped: the interactive explorer and the paper's experiments."""
    pg = Path(root) / "pages"
    return {
        "Explore": [
            st.Page(pg / "home.py", title="Cache model", icon=":material/memory:", default=True),
            st.Page(pg / "neighbours.py", title="Neighbours", icon=":material/image_search:"),
        ],
        "The paper's experiments": [
            st.Page(pg / "layers.py", title="Which layer (Fig. 2)", icon=":material/stacked_line_chart:"),
            st.Page(pg / "sizes.py", title="Cache size (Fig. 3)", icon=":material/trending_up:"),
            st.Page(pg / "table1.py", title="Table 1", icon=":material/table_chart:"),
        ],
    }


# ---------------------------------------------------------------------------------------------
# Sweeps (Figure 2, Figure 3, Table 1) as background jobs on the shared job board.
#
# A sweep's rows persist under data_dir/results; whether they are there is asked of the engine
# itself: the sweep is called with a progress callback that raises at the first stage message
# ("load data"), which every sweep sends before any work when its rows are not stored yet.
# Stored rows come back at once and the probe is never called. No key is duplicated here.

SWEEP_STAGES = {
    "sweep-layers": ("load data", "extract train features", "extract test features", "layers"),
    "sweep-size": ("load data", "extract train features", "extract test features", "cache sizes"),
    "table1": ("load data", "extract train features", "extract test features", "tuning"),
}
TEST_SIZES = {"cifar10": 10_000}
SWEEP_DIMS = [64, 128, 256, 512, 1024, 2048, 4096]
EXACT_LIMIT_GB = 8.0  # the layer sweep refuses exact keys needing more than this
ProgressFn = Callable[[int, int, str], None]


class _NotStored(Exception):
    """Raised by the probe: the sweep's rows are not stored yet."""


def _probe(done: int, total: int, message: str) -> None:
    if "load data" in str(message):
        raise _NotStored


@dataclass(frozen=True, eq=False)
class Sweep:
    """One sweep a page asks for: the setups it runs and how, keyed by everything that decides it."""

    kind: str  # sweep-layers | sweep-size | table1
    title: str
    setups: tuple  # (label, Setup) per model; label "" when there is one
    args: dict
    data_dir: Path
    device: str
    stages: tuple[str, ...]

    @property
    def job_key(self) -> tuple:
        params = {"setups": [s.to_dict() for _, s in self.setups], "args": self.args}
        return (self.kind, store.config_hash(json_safe(params)), str(Path(self.data_dir).resolve()))

    def run(self, progress: ProgressFn) -> list[dict]:
        from . import sweeps

        rows: list[dict] = []
        for label, setup in self.setups:
            report = _stage_progress(progress, SWEEP_STAGES[self.kind], label)
            common = dict(device=self.device, progress=report)
            if self.kind == "sweep-layers":
                rows += sweeps.sweep_layers(setup, self.data_dir, retune=self.args["retune"], **common)
            elif self.kind == "sweep-size":
                rows += sweeps.sweep_size(setup, self.data_dir, fractions=self.args["fractions"],
                                          seeds=self.args["seeds"], **common)
            else:
                rows += sweeps.table1([setup], self.data_dir, combine_top=self.args["combine_top"], **common)
        return rows


def json_safe(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _stage_progress(progress: ProgressFn, stages: tuple[str, ...], label: str) -> ProgressFn:
    """Keep the sweep's own stages (others, like table1's per-model note, are dropped) and
    prefix them with the model's label when several models run in one job."""

    def report(done: int, total: int, message: str) -> None:
        stage = str(message).partition(": ")[0]
        if stage not in stages:
            return
        progress(done, total, f"{label} · {message}" if label else message)

    return report


def sweep_stages(sweep: Sweep) -> tuple[str, ...]:
    labels = [label for label, _ in sweep.setups]
    if len(labels) == 1 and not labels[0]:
        return sweep.stages
    return tuple(f"{label} · {s}" for label in labels for s in sweep.stages)


def stored_sweep(sweep: Sweep) -> list[dict] | None:
    """The sweep's rows if every part of it is stored (instant), else None; computes nothing."""
    try:
        return sweep.run(_probe)
    except _NotStored:
        return None


def sweep_job(sweep: Sweep) -> Job | None:
    return jobs().get(sweep.job_key)


def start_sweep(sweep: Sweep) -> Job:
    # Sweeps of one dataset run one after another: on a small machine two at once only thrash.
    lock = _locks()(("sweep", sweep.setups[0][1].dataset, str(Path(sweep.data_dir).resolve())))
    return jobs().start(sweep.job_key, sweep.title, sweep.run, lock)


def sweep_panel(sweep: Sweep, key: str, label: str = "Run sweep", refusal: str | None = None,
                note: str | None = None) -> list[dict] | None:
    """The sweep's stored rows; else the run button and, while the job runs, its progress.

    `refusal`: one sentence why it must not run (shown, no button). The job is shared by every
    session asking for the same sweep, and a page switch does not stop it.
    """
    rows = stored_sweep(sweep)
    if rows is not None:
        return rows
    job = sweep_job(sweep)
    if job is not None and job.state == "running":
        show_progress(job, sweep_stages(sweep))
        return None
    if refusal:
        st.warning(refusal, icon=":material/memory:")
        return None
    if note and job is None:
        st.info(note)
    if st.button(label, type="primary", key=f"{key}_run", icon=":material/play_arrow:"):
        start_sweep(sweep)
        st.rerun()
    if job is not None and job.state == "failed":
        st.error(job.error or "The sweep failed; try again.")
    return None


def _sweep_setup(choice: Choice, model: str, **changes) -> Setup:
    return choice.setup.replace(model=model, **changes)


def model_label(models: list[str], model: str) -> str:
    return model if len(models) > 1 else ""


def layer_sweep(choice: Choice, models: list[str], project_dim: int | None, retune: bool) -> Sweep:
    """Figure 2 for `models` (the first is the sidebar's) with the sidebar's cache and flips."""
    setups = tuple((model_label(models, m), _sweep_setup(choice, m, layers=(), project_dim=project_dim))
                   for m in models)
    title = f"layer sweep {choice.setup.dataset}/{'+'.join(models)}"
    return Sweep("sweep-layers", title, setups, {"retune": bool(retune)}, choice.data_dir, choice.device,
                 SWEEP_STAGES["sweep-layers"])


def size_sweep(choice: Choice, fractions: list[float], seeds: list[int]) -> Sweep:
    """Figure 3 with the sidebar's setup (its key layers and cache)."""
    title = f"size sweep {choice.setup.dataset}/{choice.setup.model}/{','.join(choice.layers)}"
    return Sweep("sweep-size", title, (("", choice.setup),),
                 {"fractions": sorted(float(f) for f in fractions), "seeds": [int(s) for s in seeds]},
                 choice.data_dir, choice.device, SWEEP_STAGES["sweep-size"])


def table1_sweep(choice: Choice, models: list[str], sidebar_layers: bool, combine_top: int) -> Sweep:
    """Table 1 for `models`: the 'cache' row keyed on each model's own layers or the sidebar's."""
    layers = tuple(choice.setup.layers) if sidebar_layers else ()
    setups = tuple((model_label(models, m), _sweep_setup(choice, m, layers=layers)) for m in models)
    title = f"table 1 {choice.setup.dataset}/{'+'.join(models)}"
    return Sweep("table1", title, setups, {"combine_top": int(combine_top)}, choice.data_dir, choice.device,
                 SWEEP_STAGES["table1"])


@st.cache_data(max_entries=8, show_spinner=False)
def _test_size(dataset: str, where: str) -> int | None:
    if dataset == "digits":
        from .data import load_dataset

        return len(load_dataset("digits", where).test_y)
    return TEST_SIZES.get(dataset)


def sweep_feature_bytes(choice: Choice, infos: tuple[LayerInfo, ...] | list[LayerInfo],
                        project_dim: int | None) -> int:
    """Float32 features of every layer in `infos` (each projected to at most `project_dim`)
    for the cache items (with flips) and the test items: what a layer sweep holds at once."""
    d = sum(min(i.dim, project_dim) if project_dim else i.dim for i in infos)
    n = choice.setup.train_limit or _train_size(choice.setup.dataset, str(choice.data_dir)) or 0
    n = int(n) * (2 if choice.setup.flip else 1) + int(_test_size(choice.setup.dataset, str(choice.data_dir)) or 0)
    return d * n * 4


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


# ---------------------------------------------------------------------------------------------
# Tables of sweep rows for display, and export


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
    from .plots import size_sweep_summary

    return [{
        "cache size": f"{100 * s['fraction']:.3g}%", "cache items": s["n_cache"], "seeds": s["n_seeds"],
        "cache gain (points)": round(s["gain_cache"], 2), "cache s.e.m.": round(s["sem_cache"], 2),
        "cache-only gain (points)": round(s["gain_cache_only"], 2), "cache-only s.e.m.": round(s["sem_cache_only"], 2),
    } for s in size_sweep_summary(rows)]


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


def rows_csv(rows: list[dict]) -> bytes:
    """The rows as the command line writes them with --out X.csv (lists joined with '+')."""
    import tempfile

    from .__main__ import write_rows

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.csv")
        write_rows(rows, path)
        return Path(path).read_bytes()


_PNG_CACHE: dict[str, bytes] = {}
_PNG_LOCK = threading.Lock()


def _png_of(fig_json: str) -> bytes:
    """PNG bytes of a figure (as JSON), rendered once per figure (the newest 16 are kept)."""
    import plotly.io as pio

    from . import plots

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
    from . import plots

    row = st.container(horizontal=True, vertical_alignment="center", gap="small")
    row.download_button("CSV", data=rows_csv(rows), file_name=f"{stem}.csv", mime="text/csv", key=f"{key}_csv",
                        icon=":material/download:", on_click="ignore", help="The rows, as `--out X.csv` writes them.")
    problem = plots.png_problem()
    if problem:
        row.caption(problem)
        return
    fig_json = fig.to_json()
    row.download_button("PNG", data=lambda: _png_of(fig_json), file_name=f"{stem}.png", mime="image/png",
                        key=f"{key}_png", icon=":material/image:", on_click="ignore",
                        help="The figure as a PNG image, rendered when you click (a few seconds).")

def cli_flags(setup: Setup) -> str:
    """The command-line options that give `setup`'s cache (size, flips), for 'the same numbers as' notes."""
    return (f" --train-limit {setup.train_limit}" if setup.train_limit else "") + (" --flip" if setup.flip else "")
