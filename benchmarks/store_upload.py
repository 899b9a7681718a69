"""Issue 11's interactive goal: one upload -> top-k neighbours over the full CIFAR-10 store.

    python benchmarks/store_upload.py --data-dir DATA [--layers layer3.2] [--n 200] [--out X.json]

Creates (or opens) the knowledge store of CIFAR-10 / ResNet20 with the given key layers (all
50,000 training images), then for N test images, one at a time, times what the app does for an
upload: decode the PNG bytes, one network pass for the key and p_net, the top-k search over the
live set (FAISS; HNSW above `kstore.EXACT_MAX_FLOATS`), p_mem from the top k. Reports p50/p95 of
the whole and of the search alone, recall@10 of the search against exact inner-product search
over the same keys, the store's accuracy (cache model, cache-only) at k = 10, and the time to
create the store. Goal: <= 50 ms p95 and recall@10 >= 0.95 on this machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--layers", default="layer3.2")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/store-upload.json")
    args = ap.parse_args()

    import faiss
    from PIL import Image

    from cacheviz import kstore
    from cacheviz.config import Setup
    from cacheviz.images import decode_upload

    setup = Setup(dataset="cifar10", model="resnet20", layers=tuple(args.layers.split(",")))
    t0 = time.perf_counter()
    existed = (kstore.stores_dir(args.data_dir) / kstore.store_name(setup) / "meta.json").exists()
    ks = kstore.open_or_create(setup, args.data_dir, "cpu")
    t_create = time.perf_counter() - t0
    t0 = time.perf_counter()
    kind = ks.index_kind  # builds the FAISS index from the key segments
    t_index = time.perf_counter() - t0
    ws = ks.workspace()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ws.ds.test_x), args.n, replace=False)
    pngs = []
    for i in pick:
        buf = io.BytesIO()
        Image.fromarray(ws.ds.test_x[int(i)].numpy()).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    ks.p_mem(ks.keys_of(decode_upload(pngs[0]))[0].numpy())  # warm-up
    total, search, found, qs = [], [], [], []
    for data in pngs:
        t0 = time.perf_counter()
        img = decode_upload(data, "upload.png")
        q, p_net = ks.keys_of(img)
        qn = q.numpy()
        t1 = time.perf_counter()
        d, ids = ks.search(qn, kstore.DEFAULT_K)
        t2 = time.perf_counter()
        p_mem = ks.p_mem_of(d, ids)
        _ = (1 - ks.lam) * p_net.cpu() + ks.lam * p_mem
        total.append(1e3 * (time.perf_counter() - t0))
        search.append(1e3 * (t2 - t1))
        found.append(ids[0])
        qs.append(qn[0])
    flat = faiss.IndexFlatIP(ks.dim)
    flat.add(ks._keys[ks.live_ids()])
    live = ks.live_ids()
    truth = live[flat.search(np.stack(qs), 10)[1]]
    recall = float(np.mean([len(set(f[:10]) & set(t)) / 10 for f, t in zip(found, truth)]))
    ev = ks.evaluate()
    row = {
        "store": ks.path.name, "layers": ks.layers, "dim": ks.dim, "items": int(ks.head.n_live), "index": kind,
        "k": kstore.DEFAULT_K, "hnsw_ef_search": kstore.HNSW_EF_SEARCH, "queries": args.n,
        "upload_to_topk_ms_p50": float(np.percentile(total, 50)), "upload_to_topk_ms_p95": float(np.percentile(total, 95)),
        "search_ms_p50": float(np.percentile(search, 50)), "search_ms_p95": float(np.percentile(search, 95)),
        "recall_at_10": recall, "cache_accuracy": float((ev.pred_cache == ev.y).mean()),
        "cache_only_accuracy": float((ev.pred_cache_only == ev.y).mean()), "network_accuracy": float((ev.pred_net == ev.y).mean()),
        "eval_items": int(len(ev.y)), "theta": ks.theta, "lam": ks.lam,
        "create_s": None if existed else t_create, "index_build_s": t_index,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
    }
    print(json.dumps(row, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
