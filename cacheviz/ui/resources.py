"""Engine objects shared by every session of the server: bounded caches keyed by what they hold.

Heavy objects (workspace, cache index, a query's similarities) are `st.cache_resource` entries
with `max_entries` bounds, keyed by the setup and by `tag` (a hash of the fingerprints of the
data and weights the stored result was computed from), so replaced weights or data never serve
a stale object. A lock per setup guards every loader, so two sessions never extract the same
features at once.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import streamlit as st

from .. import images, kstore, retrieval, store, workspace as engine_ws
from ..config import Setup
from ..experiment import Evaluate, TestPicks
from .jobs import JobBoard, Locks
from .messages import message

_HASH = {Setup: lambda s: store.config_hash(s.to_dict())}


@st.cache_resource(show_spinner=False)
def locks() -> Locks:
    return Locks()


def workers() -> int:
    """Worker processes for builds and sweeps: `CACHEVIZ_WORKERS` (default 1; 0 runs them in
    threads of the server, as the in-process tests do)."""
    try:
        return max(0, int(os.environ.get("CACHEVIZ_WORKERS", "1")))
    except ValueError:
        return 1


def shared_lock(key: tuple) -> tuple[str, tuple] | None:
    """The cross-process lock of a job the board runs, by its key: (data directory, lock name).

    Two servers on one data directory must not both create a knowledge store or extract the same
    keys; the name leaves out the directory's path, which may differ between machines sharing
    it. Studies lock themselves in `Study.run`, so their jobs need none here."""
    if len(key) == 2 and key[0] == "kstore":
        path = Path(key[1])
        if kstore.stores_dir(path.parent.parent) == path.parent:
            return str(path.parent.parent), ("kstore", path.name)
    if len(key) == 3 and key[0] == "index" and isinstance(key[1], Setup):
        return str(key[2]), ("index", key[1].to_dict())
    return None


@st.cache_resource(show_spinner=False)
def jobs() -> JobBoard:
    return JobBoard(render=message, workers=workers(), shared=shared_lock)


def setup_lock(setup: Setup, where: Path | str) -> threading.Lock:
    """The lock of one Setup in one data directory: held around anything that builds for it."""
    return locks()((store.config_hash(setup.to_dict()), str(Path(where).resolve())))


def result_tag(result: dict) -> str:
    """Names the inputs a stored result was computed from (dataset and weights fingerprints)."""
    return store.config_hash(result.get("inputs") or {})


@st.cache_resource(max_entries=3, show_spinner="Loading the data set and the model…", hash_funcs=_HASH)
def workspace(setup: Setup, where: str, device: str, tag: str) -> engine_ws.Workspace:
    with setup_lock(setup, where):
        return engine_ws.prepare(setup, where, device)


@st.cache_resource(max_entries=4, show_spinner="Loading the cache…", hash_funcs=_HASH)
def cache_index(setup: Setup, where: str, device: str, tag: str, layers: tuple[str, ...] = ()) -> retrieval.CacheIndex:
    ws = workspace(setup, where, device, tag)
    keyed = setup.replace(layers=tuple(layers)) if layers else setup
    with setup_lock(keyed, where):
        return retrieval.build_index(ws, list(layers) or None)


@st.cache_resource(max_entries=3, show_spinner=False, hash_funcs=_HASH)
def picks(setup: Setup, where: str, tag: str) -> TestPicks:
    return Evaluate(setup).picks(where)


@st.cache_resource(max_entries=64, show_spinner=False, hash_funcs=_HASH)
def query(setup: Setup, where: str, device: str, tag: str, layers: tuple[str, ...], image_key: str,
          _image: np.ndarray) -> retrieval.Query:
    """The query's key, p_net and similarity to the whole cache; `image_key` identifies `_image`."""
    ws = workspace(setup, where, device, tag)
    index = cache_index(setup, where, device, tag, layers)
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
