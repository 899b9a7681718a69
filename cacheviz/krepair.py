"""Bring a damaged knowledge store back from the copies it keeps (`store repair`).

Nothing here deletes what a store committed: a damaged database is set aside (Milvus Lite) or
left on the server beside its replacement, and a version none of whose copies survives is
replaced only when the user accepts the loss, by a version equal to the one before it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import kdb, kversions, store
from .errors import CachevizError
from .kstore import FORMAT, INSERT_BATCH, NAME_RE, KnowledgeStore, list_stores, read_meta, stores_dir
from .kversions import MAIN, StoreDamaged, Version
from .progress import Reporter, Silent
def _segment_files(path: Path) -> dict[int, Path]:
    return {int(f.stem): f for f in (path / "segments").glob("*.safetensors") if f.stem.isdigit()}


def _segment_info(f: Path) -> dict:
    try:
        d = json.loads(f.with_suffix(".json").read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def repair(name_or_path: str | os.PathLike, data_dir: str | os.PathLike, accept_loss: bool = False,
           progress: Reporter | None = None) -> list[str]:
    """Bring a damaged store back from the copies it keeps; one sentence per thing done.

    meta.json and every manifest come back from their copies in journal/ (an add's manifest
    also from its key segment); head.json is rewritten from the manifests; a key segment from
    the database; the database from the key segments (the damaged one is kept aside, never
    deleted); a damaged search graph is dropped (it is rebuilt on use). A version none of whose
    copies survives is replaced — only with `accept_loss` — by a version equal to the one
    before it, so later edits never reuse its ids."""
    rep = progress or Silent()
    p = Path(name_or_path)
    if not p.is_dir() or not ((p / "meta.json").exists() or (p / kversions.JOURNAL / "meta.json").exists()):
        p = stores_dir(data_dir) / str(name_or_path)
    if not NAME_RE.fullmatch(p.name) or not p.is_dir():
        have = list_stores(data_dir)
        raise CachevizError(f"there is no knowledge store {str(name_or_path)!r}",
                            f"use one of {', '.join(have)}" if have else "create one with `store create`",
                            param="store", value=str(name_or_path))
    if not os.access(p, os.W_OK | os.X_OK):
        raise CachevizError(f"knowledge store {p.name} is in a read-only folder, so it cannot be repaired",
                            "copy it to a data directory you can write to")
    done: list[str] = []
    with kversions.dir_lock(p):
        rep.stage("check")
        # meta.json
        try:
            meta = read_meta(p)
        except StoreDamaged:
            if not kversions.restore_file(p / kversions.JOURNAL / "meta.json", p / "meta.json"):
                raise CachevizError(f"knowledge store {p.name}'s meta.json and its copy are both damaged",
                                    "create a new store with `store create --name NEW`") from None
            meta = read_meta(p)
            done.append("meta.json restored from its copy in journal/")
        try:
            kversions.unseal(p / kversions.JOURNAL / "meta.json")
        except (OSError, ValueError):
            if meta.get("format", 1) >= FORMAT:
                store.atomic_write_json(p / kversions.JOURNAL / "meta.json", kversions.seal(meta))
                done.append("meta.json's copy in journal/ written again")
        # manifests
        r = kversions.read(p)
        segs = _segment_files(p)
        lost = []
        for n in r.damaged:
            if kversions.restore(p, n):
                done.append(f"version {n}'s manifest restored from its copy in journal/")
                continue
            from_seg = None
            for f in segs.values():
                info = _segment_info(f)
                if info.get("version") == n and isinstance(info.get("manifest"), dict):
                    body = info["manifest"]
                    if kversions.digest({k: v for k, v in body.items() if k != "sha256"}) == body.get("sha256"):
                        from_seg = body
            if from_seg is not None:
                store.atomic_write_json(kversions.manifest_path(p, n, kversions.JOURNAL), from_seg)
                store.atomic_write_json(kversions.manifest_path(p, n), from_seg)
                done.append(f"version {n}'s manifest restored from its key segment")
                continue
            lost.append(n)
        if lost:
            if not accept_loss:
                raise CachevizError(
                    f"knowledge store {p.name}: the manifest of version {', '.join(map(str, lost))} and every copy of "
                    "it are gone", "run `store repair --accept-loss` to replace each with a version equal to the one "
                    "before it (no item is deleted)")
            for n in lost:
                r = kversions.read(p)
                prev = r.versions.get(n - 1)
                if prev is None:
                    raise CachevizError(f"version {n} cannot be replaced: the version before it is gone too",
                                        "create a new store with `store create --name NEW`")
                ends = [prev.next_id] + [first + len(_segment_info(f).get("sources", [])) for first, f in segs.items()
                         if _segment_info(f).get("version") == n]
                v = Version(n, prev.number, prev.undo_target, "repair",
                            f"version {n}'s manifest was lost; this version equals version {prev.number}", [], [],
                            max(ends), prev.n_live, time.time(), MAIN)
                body = kversions.seal(v.to_json())
                store.atomic_write_json(kversions.manifest_path(p, n, kversions.JOURNAL), body)
                store.atomic_write_json(kversions.manifest_path(p, n), body)
                done.append(f"version {n} was lost: replaced by a version equal to version {prev.number}")
        for f in (p / kversions.MANIFESTS).glob("*.json"):  # a good manifest whose copy is gone
            c = kversions.manifest_path(p, int(f.stem), kversions.JOURNAL) if f.stem.isdigit() else None
            if c is not None and not kversions.restore_file(c, c, check_only=True):
                try:
                    kversions.unseal(f)
                    store.atomic_write_bytes(c, f.read_bytes())
                except ValueError:
                    pass
        r = kversions.read(p)
        whole = r.latest is not None and all(n in r.versions for n in range(1, r.latest.number + 1))
        if r.problems and whole and all("manifest (" not in x for x in r.problems):
            kversions.write_head(p, r.latest)
            done.append(f"head.json written again (newest version {r.latest.number})")
            r = kversions.read(p)
        if r.problems:
            raise CachevizError(f"knowledge store {p.name} is still damaged: {r.problems[0]}",
                                "create a new store with `store create --name NEW`")
        versions = r.versions
        # key segments, from the database
        coll = kdb.collection_name(meta)
        ranges = sorted({(a, b, v.number) for v in versions.values() for a, b in v.added})
        for a, b, number in ranges:
            f = segs.get(a)
            if f is not None and store.load_tensors(f) is not None and _segment_info(f).get("sources") is not None:
                continue
            with kdb.db(p) as client:
                kdb.load(client, coll)
                rows = []
                for s in range(a, b, INSERT_BATCH):
                    rows += client.query(coll, filter=f"id >= {s} and id < {min(b, s + INSERT_BATCH)}",
                                         output_fields=["id", "key", "label", "source", "task"],
                                         consistency_level="Strong")
            rows.sort(key=lambda x: int(x["id"]))
            if [int(x["id"]) for x in rows] != list(range(a, b)):
                raise CachevizError(f"knowledge store {p.name}: the key segment of items {a} to {b - 1} is damaged and "
                                    "the database does not hold all of them", "create a new store with `store create "
                                                                              "--name NEW`")
            seg = p / "segments" / f"{a:012d}.safetensors"
            store.atomic_write_json(seg.with_suffix(".json"), {"sources": [x["source"] for x in rows], "version": number,
                                                               "task": int(rows[0]["task"]) if rows else 0})
            store.save_tensors(seg, {"keys": torch.tensor(np.asarray([x["key"] for x in rows], np.float32)),
                                     "labels": torch.tensor([int(x["label"]) for x in rows], dtype=torch.int64)},
                               {"kind": "store-segment", "first": a, "n": b - a})
            done.append(f"the key segment of items {a} to {b - 1} rebuilt from the database")
        # the database, from the key segments
        ks = None
        try:
            ks = KnowledgeStore.for_repair(p, Path(data_dir))
            ks.check_db()
        except StoreDamaged as exc:
            rep.stage("rebuild the database")
            what = _rebuild_db(ks, meta)
            done.append(f"the database rebuilt from the key segments ({exc.problem.split(': ', 1)[-1]}); {what}")
        # the search graph: derived, so dropped when damaged
        hj, hf = p / "hnsw.json", p / "hnsw.faiss"
        if hf.exists() or hj.exists():
            try:
                hm = kversions.unseal(hj)
                ok = hf.exists() and store.file_sha256(hf) == hm.get("file_sha256")
            except (OSError, ValueError):
                ok = False
            if not ok:
                hf.unlink(missing_ok=True)
                hj.unlink(missing_ok=True)
                done.append("the damaged search graph (hnsw.faiss) dropped; it is built again on the next search")
        if store.load_tensors(p / "test.safetensors") is None:
            done.append("test.safetensors (the test items edits are judged on) is damaged and cannot be rebuilt: "
                        "queries and edits work, but a new store (`store create --name NEW`) is needed to judge them")
    KnowledgeStore(p, Path(data_dir))  # opens clean, or says what is still wrong
    return done or ["nothing was wrong"]


def _rebuild_db(ks: "KnowledgeStore", meta: dict) -> str:
    """Every committed row again, from the key segments, into a fresh database or collection."""
    p = ks.path
    n = ks.head.next_id if ks.head else 0
    version_of = {}
    for v in ks.versions:
        for a, b in v.added:
            version_of[a] = v.number
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if kdb.is_server():
        coll = f"{kdb.collection_name(meta)[:180]}_r{stamp.replace('-', '_')}"
        new_meta = kversions.seal({**meta, "collection": coll})
        kept = f"the damaged collection {kdb.collection_name(meta)} is left on the server"
    else:
        coll = kdb.collection_name(meta)
        aside = p / f"items.db.damaged-{stamp}"
        if (p / "items.db").exists():
            os.replace(p / "items.db", aside)
        new_meta = None
        kept = f"the damaged one is kept as {aside.name}"
    with kdb.db(p) as client:
        kdb.make_collection(client, coll, ks.dim)
        for first, f in sorted(_segment_files(p).items()):
            if first >= n:
                continue
            info = _segment_info(f)
            keys, labels = ks._keys, ks._labels
            m = len(info.get("sources", []))
            for s in range(first, first + m, INSERT_BATCH):
                e = min(first + m, s + INSERT_BATCH)
                client.insert(coll, [{"id": i, "key": keys[i].tolist(), "label": int(labels[i]),
                                      "source": ks._sources[i][:kdb.SOURCE_LEN],
                                      "class_name": ks.classes[int(labels[i])][:kdb.NAME_LEN],
                                      "task": int(info.get("task", 0)), "version": int(info.get("version",
                                                                                                 version_of.get(first, 0)))}
                                     for i in range(s, e)])
        kdb.flush(client, coll)
    if new_meta is not None:
        store.atomic_write_json(p / kversions.JOURNAL / "meta.json", new_meta)
        store.atomic_write_json(p / "meta.json", new_meta)
    return kept


__all__ = ["repair"]
