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
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import kdb, kversions, store
from .cache import CacheMemory, p_mem_from_topk
from .config import Setup
from .data import balanced_subset
from .errors import CachevizError
from .kversions import MAIN, StoreDamaged, Version
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
    """One store per setup by default: the model's name and a hash of what determines the keys,
    the weights included when a checkpoint is named (another network's keys are another store)."""
    ident = setup.identity()
    if setup.checkpoint and Path(setup.checkpoint).is_file():
        ident = dict(ident, weights=store.file_sha256(setup.checkpoint))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{setup.dataset}-{setup.model}-{store.config_hash(ident)[:12]}")


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


class _Shared:
    """What every view (branch) of one store shares within a process: the key rows read from the
    segments, the versions, the search index and cached evaluations."""

    def __init__(self, dim: int):
        self.lock = threading.RLock()
        self.keys = np.zeros((0, dim), np.float32)
        self.labels = np.zeros(0, np.int64)
        self.sources: list[str] = []
        self.versions: dict[int, Version] = {}
        self.stamp = None  # head.json's (inode, size, mtime) when last read
        self.live: dict[int, np.ndarray] = {}
        self.evals: dict[tuple[int, int], Evaluation] = {}
        self.index = None
        self.index_rows = 0
        self.index_kind: str | None = None
        self.ws = None
        self.tests: tuple = (None, None)  # (test.safetensors' stamp, its checked tensors)


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
META_KEYS = ("name", "setup", "layers", "dim", "classes", "theta", "lam", "theta_cache_only", "weights")
FORMAT = 2  # 2: sealed meta and manifests, journal copies, head.json


def repair_hint(name: str) -> str:
    return f"repair it with `python -m cacheviz store repair --store {name}`"


class StoreUnfinished(CachevizError):
    """A store whose creation never committed (made before creates were atomic)."""


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_meta(path: Path) -> dict:
    """A store's meta.json, checked; CachevizError when there is none, StoreDamaged when it is damaged."""
    f = path / "meta.json"
    name = path.name
    try:
        raw = json.loads(f.read_bytes())
    except FileNotFoundError:
        raise CachevizError(f"there is no knowledge store at {name}", "create it with `store create`",
                            param="store", value=name) from None
    except (OSError, ValueError):
        raise StoreDamaged(f"knowledge store {name}'s meta.json is damaged (not readable JSON); nothing was changed",
                           repair_hint(name)) from None
    if not isinstance(raw, dict):
        raise StoreDamaged(f"knowledge store {name}'s meta.json is damaged; nothing was changed", repair_hint(name))
    if "sha256" in raw or raw.get("format", 1) >= FORMAT:
        try:
            raw = kversions.unseal(f)
        except ValueError as exc:
            raise StoreDamaged(f"knowledge store {name}'s meta.json cannot be trusted ({exc}); nothing was changed",
                               repair_hint(name)) from None
    missing = [k for k in META_KEYS if k not in raw]
    if missing:
        raise StoreDamaged(f"knowledge store {name}'s meta.json lacks {', '.join(missing)}; nothing was changed",
                           repair_hint(name))
    return raw


