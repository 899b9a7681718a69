"""The cache as a knowledge store (seed 002): items in a vector database, edited in versions.

A store holds a setup's cache items — key, label, where the item came from (a training image or
an uploaded one, kept as a PNG beside the store), its class name and task — as rows of a Milvus
collection (Milvus Lite, embedded, on disk: `<data>/stores/<name>/items.db`; the same
`MilvusClient` reaches a Milvus server or cluster when `CACHEVIZ_MILVUS_URI` names one).

Versions. Rows are never changed or deleted once a version names them. An edit allocates new
ids from the head version's `next_id`, writes its images and an immutable key segment
(`segments/<first id>.safetensors`), inserts its rows, and only then commits by writing the next
version's manifest atomically (`versions/<n>.json`: parent, ids added, ids removed). The live
set of a version is its parent's plus the added minus the removed ids, so an edit that dies
before its manifest leaves the head version exactly as it was; its orphan rows (ids >= head's
`next_id`) are swept the next time the store opens. Undo is one more manifest whose live set is
the one before the edit it undoes: nothing is overwritten, and undo itself can be undone by
editing again.

Search. The database is the store of record; interactive top-k is served in process by FAISS
over the key segments (position = id, so the live set is a search-time selector and an edit
never rebuilds the index): exact inner product for small stores, HNSW for large ones (see
docs/notes/issue11-store-spike.md for the measurements behind the switch). `search(engine="db")`
asks the database instead (the path a clustered store takes); tests check both agree.

p_mem comes from the k retrieved items (`cache.p_mem_from_topk`); `p_mem_exact` keeps the
full-softmax torch path for small stores. Default k = 10: on CIFAR-10 with ResNet20's default
keys the cache model is as accurate at k = 10 as with the exact p_mem (85.12% against 84.86%;
cache-only 80.32% against 80.62%; docs/results/store/topk-resnet20-exact.json), and a small k is
what lets a few added examples correct an answer: on digits (theta 30), with k = 100, six
labelled examples of a misread test image (itself and shifted copies) corrected only 2 of the 5
misread test images; with k = 10 the image alone corrected 4 of the 5 and broke no other answer
(tests/test_kstore.py checks the latter).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import kdb, store
from .cache import CacheMemory, p_mem_from_topk
from .config import Setup
from .data import balanced_subset
from .errors import CachevizError
from .progress import Reporter, Silent, Stage

DEFAULT_K = 10
# Exact FAISS search below this many stored floats (rows x dim): 50,000 x 4,096 exact queries
# take 57 ms p50 here, over the 50 ms goal; HNSW takes ~1 ms at recall@10 0.97 (spike note).
EXACT_MAX_FLOATS = 50_000_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
EVAL_ITEMS = 2000  # test items an edit is judged on (class-balanced); all of them when fewer
INSERT_BATCH = 1000
SMALL_BATCH = 32  # queries searched on one FAISS thread (see `search`)


def stores_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "stores"


def store_name(setup: Setup) -> str:
    """One store per setup by default: the model's name and a hash of what determines the keys."""
    ident = setup.identity()
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{setup.dataset}-{setup.model}-{store.config_hash(ident)[:12]}")


@dataclass(frozen=True)
class Version:
    number: int
    parent: int | None  # the version whose live set this one starts from
    undo_target: int | None  # the version an undo of this one returns to
    op: str  # create | add | remove | undo
    detail: str
    added: list[list[int]]  # [first id, end id) ranges
    removed: list[int]
    next_id: int
    n_live: int
    created: float

    @classmethod
    def from_json(cls, d: dict) -> "Version":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class Evaluation:
    """The store's answers on the held-out test items at one version."""

    version: int
    y: np.ndarray
    pred_net: np.ndarray
    pred_cache: np.ndarray  # the cache model, top-k p_mem mixed with p_net at lam
    pred_cache_only: np.ndarray
    test_idx: np.ndarray  # dataset test indices of the items

    def per_class(self, n_classes: int) -> dict[str, np.ndarray]:
        out = {}
        for name, pred in (("network", self.pred_net), ("cache", self.pred_cache), ("cache_only", self.pred_cache_only)):
            acc = np.full(n_classes, np.nan)
            for c in range(n_classes):
                m = self.y == c
                if m.any():
                    acc[c] = float((pred[m] == c).mean())
            out[name] = acc
        return out


