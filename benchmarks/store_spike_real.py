"""Issue 11 spike on real keys: FAISS exact, HNSW and IVF over stored feature files.

    python benchmarks/store_spike_real.py TRAIN.safetensors TEST.safetensors

(the data directory's features/ files of one layer: the training items' and the test items').
"""
import json
import sys
import time

import faiss
import numpy as np
from safetensors.numpy import load_file
tr = load_file(sys.argv[1])["x"]
te = load_file(sys.argv[2])["x"][:200]
def unit(a): return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
x, q = unit(tr), unit(te)
truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
def bench(name, index, build=True):
    t0 = time.perf_counter()
    if hasattr(index, "train") and not index.is_trained: index.train(x)
    index.add(x); b = time.perf_counter() - t0
    ts, found = [], []
    for v in q:
        t = time.perf_counter(); found.append(index.search(v[None], 10)[1][0]); ts.append(1e3*(time.perf_counter()-t))
    ts.sort(); r = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    print(json.dumps({"index": name, "n": len(x), "dim": x.shape[1], "build_s": round(b, 1), "p50_ms": round(ts[100], 2),
                      "p95_ms": round(ts[190], 2), "recall_at_10": round(float(r), 3)}), flush=True)
d = x.shape[1]
bench("flat", faiss.IndexFlatIP(d))
h = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT); h.hnsw.efConstruction = 80; h.hnsw.efSearch = 64
bench("hnsw32", h)
qz = faiss.IndexFlatIP(d); ivf = faiss.IndexIVFFlat(qz, d, 256, faiss.METRIC_INNER_PRODUCT); ivf.nprobe = 16
bench("ivf256-nprobe16", ivf)
