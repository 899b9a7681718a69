"""p_mem from the k most similar items (issue 11): how small can k be, and which index serves it.

Over a database, p_mem comes from a top-k search: softmax(theta * the k similarities) summed per
class (`cache.p_mem_from_topk`). The `TopK` study measures, on the test part, the cache model's
and cache-only accuracy against k, at the theta, lam tuned for the exact p_mem, and beside the
exact accuracies; for an approximate FAISS index (`ivf`, `hnsw`) also recall@10 against exact
search and the time of one query. CLI: `python -m cacheviz topk`; the store (`kstore`) uses its
result for its default k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .cache import combine, p_mem_from_topk
from .config import Setup
from .errors import CachevizError
from .progress import Stage
from .study import Run, Study, score_keys
from .tuning import accuracy, default_grid
from .workspace import ExperimentData

INDEXES = ("exact", "ivf", "hnsw")
DEFAULT_KS = (10, 30, 100, 300, 1000, 3000, 10000, 50000)
LATENCY_QUERIES = 200


def faiss_index(keys: np.ndarray, kind: str):
    """A FAISS inner-product index over unit-norm `keys` (float32): exact, IVF-Flat or HNSW, with
    the settings measured in docs/notes/issue11-store-spike.md."""
    import faiss

    d = keys.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        lists = max(1, min(256, len(keys) // 39))  # FAISS wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
        index.nprobe = min(16, lists)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        raise CachevizError(f"unknown index {kind!r}", f"choose from {', '.join(INDEXES)}", param="index", value=kind)
    index.add(keys)
    return index


def search(index, q: np.ndarray, k: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "hnsw":
        index.hnsw.efSearch = max(64, k)  # HNSW returns at most efSearch neighbours
    return index.search(q, k)


@dataclass(frozen=True)
class TopK(Study):
    """Rows: k, index, accuracy (cache model, top-k p_mem), cache_only_accuracy, exact_accuracy,
    exact_cache_only_accuracy, recall_at_10 (against exact search; 1 for `exact`), ms_per_query
    (one query at a time, median), theta, lam, n_cache."""

    setup: Setup
    ks: tuple[int, ...] = DEFAULT_KS
    index: str = "exact"
    kind = "topk"
    stages = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, Stage.TUNE, "top-k")

    def __post_init__(self):
        ks = tuple(sorted({int(k) for k in self.ks}))
        if not ks or ks[0] < 1:
            raise CachevizError("k counts retrieved items", "give whole numbers from 1, e.g. 10,100,1000",
                                param="ks", value=list(self.ks))
        if self.index not in INDEXES:
            raise CachevizError(f"unknown index {self.index!r}", f"choose from {', '.join(INDEXES)}",
                                param="index", value=self.index)
        object.__setattr__(self, "ks", ks)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "ks": list(self.ks), "index": self.index}

    def compute(self, run: Run) -> list[dict]:
        ws = run.prepare(self.setup)
        data = ExperimentData(ws, ws.layers, run.progress)
        sc = score_keys(data, ws.layers, *default_grid(self.setup.n_theta, self.setup.n_lam, self.setup.theta_max),
                        progress=run.progress)
        mem = data.memory(ws.layers, "test")
        q = data.queries(ws.layers)[1]
        run.progress.stage("top-k")
        keys = mem.keys.float().cpu().numpy()
        qn = q.float().cpu().numpy()
        index = faiss_index(keys, self.index)
        k_max = min(max(self.ks), len(mem))
        if self.index != "exact" and k_max > 2048:
            k_max = 2048  # an approximate index is for small k; larger k would be an exhaustive scan
        labels = mem.labels.cpu()
        sims_all, ids_all = [], []
        for s in range(0, len(qn), 256):
            d, i = search(index, qn[s:s + 256], k_max, self.index)
            sims_all.append(torch.from_numpy(d))
            ids_all.append(torch.from_numpy(i))
        sims, ids = torch.cat(sims_all), torch.cat(ids_all)
        ok = ids >= 0  # approximate indexes pad missing neighbours with -1
        recall = 1.0
        if self.index != "exact":
            # at the settings the latency below is timed with (a top-10 search), not k_max's
            ids10 = search(index, qn, min(10, k_max), self.index)[1]
            exact_ids = faiss_index(keys, "exact").search(qn, min(10, k_max))[1]
            recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(ids10, exact_ids)]))
        ts = []
        for v in qn[:LATENCY_QUERIES]:
            t0 = time.perf_counter()
            search(index, v[None], min(10, k_max), self.index)
            ts.append(1e3 * (time.perf_counter() - t0))
        ms = float(np.median(ts))
        p_net, y = sc.p_net, sc.y
        rows = []
        ks = sorted({min(k, k_max) for k in self.ks})  # a k beyond the store is the whole store
        for i, k in enumerate(ks):
            s_k = torch.where(ok[:, :k], sims[:, :k], torch.tensor(-1e4))
            lab = labels[ids[:, :k].clamp(min=0)]
            p_mem = p_mem_from_topk(s_k, lab, sc.theta, mem.n_classes)
            p_co = p_mem_from_topk(s_k, lab, sc.theta_cache_only, mem.n_classes)
            rows.append({"k": k, "index": self.index, "accuracy": accuracy(combine(p_net, p_mem, sc.lam), y),
                         "cache_only_accuracy": accuracy(p_co, y), "exact_accuracy": sc.acc,
                         "exact_cache_only_accuracy": sc.cache_only_acc, "recall_at_10": recall,
                         "ms_per_query": ms, "theta": sc.theta, "lam": sc.lam, "n_cache": len(mem),
                         "layers": list(ws.layers), "dataset": self.setup.dataset, "net": ws.spec.name})
            run.progress.step(i + 1, len(ks), f"k = {k}")
        return rows