class KnowledgeStore:
    """A versioned store of cache items; see the module docstring. Open with `open` or `create`.

    `branch`: the line of versions this object reads and edits ("main", everyone's, by default;
    see `on_branch`)."""

    def __init__(self, path: Path, data_dir: Path, device: str | torch.device = "cpu", branch: str = MAIN,
                 expect_weights: str | None = None, _creating: bool = False):
        self.path = Path(path)
        self.data_dir = Path(data_dir)
        self.device = device
        self.branch = kversions.check_branch(branch)
        self.meta = meta = read_meta(self.path)
        self.name = meta["name"] if _creating else self.path.name
        self.setup = Setup(**meta["setup"])
        self.layers: list[str] = meta["layers"]
        self.classes: list[str] = meta["classes"]
        self.dim: int = meta["dim"]
        self.theta, self.lam, self.theta_cache_only = meta["theta"], meta["lam"], meta["theta_cache_only"]
        self._s = _Shared(self.dim)
        self._lock = self._s.lock
        self._creating = _creating
        if expect_weights is not None and expect_weights != meta["weights"]:
            raise self._weights_error(expect_weights)
        self._writable = os.access(self.path, os.W_OK | os.X_OK)
        if meta.get("format", 1) < FORMAT and self._writable:
            with self._edit_lock():
                self._upgrade()
        if self._writable:
            with self._edit_lock():
                self._sync(force=True)
                self._sweep()
                self.check_db()
        else:  # a read-only copy: readable as it is, never swept or edited
            self._sync(force=True)

    @classmethod
    def for_repair(cls, p: Path, data_dir: Path) -> "KnowledgeStore":
        """A store object over `p` without the open-time sweep and database check: `krepair`
        holds the lock and checks the database itself (`check_db`)."""
        ks = cls.__new__(cls)
        ks.path, ks.data_dir, ks.device, ks.branch = p, data_dir, "cpu", MAIN
        ks.meta = read_meta(p)
        ks.name = p.name
        ks.setup = Setup(**ks.meta["setup"])
        ks.layers, ks.classes, ks.dim = ks.meta["layers"], ks.meta["classes"], ks.meta["dim"]
        ks.theta, ks.lam, ks.theta_cache_only = ks.meta["theta"], ks.meta["lam"], ks.meta["theta_cache_only"]
        ks._s = _Shared(ks.dim)
        ks._lock = ks._s.lock
        ks._creating, ks._writable = False, True
        ks._sync(force=True)
        return ks

    # -- shared state, as the attributes the rest of the code reads ------------------------

    _keys = property(lambda self: self._s.keys)
    _labels = property(lambda self: self._s.labels)
    _sources = property(lambda self: self._s.sources)
    _index_rows = property(lambda self: self._s.index_rows)
    _index_kind = property(lambda self: self._s.index_kind)

    @property
    def _ws(self):
        return self._s.ws

    @_ws.setter
    def _ws(self, ws) -> None:
        self._s.ws = ws

    def on_branch(self, name: str) -> "KnowledgeStore":
        """A view of this store whose edits commit to branch `name` (a session's own line of
        versions, seen by nobody else until `publish`); it shares this object's loaded rows."""
        view = object.__new__(KnowledgeStore)
        view.__dict__.update(self.__dict__)
        view.branch = kversions.check_branch(name)
        return view

    # -- opening and creating --------------------------------------------------------------

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, data_dir: str | os.PathLike, device="cpu", branch: str = MAIN,
             expect_weights: str | None = None) -> "KnowledgeStore":
        p = Path(name_or_path)
        if not (p / "meta.json").exists():
            p = stores_dir(data_dir) / str(name_or_path)
        if not (p / "meta.json").exists() or not NAME_RE.fullmatch(p.name):
            have = list_stores(data_dir)
            raise CachevizError(f"there is no knowledge store {str(name_or_path)!r}",
                                f"use one of {', '.join(have)}" if have else "create one with `store create`",
                                param="store", value=str(name_or_path))
        return cls(p, Path(data_dir), device, branch=branch, expect_weights=expect_weights)

    @classmethod
    def create(cls, setup: Setup, data_dir: str | os.PathLike, device="cpu", name: str | None = None,
               progress: Reporter | None = None) -> "KnowledgeStore":
        """Version 1: the setup's cache items (training images, no flips), theta and lam tuned on
        the setup's validation part, and the held-out test items an edit is judged on.

        One commit: the store is built in a hidden folder beside the others and renamed into
        place only once its first version is committed, so a create that is killed, or fails on
        a full disk, leaves no store behind (its folder is swept by the next create)."""
        from .study import score_keys
        from .tuning import default_grid
        from .workspace import ExperimentData, prepare

        rep = progress or Silent()
        data_dir = Path(data_dir)
        name = store_name(setup) if name is None else check_name(name)
        root = stores_dir(data_dir)
        final = root / name
        sweep_unfinished(root)
        if final.exists():
            try:
                return cls(final, data_dir, device)
            except StoreUnfinished:  # never committed a version: nothing in it to keep
                shutil.rmtree(final)
            except CachevizError as exc:
                if (final / "meta.json").exists():
                    raise
                if any(final.iterdir()) and not (final / "test.safetensors").exists():
                    raise CachevizError(f"a folder named {name} that is not a store is in the way",
                                        "give the store another --name") from exc
                shutil.rmtree(final)  # a create from before creates were atomic, killed before its meta
        if kdb.is_server():  # a server that is down fails the create now, not after minutes of features
            with kdb.db(root):
                pass
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
        uid = secrets.token_hex(8)
        tmp = root / f".creating-{name}.{store.writer_tag()}.{uid}"
        tmp.mkdir(parents=True)
        coll = kdb.new_collection_name(name, uid)
        try:
            store.save_tensors(tmp / "test.safetensors",
                               {"q": q_test[pick].contiguous(), "p_net": data.p_test.float().cpu()[pick].contiguous(),
                                "y": y_test[pick].long(), "test_idx": test_idx[pick].long()}, {"kind": "store-test"})
            meta = kversions.seal({
                "kind": "knowledge-store", "name": name, "setup": setup.replace(flip=False).to_dict(),
                "layers": list(ws.layers), "dim": int(keys.shape[1]), "classes": list(ws.ds.classes),
                "dataset": setup.dataset, "net": ws.spec.name, "weights": ws.spec.weights_id,
                "theta": sc.theta, "lam": sc.lam, "theta_cache_only": sc.theta_cache_only,
                "exact_accuracy": sc.acc, "exact_cache_only_accuracy": sc.cache_only_acc,
                "format": FORMAT, "created": time.time(), "uid": uid, "collection": coll})
            store.atomic_write_json(tmp / kversions.JOURNAL / "meta.json", meta)
            store.atomic_write_json(tmp / "meta.json", meta)
            with kdb.db(tmp) as client:
                kdb.make_collection(client, coll, int(keys.shape[1]))
            ks = cls(tmp, data_dir, device, _creating=True)
            ks._s.ws = ws
            rep.stage("store")
            ks._commit_rows(keys.numpy(), labels.numpy(), [f"train:{int(i)}" for i in train_idx], task=0, op="create",
                            detail=f"{len(train_idx)} training images of {setup.dataset}", progress=rep)
            _crash_point("create")
            try:
                os.rename(tmp, final)  # the commit point of a create
            except OSError:  # another process created it meanwhile: theirs stands
                if not (final / "meta.json").exists():
                    raise
                _discard(tmp)
        except BaseException:
            _discard(tmp)
            raise
        ks = cls(final, data_dir, device)
        ks._s.ws = ws
        return ks

    def _weights_error(self, sha: str) -> CachevizError:
        return CachevizError(
            f"knowledge store {self.name} was built from other weights (SHA-256 {self.meta['weights'][:12]}…) than "
            f"these ({sha[:12]}…); its keys would mix two networks",
            "create a store for these weights with `python -m cacheviz store create … --name NEW`",
            "or put back the checkpoint the store was built from", param="checkpoint")

    # -- versions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _edit_lock(self) -> Iterator[None]:
        """One editor at a time, across threads and processes (sessions, app servers, the CLI)."""
        if not self._writable:
            raise CachevizError(f"knowledge store {self.name} is in a read-only folder, so it cannot be edited",
                                "copy it to a data directory you can write to")
        with self._lock:
            with kversions.dir_lock(self.path):
                yield

    def _damaged(self, problems: list[str]) -> StoreDamaged:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return StoreDamaged(f"knowledge store {self.name} is damaged: {problems[0]}{more}; nothing was changed",
                            repair_hint(self.name))

    def _sync(self, force: bool = False) -> None:
        """Take in what other objects, sessions or processes committed since this one last looked
        (versions and their key rows); checks every manifest it reads."""
        stamp = _stamp(self.path / kversions.HEAD)
        s = self._s
        if not force and stamp == s.stamp and stamp is not None:
            return
        with s.lock:
            # forced (on open): every manifest checked again; else only what others added since
            r = kversions.read(self.path, known=None if force else s.versions)
            problems = r.problems
            if self._creating or (not r.versions and not r.journal_only and r.head is None
                                  and not (self.path / kversions.MANIFESTS).exists()):
                if not self._creating:
                    raise StoreUnfinished(f"knowledge store {self.name} was never finished (its creation was "
                                          "interrupted)", "create it again with `store create`", param="store",
                                          value=self.name)
                problems = [p for p in problems if kversions.HEAD not in p]
            if problems:
                raise self._damaged(problems)
            latest = r.latest
            if latest is not None and r.head is not None and int(r.head["number"]) < latest.number and self._writable:
                kversions.write_head(self.path, latest)  # committed, then killed before head.json: roll forward
                stamp = _stamp(self.path / kversions.HEAD)
            s.versions = r.versions
            self._load_segments(latest.next_id if latest else 0)
            s.stamp = stamp

    def _latest(self) -> Version | None:
        vs = self._s.versions
        return vs[max(vs)] if vs else None

    def _branch_head(self, branch: str) -> Version | None:
        vs = self._s.versions
        own = [n for n, v in vs.items() if v.branch == branch]
        if own:
            return vs[max(own)]
        main = [n for n, v in vs.items() if v.branch == MAIN]
        return vs[max(main)] if main else None

    @property
    def versions(self) -> list[Version]:
        """The versions this branch can see: everyone's (main) and its own, oldest first."""
        self._sync()
        return [v for n, v in sorted(self._s.versions.items()) if v.branch in (MAIN, self.branch)]

    @property
    def head(self) -> Version | None:
        self._sync()
        return self._branch_head(self.branch)

    def branches(self) -> dict[str, Version]:
        """The head of every branch but main (sessions' own lines)."""
        self._sync()
        names = {v.branch for v in self._s.versions.values()} - {MAIN}
        return {b: self._branch_head(b) for b in sorted(names)}

    def version(self, number: int | None = None) -> Version:
        if number is None:
            h = self.head
            if h is None:
                raise CachevizError("this store has no version yet", "create it again with `store create`")
            return h
        self._sync()
        v = self._s.versions.get(int(number)) if isinstance(number, (int, np.integer)) else None
        if v is None or v.branch not in (MAIN, self.branch):
            top = self.head.number if self.head else 0
            raise CachevizError(f"there is no version {number}", f"choose one of {self.summary_numbers()}"
                                if top else "create the store first", param="version", value=number)
        return v

    def summary_numbers(self) -> str:
        ns = [v.number for v in self.versions]
        return ", ".join(map(str, ns)) if len(ns) <= 8 else f"{ns[0]} to {ns[-1]}"

    def live_ids(self, number: int | None = None) -> np.ndarray:
        """Sorted ids of the items version `number` (default: this branch's head) holds."""
        return self._live(self.version(number).number)

    def _live(self, number: int) -> np.ndarray:
        """`live_ids` of any branch's version (edits read other branches' live sets)."""
        s = self._s
        with s.lock:
            chain, n = [], number
            while n is not None and n not in s.live:  # iterative: a class may make thousands of versions
                chain.append(s.versions[n])
                n = s.versions[n].parent
            got = s.live[n] if n is not None else np.zeros(0, np.int64)
            for w in reversed(chain):
                add = [np.arange(a, b, dtype=np.int64) for a, b in w.added]
                got = np.union1d(got, np.concatenate(add)) if add else got
                if w.removed:
                    got = np.setdiff1d(got, np.asarray(w.removed, np.int64), assume_unique=True)
                s.live[w.number] = got
            return got

    def _upgrade(self) -> None:
        """Seal a store made before manifests carried checksums (once, in place, nothing dropped)."""
        r = kversions.read(self.path, legacy=True)
        if r.problems:
            raise self._damaged(r.problems)
        if not r.versions:
            raise StoreUnfinished(f"knowledge store {self.name} was never finished (its creation was interrupted)",
                                  "create it again with `store create`", param="store", value=self.name)
        for n in sorted(r.versions):
            kversions.write(self.path, r.versions[n])
        meta = dict(self.meta, format=FORMAT, collection=kdb.collection_name(self.meta), uid=secrets.token_hex(8))
        meta = kversions.seal(meta)
        store.atomic_write_json(self.path / kversions.JOURNAL / "meta.json", meta)
        store.atomic_write_json(self.path / "meta.json", meta)
        self.meta = {k: v for k, v in meta.items() if k != "sha256"}

    def _sweep(self) -> None:
        """Remove what an edit that died before its commit left behind. Runs only on a history
        that read back whole (`_sync` raised otherwise), so nothing a committed manifest names,
        nor anything a damaged one might, is ever touched: every id at or past the newest
        committed version's `next_id` belongs to an edit that never committed."""
        latest = self._latest()
        next_id = latest.next_id if latest else 0
        top = latest.number if latest else 0
        segs = self.path / "segments"
        orphans = [f for f in segs.glob("*.safetensors") if f.stem.isdigit() and int(f.stem) >= next_id]
        orphans += [f.with_suffix(".safetensors") for f in segs.glob("*.json")
                    if f.stem.isdigit() and int(f.stem) >= next_id and not f.with_suffix(".safetensors").exists()]
        if orphans:
            with kdb.db(self.path) as client:
                coll = kdb.collection_name(self.meta)
                kdb.load(client, coll)
                client.delete(coll, filter=f"id >= {next_id}")
            for f in orphans:
                f.unlink(missing_ok=True)
                f.with_suffix(".json").unlink(missing_ok=True)
        for f in (self.path / kversions.JOURNAL).glob("*.json"):
            if f.stem.isdigit() and int(f.stem) > top:  # copied, never committed
                f.unlink(missing_ok=True)
        keep = {src.partition(":")[2] for src in self._s.sources if src.startswith("upload:")}
        for f in (self.path / "images").glob("*.png"):  # written by edits that never committed
            if f.stem not in keep:
                f.unlink(missing_ok=True)
        for folder in (self.path, segs, self.path / kversions.MANIFESTS, self.path / kversions.JOURNAL,
                       self.path / "images"):
            if folder.is_dir():
                store.sweep_stale_temps(folder, force=True)

    def check_db(self) -> None:
        """The database against the manifests: as many rows as ids were committed, and a sample
        of keys equal to the segments'. A mismatch is an error that offers the repair."""
        latest = self._latest()
        n = latest.next_id if latest else 0
        coll = kdb.collection_name(self.meta)
        try:
            with kdb.db(self.path) as client:
                kdb.load(client, coll)
                have = kdb.count_rows(client, coll, n)
                probe = sorted({0, n // 3, n // 2, n - 1} & set(range(n)))
                rows = client.query(coll, filter=f"id in [{','.join(map(str, probe))}]",
                                    output_fields=["id", "key", "label"], consistency_level="Strong") if probe else []
        except CachevizError:
            if kdb.is_server():
                raise  # the server's own sentence (down, refused): not damage to this store
            have, rows = None, []
        except Exception as exc:  # Milvus Lite's files unreadable: damage, with the repair offered
            if kdb.is_server():
                raise
            raise StoreDamaged(f"knowledge store {self.name}'s database (items.db) cannot be read "
                               f"({type(exc).__name__}); nothing was changed", repair_hint(self.name)) from None
        if have is None:
            raise StoreDamaged(f"knowledge store {self.name}'s database (items.db) cannot be opened; nothing was changed",
                               repair_hint(self.name))
        if have != n:
            raise StoreDamaged(f"knowledge store {self.name}'s database holds {have:,} of the {n:,} rows its versions "
                               "name; nothing was changed", repair_hint(self.name) + " (it rebuilds the database from "
                                                                                     "the key segments)")
        got = {int(r["id"]): r for r in rows}
        for i in probe:
            r = got.get(i)
            if (r is None or int(r["label"]) != int(self._s.labels[i])
                    or not np.allclose(np.asarray(r["key"], np.float32), self._s.keys[i], atol=1e-5)):
                raise StoreDamaged(f"knowledge store {self.name}'s database disagrees with its key segments at item {i}; "
                                   "nothing was changed", repair_hint(self.name) + " (it rebuilds the database from "
                                                                                   "the key segments)")

    def _new_version(self, op: str, detail: str, parent: int | None, undo_target: int | None, added=(), removed=(),
                     n_live: int = 0, branch: str | None = None) -> Version:
        latest = self._latest()
        end = max([latest.next_id if latest else 0, *(b for _, b in added)])
        return Version((latest.number + 1) if latest else 1, parent, undo_target, op, detail,
                       [list(map(int, r)) for r in added], [int(i) for i in removed], int(end), int(n_live),
                       time.time(), branch or self.branch)

    def _commit(self, v: Version) -> Version:
        kversions.write(self.path, v)
        self._sync()  # head.json changed: takes in `v` and its segment
        return v

    @contextlib.contextmanager
    def _editing(self) -> Iterator[None]:
        """An edit: the lock, then everything others committed (keys included), then the checks
        that must pass before anything is written."""
        with self._edit_lock():
            self._sync()
            self.test_items()  # a damaged test file fails here, not after the commit (a retry would add twice)
            yield

    # -- rows ------------------------------------------------------------------------------

    def refresh(self) -> "KnowledgeStore":
        """Take in versions another session or process committed since this object last looked."""
        self._sync()
        return self

    def _load_segments(self, next_id: int) -> None:
        s = self._s
        start = len(s.keys)
        if next_id < start:
            raise self._damaged([f"its newest version names {next_id:,} items, fewer than the {start:,} already read"])
        if next_id == start:
            return
        keys, labels, sources = [s.keys], [s.labels], list(s.sources)
        at = start
        segs = {int(f.stem): f for f in (self.path / "segments").glob("*.safetensors") if f.stem.isdigit()}
        while at < next_id:
            f = segs.get(at)
            got = store.load_tensors(f) if f is not None else None
            try:
                srcs = json.loads(f.with_suffix(".json").read_text())["sources"] if got is not None else None
            except (OSError, ValueError, KeyError):
                srcs = None
            if got is None or srcs is None or len(srcs) != len(got[0]["keys"]):
                what = "missing" if f is None else "damaged"
                raise self._damaged([f"the key segment of item {at} (segments/{at:012d}.*) is {what}"])
            keys.append(got[0]["keys"].numpy())
            labels.append(got[0]["labels"].numpy())
            sources += srcs
            at += len(got[0]["keys"])
        if at != next_id:
            raise self._damaged([f"its key segments hold {at:,} rows but its versions name {next_id:,}"])
        s.keys, s.labels, s.sources = np.concatenate(keys), np.concatenate(labels), sources

    def _commit_rows(self, keys: np.ndarray, labels: np.ndarray, sources: list[str], task: int, op: str, detail: str,
                     progress: Reporter | None = None, blobs: dict[str, bytes] | None = None) -> Version:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        labels = np.asarray(labels, np.int64)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise CachevizError(f"keys of width {keys.shape[-1]} do not fit this store's {self.dim}")
        bad = labels[(labels < 0) | (labels >= len(self.classes))]
        if len(bad):
            raise CachevizError(f"label {int(bad[0])} is not a class of this store",
                                f"use 0 to {len(self.classes) - 1} ({', '.join(self.classes[:10])})",
                                param="label", value=int(bad[0]))
        with self._editing():
            latest, head = self._latest(), self._branch_head(self.branch)
            first = latest.next_id if latest else 0
            n = len(keys)
            n_live = (len(self._live(head.number)) if head else 0) + n
            v = self._new_version(op, detail, head.number if head else None, head.number if head else None,
                                  added=[[first, first + n]], n_live=n_live)
            for sha, data in (blobs or {}).items():  # under the lock: a sweep never meets them half-committed
                target = self.path / "images" / f"{sha}.png"
                if not target.exists():
                    store.atomic_write_bytes(target, data)
            seg = self.path / "segments" / f"{first:012d}.safetensors"
            store.atomic_write_json(seg.with_suffix(".json"), {"sources": sources, "version": v.number, "task": int(task),
                                                               "manifest": kversions.seal(v.to_json())})
            store.save_tensors(seg, {"keys": torch.from_numpy(keys), "labels": torch.from_numpy(labels)},
                               {"kind": "store-segment", "first": first, "n": n})
            coll = kdb.collection_name(self.meta)
            with kdb.db(self.path) as client:
                kdb.load(client, coll)
                for s in range(0, n, INSERT_BATCH):
                    e = min(n, s + INSERT_BATCH)
                    client.insert(coll, [{"id": first + i, "key": keys[i].tolist(), "label": int(labels[i]),
                                          "source": sources[i][:kdb.SOURCE_LEN],
                                          "class_name": self.classes[labels[i]][:kdb.NAME_LEN],
                                          "task": int(task), "version": v.number} for i in range(s, e)])
                    _crash_point("insert")
                    if progress:
                        progress.step(e, n, "rows")
                kdb.flush(client, coll)  # retried while a restarted server's data node re-registers
            _crash_point("commit")
            return self._commit(v)

    # -- edits -----------------------------------------------------------------------------

    def workspace(self):
        """The store's network and data. Its weights must be the ones the store's keys came from:
        a checkpoint replaced in place would make new keys that do not match the stored ones."""
        if self._s.ws is None:
            from .workspace import prepare

            ws = prepare(self.setup, self.data_dir, self.device)
            if ws.spec.weights_id != self.meta["weights"]:
                raise self._weights_error(ws.spec.weights_id)
            self._s.ws = ws
        return self._s.ws

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
        labels = [int(y) for y in labels]
        bad = [y for y in labels if not 0 <= y < len(self.classes)]
        if bad:  # before the network runs on every image
            raise CachevizError(f"label {bad[0]} is not a class of this store",
                                f"use 0 to {len(self.classes) - 1} ({', '.join(self.classes[:10])})",
                                param="label", value=bad[0])
        keys = []
        for img in images:  # one at a time: uploads differ in size
            keys.append(self.keys_of(img)[0].float().cpu().numpy())
        sources, blobs = [], {}
        for img in images:
            buf = io.BytesIO()
            arr = np.asarray(img, np.uint8)
            Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(buf, format="PNG")
            data = buf.getvalue()
            sha = hashlib.sha256(data).hexdigest()[:20]
            blobs[sha] = data
            sources.append(f"upload:{sha}")
        names = list(names or [])
        what = detail or (f"{len(images)} image{'s' if len(images) != 1 else ''} labelled "
                          + ", ".join(sorted({self.classes[y] for y in labels})))
        if names:
            what += f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        return self._commit_rows(np.concatenate(keys), np.asarray(labels), sources, task, "add", what, blobs=blobs)

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

    def _remove_locked(self, ids: np.ndarray, detail: str) -> Version:
        h = self._branch_head(self.branch)
        live = self._live(h.number)
        gone = np.setdiff1d(ids, live)
        if len(gone):
            raise CachevizError(f"item {int(gone[0])} is not in the store's current version",
                                "list the items with `store list --items`", param="ids", value=int(gone[0]))
        if not len(ids):
            raise CachevizError("nothing to remove", "name items or a class")
        return self._commit(self._new_version("remove", detail, h.number, h.number, removed=ids.tolist(),
                                              n_live=len(live) - len(ids)))

    def remove(self, ids: Sequence[int], detail: str | None = None) -> Version:
        ids = np.unique(np.asarray(list(ids), np.int64))
        with self._editing():
            return self._remove_locked(ids, detail or f"{len(ids)} items")

    def remove_class(self, label: int) -> Version:
        if not 0 <= int(label) < len(self.classes):
            raise CachevizError(f"{label} is not a class of this store",
                                f"use 0 to {len(self.classes) - 1} ({', '.join(self.classes[:10])})",
                                param="label", value=label)
        with self._editing():  # the class's items as of the newest commit, not as this object last saw them
            live = self.live_ids()
            ids = live[self._s.labels[live] == int(label)]
            if not len(ids):
                raise CachevizError(f"the store holds no item of class {self.classes[label]} now",
                                    "undo the edit that removed them")
            return self._remove_locked(ids, f"class {self.classes[label]} ({len(ids)} items)")

    def undo(self) -> Version:
        """A new version equal to the one before the head's edit."""
        with self._editing():
            h = self._branch_head(self.branch)
            if h is None or h.undo_target is None:
                raise CachevizError("there is no edit to undo", "edit the store first")
            target = self._s.versions[h.undo_target]
            return self._commit(self._new_version("undo", f"back to version {target.number} (undid: {h.op} {h.detail})",
                                                  target.number, target.undo_target,
                                                  n_live=len(self._live(target.number))))

    def publish(self, branch: str) -> Version:
        """Make branch `branch`'s head everyone's: a new main version with its live set."""
        kversions.check_branch(branch)
        with self._editing():
            bh, main = self._branch_head(branch), self._branch_head(MAIN)
            if bh is None or bh.branch != branch:
                raise CachevizError(f"branch {branch} has no edit to publish", "edit on that branch first",
                                    param="branch", value=branch)
            return self._commit(self._new_version("publish", f"{branch}: {bh.op} {bh.detail}", bh.number,
                                                  main.number if main else None,
                                                  n_live=len(self._live(bh.number)), branch=MAIN))

    def reset_branch(self, branch: str | None = None) -> Version:
        """Branch `branch` (default: this view's) back to main's head: one more version on it."""
        branch = kversions.check_branch(branch or self.branch)
        if branch == MAIN:
            raise CachevizError("main is everyone's store; it has nothing to go back to", "undo an edit instead")
        with self._editing():
            bh, main = self._branch_head(branch), self._branch_head(MAIN)
            return self._commit(self._new_version("reset", f"back to everyone's version {main.number}", main.number,
                                                  bh.number if bh else None, n_live=len(self._live(main.number)),
                                                  branch=branch))

    # -- search ----------------------------------------------------------------------------

    def _faiss_index(self):
        import faiss

        s = self._s
        with s.lock:
            self._sync()
            n = len(s.keys)
            if s.index is None or (s.index_kind == "exact") != (n * self.dim <= EXACT_MAX_FLOATS):
                s.index_kind = "exact" if n * self.dim <= EXACT_MAX_FLOATS else "hnsw"
                s.index = (faiss.IndexFlatIP(self.dim) if s.index_kind == "exact"
                           else faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT))
                s.index_rows = 0
                if s.index_kind == "hnsw":
                    s.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                    self._read_hnsw()
            if s.index_rows < n:  # rows are append-only: an edit only adds to the index
                fresh = s.index_rows == 0
                s.index.add(s.keys[s.index_rows:n])
                s.index_rows = n
                if fresh and s.index_kind == "hnsw" and self._writable:
                    self._write_hnsw()
            return s.index

    def _read_hnsw(self) -> None:
        """The HNSW graph saved by an earlier process (building it takes a minute for CIFAR-10's
        50,000 x 4,096 keys here), if its checksum holds; rows added since are added to it."""
        import faiss

        s = self._s
        f = self.path / "hnsw.faiss"
        try:
            meta = kversions.unseal(self.path / "hnsw.json")
        except (OSError, ValueError):
            return
        if not f.exists() or meta.get("rows", 0) > len(s.keys) or meta.get("dim") != self.dim:
            return
        if store.file_sha256(f) != meta.get("file_sha256"):
            warnings.warn("hnsw.faiss is damaged (its checksum does not match); the search graph is built again.",
                          stacklevel=3)
            return
        try:
            s.index = faiss.read_index(str(f))
            s.index_rows = int(meta["rows"])
        except RuntimeError:
            s.index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            s.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION

    def _write_hnsw(self) -> None:
        import faiss

        s = self._s
        f = self.path / "hnsw.faiss"
        store.atomic_write_with(f, lambda tmp: faiss.write_index(s.index, tmp))
        store.atomic_write_json(self.path / "hnsw.json", kversions.seal(
            {"rows": s.index_rows, "dim": self.dim, "file_sha256": store.file_sha256(f)}))

    @property
    def index_kind(self) -> str:
        self._faiss_index()
        return self._s.index_kind

    def search(self, q: np.ndarray | torch.Tensor, k: int = DEFAULT_K, version: int | None = None,
               engine: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (N, k), of the k most similar live items of `version`; ids -1 pad."""
        import faiss

        q = np.ascontiguousarray(np.asarray(q.cpu() if isinstance(q, torch.Tensor) else q, np.float32))
        q = q[None] if q.ndim == 1 else q
        if q.shape[1] != self.dim:
            raise CachevizError(f"queries of width {q.shape[1]} do not fit this store's {self.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CachevizError("k counts retrieved items", "give a whole number from 1", param="k", value=k)
        k = int(k)
        index = self._faiss_index()  # first: it takes in others' commits, so `live` and the rows agree
        live = self.live_ids(version)
        k_eff = min(k, len(live))
        if k_eff == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if engine == "db":
            return self._search_db(q, k, live)
        if engine != "faiss":
            raise CachevizError(f"unknown search engine {engine!r}", "use faiss or db", param="engine", value=engine)
        s = self._s
        with s.lock:  # FAISS indexes are not safe to search while another thread adds to them
            sel = None if len(live) == s.index_rows else faiss.IDSelectorBatch(live)
            if s.index_kind == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k_eff))
                if sel is not None:
                    params.sel = sel
            else:
                params = faiss.SearchParameters(sel=sel) if sel is not None else None
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
        n = self._latest().next_id
        dead = np.setdiff1d(np.arange(n, dtype=np.int64), live, assume_unique=True)
        expr = f"id < {n}" + (f" and id not in [{','.join(map(str, dead.tolist()))}]" if len(dead) else "")
        coll = kdb.collection_name(self.meta)
        with kdb.db(self.path) as client:
            kdb.load(client, coll)
            res = client.search(coll, data=[r.tolist() for r in q], limit=min(k, len(live)), filter=expr,
                                search_params={"metric_type": "IP"}, output_fields=["id"],
                                consistency_level="Strong")  # rows another process just wrote
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
        labels_all = self._s.labels
        sims = torch.from_numpy(np.where(ids >= 0, d, -1e4).astype(np.float32))
        labels = torch.from_numpy(labels_all[np.clip(ids, 0, None)] if len(labels_all) else np.zeros_like(ids))
        p = p_mem_from_topk(sims, labels, self.theta if theta is None else theta, len(self.classes))
        empty = torch.from_numpy((ids < 0).all(1))
        p[empty] = 1.0 / len(self.classes)  # an empty store knows nothing: no class gets its vote
        return p

    def p_mem_exact(self, q, theta: float | None = None, version: int | None = None) -> torch.Tensor:
        """The full-softmax p_mem over every live item (the engine's torch path; small stores)."""
        live = self.live_ids(version)
        mem = CacheMemory(torch.from_numpy(self._s.keys[live]), torch.from_numpy(self._s.labels[live]),
                          len(self.classes))
        q = torch.as_tensor(np.asarray(q, np.float32))
        return mem.p_mem(q[None] if q.ndim == 1 else q, self.theta if theta is None else theta).cpu()

    # -- what an edit changed --------------------------------------------------------------

    def test_items(self) -> dict[str, torch.Tensor]:
        f = self.path / "test.safetensors"
        stamp = _stamp(f)
        if stamp is not None and self._s.tests[0] == stamp:
            return self._s.tests[1]  # read and checked once while the file stays the same
        with warnings.catch_warnings():  # the sentence below says what to do; load_tensors' "rebuilt" would not hold
            warnings.simplefilter("ignore")
            got = store.load_tensors(f)
        if got is None:
            raise StoreDamaged(f"knowledge store {self.name}'s test items (test.safetensors) are "
                               f"{'missing' if not f.exists() else 'damaged'}; nothing was changed",
                               "create a new store with `store create --name NEW`")
        self._s.tests = (stamp, got[0])
        return got[0]

    def evaluate(self, version: int | None = None, k: int = DEFAULT_K) -> Evaluation:
        v = self.version(version).number
        got = self._s.evals.get((v, k))
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
            self._s.evals[(v, k)] = got
        return got

    # -- reading items ---------------------------------------------------------------------

    def item(self, i: int) -> dict:
        labels = self._s.labels
        return {"id": int(i), "label": int(labels[i]), "class": self.classes[int(labels[i])],
                "source": self._s.sources[i]}

    def image(self, i: int) -> np.ndarray:
        """The stored item's image: the training image it came from, or the uploaded PNG."""
        src = self._s.sources[i]
        kind, _, ref = src.partition(":")
        if kind == "train":
            return self.workspace().ds.train_x[int(ref)].numpy()
        if kind == "upload":
            from PIL import Image

            try:
                return np.asarray(Image.open(self.path / "images" / f"{ref}.png").convert("RGB"))
            except (OSError, ValueError):
                raise CachevizError(f"item {i}'s image (images/{ref}.png) is missing or damaged",
                                    "its key is intact; only its picture is lost") from None
        raise CachevizError(f"item {i} has no image ({src})")

    def class_counts(self, version: int | None = None) -> np.ndarray:
        return np.bincount(self._s.labels[self.live_ids(version)], minlength=len(self.classes))

    def summary(self) -> list[dict]:
        return [{"version": v.number, "op": v.op, "detail": v.detail, "items": v.n_live, "parent": v.parent,
                 "branch": v.branch,
                 "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created))} for v in self.versions]


# ---------------------------------------------------------------------------------------------
# Names, unfinished creates, repair


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise CachevizError("a store's name starts with a letter or digit and uses letters, digits, '.', '_' and '-'",
                            param="store", value=name)
    return name


def list_stores(data_dir) -> list[str]:
    return sorted(d.name for d in stores_dir(data_dir).glob("*")
                  if NAME_RE.fullmatch(d.name) and (d / "meta.json").exists())


def _discard(folder: Path) -> None:
    """Remove a create's hidden folder, and its collection on a server (never committed)."""
    if kdb.is_server():
        try:
            meta = read_meta(folder)
            with kdb.db(folder) as client:
                if client.has_collection(meta["collection"]):
                    client.drop_collection(meta["collection"])
        except Exception:  # noqa: BLE001 - best effort: an unreachable server keeps an unused collection
            pass
    shutil.rmtree(folder, ignore_errors=True)


def sweep_unfinished(root: Path) -> list[str]:
    """The hidden folders of creates whose process is gone (killed, or the disk filled)."""
    gone = []
    for d in Path(root).glob(".creating-*"):
        parts = d.name.split(".")
        if len(parts) >= 3 and store.writer_gone(parts[-2]):
            _discard(d)
            gone.append(d.name)
    return gone



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


__all__ = ["KnowledgeStore", "Version", "StoreDamaged", "StoreUnfinished", "list_stores", "check_name", "read_meta", "NAME_RE", "FORMAT", "INSERT_BATCH", "Evaluation", "changed", "open_or_create", "store_name", "stores_dir",
           "DEFAULT_K"]