def changed(before: Evaluation, after: Evaluation, model: str = "cache_only") -> list[dict]:
    """Test items whose answer from `model` ('cache' or 'cache_only') differs between two evaluations."""
    a = getattr(before, f"pred_{model}")
    b = getattr(after, f"pred_{model}")
    rows = []
    for i in np.flatnonzero(a != b):
        rows.append({"test_idx": int(before.test_idx[i]), "label": int(before.y[i]), "network": int(before.pred_net[i]),
                     "before": int(a[i]), "after": int(b[i])})
    return rows


# ---------------------------------------------------------------------------------------------
# The store


class KnowledgeStore:
    """A versioned store of cache items; see the module docstring. Open with `open` or `create`."""

    def __init__(self, path: Path, data_dir: Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.data_dir = Path(data_dir)
        self.device = device
        meta = store.load_json(self.path / "meta.json")
        if not meta:
            raise CachevizError(f"there is no knowledge store at {self.path}", "create it with `store create`",
                                param="store", value=str(self.path))
        self.meta = meta
        self.setup = Setup(**meta["setup"])
        self.layers: list[str] = meta["layers"]
        self.classes: list[str] = meta["classes"]
        self.dim: int = meta["dim"]
        self.theta, self.lam, self.theta_cache_only = meta["theta"], meta["lam"], meta["theta_cache_only"]
        self._lock = threading.RLock()
        self._ws = None
        self._index = None
        self._index_rows = 0
        self._keys = np.zeros((0, self.dim), np.float32)
        self._labels = np.zeros(0, np.int64)
        self._sources: list[str] = []
        self._live_cache: dict[int, np.ndarray] = {}
        self._evals: dict[tuple[int, int], Evaluation] = {}
        with self._edit_lock():
            self._load_versions()
            self._sweep_orphans()
        self._load_segments()

    # -- opening and creating --------------------------------------------------------------

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, data_dir: str | os.PathLike, device="cpu") -> "KnowledgeStore":
        p = Path(name_or_path)
        if not (p / "meta.json").exists():
            p = stores_dir(data_dir) / str(name_or_path)
        if not (p / "meta.json").exists():
            have = sorted(d.name for d in stores_dir(data_dir).glob("*") if (d / "meta.json").exists())
            raise CachevizError(f"there is no knowledge store {str(name_or_path)!r}",
                                f"use one of {', '.join(have)}" if have else "create one with `store create`",
                                param="store", value=str(name_or_path))
        return cls(p, Path(data_dir), device)

    @classmethod
    def create(cls, setup: Setup, data_dir: str | os.PathLike, device="cpu", name: str | None = None,
               progress: Reporter | None = None) -> "KnowledgeStore":
        """Version 1: the setup's cache items (training images, no flips), theta and lam tuned on
        the setup's validation part, and the held-out test items an edit is judged on."""
        from .study import score_keys
        from .tuning import default_grid
        from .workspace import ExperimentData, prepare

        rep = progress or Silent()
        data_dir = Path(data_dir)
        name = name or store_name(setup)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
            raise CachevizError("a store's name uses letters, digits, '.', '_' and '-'", param="store", value=name)
        path = stores_dir(data_dir) / name
        if (path / "meta.json").exists():
            return cls(path, data_dir, device)
        rep.stage(Stage.LOAD)
        ws = prepare(setup.replace(flip=False), data_dir, device, progress=rep.step)
        data = ExperimentData(ws, ws.layers, rep)
        sc = score_keys(data, ws.layers, *default_grid(setup.n_theta, setup.n_lam, setup.theta_max), progress=rep)
        from .features import make_keys

        train_idx = data.train_u
        keys = make_keys(data.tf, ws.layers).float().cpu()[: len(train_idx)]
        labels = ws.ds.train_y[train_idx].long()
        q_test = data.queries(ws.layers)[1].float().cpu()
        test_idx, y_test = ws.split.test_idx, data.y_test
        pick = balanced_subset(y_test, EVAL_ITEMS, setup.seed)
        path.mkdir(parents=True, exist_ok=True)
        store.save_tensors(path / "test.safetensors",
                           {"q": q_test[pick].contiguous(), "p_net": data.p_test.float().cpu()[pick].contiguous(),
                            "y": y_test[pick].long(), "test_idx": test_idx[pick].long()}, {"kind": "store-test"})
        meta = {"kind": "knowledge-store", "name": name, "setup": setup.replace(flip=False).to_dict(),
                "layers": list(ws.layers), "dim": int(keys.shape[1]), "classes": list(ws.ds.classes),
                "dataset": setup.dataset, "net": ws.spec.name, "weights": ws.spec.weights_id,
                "theta": sc.theta, "lam": sc.lam, "theta_cache_only": sc.theta_cache_only,
                "exact_accuracy": sc.acc, "exact_cache_only_accuracy": sc.cache_only_acc,
                "format": 1, "created": time.time()}
        with kdb.db(path) as client:
            kdb.make_collection(client, kdb.collection_name(name), int(keys.shape[1]))
        store.atomic_write_json(path / "meta.json", meta)
        ks = cls(path, data_dir, device)
        ks._ws = ws
        rep.stage("store")
        ks._commit_rows(keys.numpy(), labels.numpy(), [f"train:{int(i)}" for i in train_idx], task=0, op="create",
                        detail=f"{len(train_idx)} training images of {setup.dataset}", progress=rep)
        return ks

    # -- versions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _edit_lock(self) -> Iterator[None]:
        """One editor at a time, across threads and processes (sessions, the CLI)."""
        with self._lock:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / "lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _load_versions(self) -> None:
        vs = []
        for f in sorted((self.path / "versions").glob("*.json")):
            d = store.load_json(f)
            if d:
                vs.append(Version.from_json(d))
        self.versions: list[Version] = sorted(vs, key=lambda v: v.number)

    @property
    def head(self) -> Version | None:
        return self.versions[-1] if self.versions else None

    def version(self, number: int | None = None) -> Version:
        if number is None:
            if self.head is None:
                raise CachevizError("this store has no version yet", "create it again with `store create`")
            return self.head
        for v in self.versions:
            if v.number == number:
                return v
        raise CachevizError(f"there is no version {number}", f"choose 1 to {self.head.number if self.head else 0}",
                            param="version", value=number)

    def live_ids(self, number: int | None = None) -> np.ndarray:
        """Sorted ids of the items version `number` (default: head) holds."""
        v = self.version(number)
        got = self._live_cache.get(v.number)
        if got is None:
            base = self.live_ids(v.parent) if v.parent is not None else np.zeros(0, np.int64)
            add = [np.arange(a, b, dtype=np.int64) for a, b in v.added]
            got = np.union1d(base, np.concatenate(add)) if add else base
            if v.removed:
                got = np.setdiff1d(got, np.asarray(v.removed, np.int64), assume_unique=True)
            self._live_cache[v.number] = got
        return got

    def _sweep_orphans(self) -> None:
        """Remove what an edit that died before its manifest left behind."""
        next_id = self.head.next_id if self.head else 0
        # an edit writes its segment before its rows, so orphan rows imply an orphan segment
        orphans = [f for f in (self.path / "segments").glob("*.safetensors") if int(f.stem) >= next_id]
        orphans += [f.with_suffix(".safetensors") for f in (self.path / "segments").glob("*.json")
                    if int(f.stem) >= next_id and not f.with_suffix(".safetensors").exists()]
        if orphans:
            with kdb.db(self.path) as client:
                coll = kdb.collection_name(self.meta)
                kdb.load(client, coll)
                client.delete(coll, filter=f"id >= {next_id}")
            for f in orphans:
                f.unlink(missing_ok=True)
                f.with_suffix(".json").unlink(missing_ok=True)
        for folder in (self.path, self.path / "segments", self.path / "versions", self.path / "images"):
            if folder.is_dir():
                store.sweep_stale_temps(folder)

    def _write_version(self, op: str, detail: str, added: list[list[int]], removed: list[int], next_id: int,
                       parent: int | None, undo_target: int | None, n_live: int) -> Version:
        number = (self.head.number + 1) if self.head else 1
        v = Version(number, parent, undo_target, op, detail, added, removed, next_id, n_live, time.time())
        store.atomic_write_json(self.path / "versions" / f"{number:08d}.json", v.__dict__)
        self.versions.append(v)
        return v

    # -- rows ------------------------------------------------------------------------------

    def refresh(self) -> "KnowledgeStore":
        """Take in versions another session or process committed since this object last looked."""
        with self._lock:
            self._load_versions()
            if self.head is not None and self.head.next_id > len(self._keys):
                self._load_segments(start=len(self._keys))
        return self

    def _load_segments(self, start: int = 0) -> None:
        next_id = self.head.next_id if self.head else 0
        keys, labels, sources = [self._keys[:start]], [self._labels[:start]], list(self._sources[:start])
        for f in sorted((self.path / "segments").glob("*.safetensors"), key=lambda f: int(f.stem)):
            if not start <= int(f.stem) < next_id:
                continue
            got = store.load_tensors(f)
            if got is None:
                raise CachevizError(f"the store's key segment {f.name} is damaged",
                                    "create the store again (`store create --name NEW`)")
            keys.append(got[0]["keys"].numpy())
            labels.append(got[0]["labels"].numpy())
            sources += json.loads((f.with_suffix(".json")).read_text())["sources"]
        self._keys, self._labels = np.concatenate(keys), np.concatenate(labels)
        self._sources = sources
        if len(self._keys) != next_id:
            raise CachevizError(f"the store holds {len(self._keys)} key rows but its head version names {next_id}",
                                "create the store again (`store create --name NEW`)")

    def _commit_rows(self, keys: np.ndarray, labels: np.ndarray, sources: list[str], task: int, op: str, detail: str,
                     progress: Reporter | None = None) -> Version:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        labels = np.asarray(labels, np.int64)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise CachevizError(f"keys of width {keys.shape[-1]} do not fit this store's {self.dim}")
        bad = labels[(labels < 0) | (labels >= len(self.classes))]
        if len(bad):
            raise CachevizError(f"label {int(bad[0])} is not a class of this store",
                                f"use 0 to {len(self.classes) - 1} ({', '.join(self.classes[:10])})",
                                param="label", value=int(bad[0]))
        with self._edit_lock():
            self._load_versions()
            first = self.head.next_id if self.head else 0
            n = len(keys)
            seg = self.path / "segments" / f"{first:012d}.safetensors"
            seg.parent.mkdir(parents=True, exist_ok=True)
            store.atomic_write_json(seg.with_suffix(".json"), {"sources": sources})
            store.save_tensors(seg, {"keys": torch.from_numpy(keys), "labels": torch.from_numpy(labels)},
                               {"kind": "store-segment", "first": first, "n": n})
            coll = kdb.collection_name(self.meta)
            number = (self.head.number + 1) if self.head else 1
            with kdb.db(self.path) as client:
                kdb.load(client, coll)
                for s in range(0, n, INSERT_BATCH):
                    e = min(n, s + INSERT_BATCH)
                    client.insert(coll, [{"id": first + i, "key": keys[i].tolist(), "label": int(labels[i]),
                                          "source": sources[i][:kdb.SOURCE_LEN],
                                          "class_name": self.classes[labels[i]][:kdb.NAME_LEN],
                                          "task": int(task), "version": number} for i in range(s, e)])
                    _crash_point("insert")
                    if progress:
                        progress.step(e, n, "rows")
                client.flush(coll)
            head = self.head
            live_before = self.live_ids() if head else np.zeros(0, np.int64)
            v = self._write_version(op, detail, [[first, first + n]], [], first + n,
                                    head.number if head else None, head.number if head else None,
                                    len(live_before) + n)
            self._keys = np.concatenate([self._keys, keys])
            self._labels = np.concatenate([self._labels, labels])
            self._sources = self._sources + list(sources)
            return v

    # -- edits -----------------------------------------------------------------------------

    def workspace(self):
        if self._ws is None:
            from .workspace import prepare

            self._ws = prepare(self.setup, self.data_dir, self.device)
        return self._ws

    def keys_of(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and p_net of uint8 images (N, H, W, C), exactly as the stored keys were made."""
        from .retrieval import query_keys

        ws = self.workspace()
        x = torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy: decoded uploads are read-only
        if x.ndim == 3:
            x = x[None]
        return query_keys(ws.spec, x, self.layers, project_dim=self.setup.project_dim, seed=self.setup.seed,
                          device=ws.device)

    def add_images(self, images: Sequence[np.ndarray], labels: Sequence[int], names: Sequence[str] | None = None,
                   task: int = 0, detail: str | None = None) -> Version:
        """Add uploaded images (each (H, W, 3) uint8, any size) with their labels: one new version."""
        from PIL import Image

        if not len(images):
            raise CachevizError("there are no images to add", "upload at least one image")
        if len(labels) != len(images):
            raise CachevizError(f"{len(images)} images but {len(labels)} labels", "give one label per image")
        keys = []
        for img in images:  # one at a time: uploads differ in size
            keys.append(self.keys_of(img)[0].float().cpu().numpy())
        sources = []
        for img in images:
            buf = io.BytesIO()
            arr = np.asarray(img, np.uint8)
            Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(buf, format="PNG")
            data = buf.getvalue()
            sha = hashlib.sha256(data).hexdigest()[:20]
            target = self.path / "images" / f"{sha}.png"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                store.atomic_write_bytes(target, data)
            sources.append(f"upload:{sha}")
        labels = [int(y) for y in labels]
        names = list(names or [])
        what = detail or (f"{len(images)} image{'s' if len(images) != 1 else ''} labelled "
                          + ", ".join(sorted({self.classes[y] for y in labels if 0 <= y < len(self.classes)})))
        if names:
            what += f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        return self._commit_rows(np.concatenate(keys), np.asarray(labels), sources, task, "add", what)

    def add_folder(self, folder: str | os.PathLike, label: int, task: int = 0) -> Version:
        """Every image file in `folder` (not recursive), labelled `label`."""
        from .images import decode_upload

        folder = Path(folder)
        if not folder.is_dir():
            raise CachevizError(f"there is no folder {folder}", "give a folder of image files", param="folder",
                                value=str(folder))
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        images, names, skipped = [], [], []
        for f in files:
            try:
                images.append(decode_upload(f.read_bytes(), f.name))
                names.append(f.name)
            except CachevizError:
                skipped.append(f.name)
        if not images:
            raise CachevizError(f"{folder} holds no readable image", "give a folder of PNG or JPEG files",
                                param="folder", value=str(folder))
        return self.add_images(images, [label] * len(images), names, task,
                               detail=f"{len(images)} images of {self.classes[label] if 0 <= label < len(self.classes) else label} "
                                      f"from {folder.name}" + (f" ({len(skipped)} unreadable skipped)" if skipped else ""))

    def remove(self, ids: Sequence[int], detail: str | None = None) -> Version:
        ids = np.unique(np.asarray(list(ids), np.int64))
        with self._edit_lock():
            self._load_versions()
            live = self.live_ids()
            gone = np.setdiff1d(ids, live)
            if len(gone):
                raise CachevizError(f"item {int(gone[0])} is not in the store's current version",
                                    "list the items with `store list --items`", param="ids", value=int(gone[0]))
            if not len(ids):
                raise CachevizError("nothing to remove", "name items or a class")
            h = self.head
            return self._write_version("remove", detail or f"{len(ids)} items", [], ids.tolist(), h.next_id,
                                       h.number, h.number, len(live) - len(ids))

    def remove_class(self, label: int) -> Version:
        if not 0 <= int(label) < len(self.classes):
            raise CachevizError(f"{label} is not a class of this store",
                                f"use 0 to {len(self.classes) - 1} ({', '.join(self.classes[:10])})",
                                param="label", value=label)
        live = self.live_ids()
        ids = live[self._labels[live] == int(label)]
        if not len(ids):
            raise CachevizError(f"the store holds no item of class {self.classes[label]} now", "undo the edit that removed them")
        return self.remove(ids, detail=f"class {self.classes[label]} ({len(ids)} items)")

    def undo(self) -> Version:
        """A new version equal to the one before the head's edit."""
        with self._edit_lock():
            self._load_versions()
            h = self.head
            if h is None or h.undo_target is None:
                raise CachevizError("there is no edit to undo", "edit the store first")
            target = self.version(h.undo_target)
            return self._write_version("undo", f"back to version {target.number} (undid: {h.op} {h.detail})", [], [],
                                       h.next_id, target.number, target.undo_target, len(self.live_ids(target.number)))

    # -- search ----------------------------------------------------------------------------

    def _faiss_index(self):
        import faiss

        with self._lock:
            n = len(self._keys)
            if self._index is None or (self._index_kind == "exact") != (n * self.dim <= EXACT_MAX_FLOATS):
                self._index_kind = "exact" if n * self.dim <= EXACT_MAX_FLOATS else "hnsw"
                self._index = (faiss.IndexFlatIP(self.dim) if self._index_kind == "exact"
                               else faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT))
                self._index_rows = 0
                if self._index_kind == "hnsw":
                    self._index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                    self._read_hnsw()
            if self._index_rows < n:  # rows are append-only: an edit only adds to the index
                fresh = self._index_rows == 0
                self._index.add(self._keys[self._index_rows:n])
                self._index_rows = n
                if fresh and self._index_kind == "hnsw":
                    self._write_hnsw()
            return self._index

    def _read_hnsw(self) -> None:
        """The HNSW graph saved by an earlier process (building it takes a minute for CIFAR-10's
        50,000 x 4,096 keys here); rows added since are added to it."""
        import faiss

        meta = store.load_json(self.path / "hnsw.json")
        f = self.path / "hnsw.faiss"
        if not meta or not f.exists() or meta.get("rows", 0) > len(self._keys) or meta.get("dim") != self.dim:
            return
        try:
            self._index = faiss.read_index(str(f))
            self._index_rows = int(meta["rows"])
        except RuntimeError:  # damaged: build again
            self._index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION

    def _write_hnsw(self) -> None:
        import faiss

        store.atomic_write_with(self.path / "hnsw.faiss", lambda tmp: faiss.write_index(self._index, tmp))
        store.atomic_write_json(self.path / "hnsw.json", {"rows": self._index_rows, "dim": self.dim})

    @property
    def index_kind(self) -> str:
        self._faiss_index()
        return self._index_kind

    def search(self, q: np.ndarray | torch.Tensor, k: int = DEFAULT_K, version: int | None = None,
               engine: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (N, k), of the k most similar live items of `version`; ids -1 pad."""
        import faiss

        q = np.ascontiguousarray(np.asarray(q.cpu() if isinstance(q, torch.Tensor) else q, np.float32))
        q = q[None] if q.ndim == 1 else q
        if q.shape[1] != self.dim:
            raise CachevizError(f"queries of width {q.shape[1]} do not fit this store's {self.dim}")
        if not isinstance(k, int) or k < 1:
            raise CachevizError("k counts retrieved items", "give a whole number from 1", param="k", value=k)
        live = self.live_ids(version)
        k_eff = min(k, len(live))
        if k_eff == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if engine == "db":
            return self._search_db(q, k, live)
        if engine != "faiss":
            raise CachevizError(f"unknown search engine {engine!r}", "use faiss or db", param="engine", value=engine)
        index = self._faiss_index()
        sel = None if len(live) == len(self._keys) else faiss.IDSelectorBatch(live)
        if self._index_kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k_eff))
            if sel is not None:
                params.sel = sel
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        with self._lock:  # FAISS indexes are not safe to search while another thread adds to them
            # One query runs on one thread: FAISS's OpenMP workers, left spinning after a search,
            # otherwise starve torch's own (a separate OpenMP runtime) in the next network pass:
            # measured here, upload -> top-k 600 ms with 2 FAISS threads, 7 ms with 1.
            faiss.omp_set_num_threads(1 if len(q) <= SMALL_BATCH else os.cpu_count() or 1)
            d, i = index.search(q, k_eff, params=params)
        if k_eff < k:
            d = np.pad(d, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, k - k_eff)), constant_values=-1)
        return d, i.astype(np.int64)

    def _search_db(self, q: np.ndarray, k: int, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The database's own search over the live set: rows past it, or dropped from it, filtered out."""
        n = self.head.next_id
        dead = np.setdiff1d(np.arange(n, dtype=np.int64), live, assume_unique=True)
        expr = f"id < {n}" + (f" and id not in [{','.join(map(str, dead.tolist()))}]" if len(dead) else "")
        coll = kdb.collection_name(self.meta)
        with kdb.db(self.path) as client:
            kdb.load(client, coll)
            res = client.search(coll, data=[r.tolist() for r in q], limit=min(k, len(live)), filter=expr,
                                search_params={"metric_type": "IP"}, output_fields=["id"])
        d = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for r, hits in enumerate(res):
            for j, h in enumerate(hits):
                ids[r, j], d[r, j] = int(h["id"]), float(h["distance"])
        return d, ids

    def p_mem(self, q, theta: float | None = None, k: int = DEFAULT_K, version: int | None = None) -> torch.Tensor:
        """p_mem (N, C) from the k most similar live items (softmax over their similarities)."""
        return self.p_mem_of(*self.search(q, k, version), theta)

    def p_mem_of(self, d: np.ndarray, ids: np.ndarray, theta: float | None = None) -> torch.Tensor:
        """p_mem (N, C) from a search's (similarities, ids); padding (id -1) carries no weight."""
        sims = torch.from_numpy(np.where(ids >= 0, d, -1e4).astype(np.float32))
        labels = torch.from_numpy(self._labels[np.clip(ids, 0, None)] if len(self._labels) else np.zeros_like(ids))
        p = p_mem_from_topk(sims, labels, self.theta if theta is None else theta, len(self.classes))
        empty = torch.from_numpy((ids < 0).all(1))
        p[empty] = 1.0 / len(self.classes)  # an empty store knows nothing: no class gets its vote
        return p

    def p_mem_exact(self, q, theta: float | None = None, version: int | None = None) -> torch.Tensor:
        """The full-softmax p_mem over every live item (the engine's torch path; small stores)."""
        live = self.live_ids(version)
        mem = CacheMemory(torch.from_numpy(self._keys[live]), torch.from_numpy(self._labels[live]), len(self.classes))
        q = torch.as_tensor(np.asarray(q, np.float32))
        return mem.p_mem(q[None] if q.ndim == 1 else q, self.theta if theta is None else theta).cpu()

    # -- what an edit changed --------------------------------------------------------------

    def test_items(self) -> dict[str, torch.Tensor]:
        got = store.load_tensors(self.path / "test.safetensors")
        if got is None:
            raise CachevizError("the store's test items are missing", "create the store again (`store create --name NEW`)")
        return got[0]

    def evaluate(self, version: int | None = None, k: int = DEFAULT_K) -> Evaluation:
        v = self.version(version).number
        got = self._evals.get((v, k))
        if got is None:
            t = self.test_items()
            p_net = t["p_net"].float()
            pred_net = p_net.argmax(1).numpy()
            d, ids = self.search(t["q"].numpy(), k, v)
            p_mem = self.p_mem_of(d, ids, self.theta)
            p_co = self.p_mem_of(d, ids, self.theta_cache_only)
            empty = (ids < 0).all(1)  # an empty store answers nothing from memory
            p_cache = (1 - self.lam) * p_net + self.lam * p_mem
            pred_co = np.where(empty, -1, p_co.argmax(1).numpy())
            got = Evaluation(v, t["y"].numpy(), pred_net, p_cache.argmax(1).numpy(), pred_co, t["test_idx"].numpy())
            self._evals[(v, k)] = got
        return got

    # -- reading items ---------------------------------------------------------------------

    def item(self, i: int) -> dict:
        return {"id": int(i), "label": int(self._labels[i]), "class": self.classes[int(self._labels[i])],
                "source": self._sources[i]}

    def image(self, i: int) -> np.ndarray:
        """The stored item's image: the training image it came from, or the uploaded PNG."""
        src = self._sources[i]
        kind, _, ref = src.partition(":")
        if kind == "train":
            return self.workspace().ds.train_x[int(ref)].numpy()
        if kind == "upload":
            from PIL import Image

            return np.asarray(Image.open(self.path / "images" / f"{ref}.png").convert("RGB"))
        raise CachevizError(f"item {i} has no image ({src})")

    def class_counts(self, version: int | None = None) -> np.ndarray:
        return np.bincount(self._labels[self.live_ids(version)], minlength=len(self.classes))

    def summary(self) -> list[dict]:
        return [{"version": v.number, "op": v.op, "detail": v.detail, "items": v.n_live, "parent": v.parent,
                 "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created))} for v in self.versions]


def _crash_point(where: str) -> None:
    """Tests kill an edit here (CACHEVIZ_TEST_CRASH=insert:<seconds>) to prove a dying edit loses nothing."""
    spec = os.environ.get("CACHEVIZ_TEST_CRASH", "")
    if spec.startswith(where + ":"):
        time.sleep(float(spec.split(":", 1)[1]))
    elif spec == where:
        raise RuntimeError(f"test crash at {where}")


def open_or_create(setup: Setup, data_dir, device="cpu", progress: Reporter | None = None) -> KnowledgeStore:
    path = stores_dir(data_dir) / store_name(setup)
    if (path / "meta.json").exists():
        return KnowledgeStore(path, Path(data_dir), device)
    return KnowledgeStore.create(setup, data_dir, device, progress=progress)


__all__ = ["KnowledgeStore", "Version", "Evaluation", "changed", "open_or_create", "store_name", "stores_dir",
           "DEFAULT_K"]
