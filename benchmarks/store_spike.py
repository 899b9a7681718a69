"""Issue 11 spike: which vector database backs the knowledge store (measured here, not assumed).

    python benchmarks/store_spike.py --n 100000 --dim 512 --queries 200

Synthetic unit-norm keys with class structure (10 Gaussian clusters, so neighbours mean
something); for each backend: insert rate, single-query latency p50/p95 for top-10, batch
throughput, recall@10 against exact inner-product search, and the process's resident-memory
growth. Backends: FAISS (IndexFlatIP exact, IndexHNSWFlat), Qdrant local mode (on disk, no
server), Milvus Lite (embedded, on disk). Prints one JSON row per backend.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def keys(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    centres = g.standard_normal((10, dim)).astype(np.float32)
    y = g.integers(0, 10, n)
    x = centres[y] + 1.5 * g.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def lat(fn, qs) -> tuple[list[list[int]], float, float]:
    out, ts = [], []
    for q in qs:
        t0 = time.perf_counter()
        out.append(fn(q))
        ts.append(1e3 * (time.perf_counter() - t0))
    ts.sort()
    return out, statistics.median(ts), ts[int(0.95 * (len(ts) - 1))]


def run_faiss(x, q, truth, kind):
    import faiss

    m0 = rss_mb()
    t0 = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    index.add(x)
    ins = len(x) / (time.perf_counter() - t0)
    if kind != "flat":
        index.hnsw.efSearch = 64
    found, p50, p95 = lat(lambda v: index.search(v[None], 10)[1][0].tolist(), q)
    t0 = time.perf_counter()
    index.search(q, 10)
    thr = len(q) / (time.perf_counter() - t0)
    return {"backend": f"faiss-{kind}", "insert_per_s": ins, "p50_ms": p50, "p95_ms": p95, "batch_q_per_s": thr,
            "recall_at_10": recall(found, truth), "rss_growth_mb": rss_mb() - m0}


def run_qdrant(x, y, q, truth, folder):
    from qdrant_client import QdrantClient, models

    m0 = rss_mb()
    client = QdrantClient(path=str(folder))
    client.create_collection("cache", vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.DOT))
    t0 = time.perf_counter()
    for s in range(0, len(x), 2000):
        client.upload_collection("cache", vectors=x[s:s + 2000], payload=[{"label": int(v)} for v in y[s:s + 2000]],
                                 ids=list(range(s, min(s + 2000, len(x)))))
    ins = len(x) / (time.perf_counter() - t0)
    found, p50, p95 = lat(lambda v: [p.id for p in client.query_points("cache", query=v, limit=10).points], q)
    t0 = time.perf_counter()
    client.query_batch_points("cache", requests=[models.QueryRequest(query=v.tolist(), limit=10) for v in q])
    thr = len(q) / (time.perf_counter() - t0)
    client.close()
    return {"backend": "qdrant-local", "insert_per_s": ins, "p50_ms": p50, "p95_ms": p95, "batch_q_per_s": thr,
            "recall_at_10": recall(found, truth), "rss_growth_mb": rss_mb() - m0}


def run_milvus(x, y, q, truth, folder):
    from pymilvus import MilvusClient

    m0 = rss_mb()
    client = MilvusClient(str(folder / "store.db"))
    client.create_collection("cache", dimension=x.shape[1], metric_type="IP", auto_id=False)
    t0 = time.perf_counter()
    for s in range(0, len(x), 2000):
        client.insert("cache", [{"id": int(i), "vector": x[i].tolist(), "label": int(y[i])}
                                for i in range(s, min(s + 2000, len(x)))])
    client.flush("cache")
    ins = len(x) / (time.perf_counter() - t0)
    client.load_collection("cache")
    found, p50, p95 = lat(lambda v: [h["id"] for h in client.search("cache", [v.tolist()], limit=10)[0]], q)
    t0 = time.perf_counter()
    client.search("cache", q.tolist(), limit=10)
    thr = len(q) / (time.perf_counter() - t0)
    client.close()
    return {"backend": "milvus-lite", "insert_per_s": ins, "p50_ms": p50, "p95_ms": p95, "batch_q_per_s": thr,
            "recall_at_10": recall(found, truth), "rss_growth_mb": rss_mb() - m0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--only", default="faiss-flat,faiss-hnsw,qdrant,milvus")
    a = p.parse_args(argv)
    x, y = keys(a.n, a.dim, 0)
    q, _ = keys(a.queries, a.dim, 1)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    for name in a.only.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"spike-{name}-"))
        try:
            if name.startswith("faiss"):
                row = run_faiss(x, q, truth, name.split("-")[1])
            elif name == "qdrant":
                row = run_qdrant(x, y, q, truth, folder)
            else:
                row = run_milvus(x, y, q, truth, folder)
        except Exception as exc:  # a spike: say what failed and go on with the others
            row = {"backend": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row.update(n=a.n, dim=a.dim)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
