"""Choosing theta and lam on held-out data, the way the paper does: a grid search.

The whole theta x lam grid costs about one evaluation: similarities are computed once per query
block, p_mem once per theta from them, and every lam is a cheap mix of two (n, C) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cache import CacheMemory, combine
from .errors import CachevizError
from .progress import ProgressFn


THETA_RANGE = (10.0, 90.0)
LAM_RANGE = (0.1, 0.9)


def default_grid(n_theta: int = 9, n_lam: int = 9, theta_max: float = THETA_RANGE[1]
                 ) -> tuple[list[float], list[float]]:
    """The paper's ranges, theta in [10, 90] and lam in [0.1, 0.9], at the given resolution;
    `theta_max` moves theta's top (the best theta often lies on the paper's edge, 90)."""
    if n_theta < 1 or n_lam < 1:
        raise CachevizError("the theta x lam grid needs at least one value of each", "use e.g. 9x9",
                            param="grid", value=f"{n_theta}x{n_lam}")
    lo, hi = THETA_RANGE[0], float(theta_max)
    thetas = torch.linspace(lo, hi, n_theta).tolist() if n_theta > 1 else [(lo + hi) / 2]
    lams = torch.linspace(*LAM_RANGE, n_lam).tolist() if n_lam > 1 else [sum(LAM_RANGE) / 2]
    return [round(t, 6) for t in thetas], [round(l, 6) for l in lams]


def on_edge(value: float | None, values) -> bool:
    """Whether a tuned value is the grid's first or last: the best may then lie outside it."""
    values = list(values)
    return value is not None and len(values) > 1 and value in (values[0], values[-1])


@dataclass
class GridResult:
    thetas: list[float]
    lams: list[float]
    acc: torch.Tensor  # (T, L) accuracy of p = (1 - lam) p_net + lam p_mem
    acc_cache_only: torch.Tensor  # (T,) accuracy of p_mem alone (lam = 1)
    baseline_acc: float
    theta: float = field(init=False)
    lam: float = field(init=False)
    best_acc: float = field(init=False)
    theta_cache_only: float = field(init=False)
    best_acc_cache_only: float = field(init=False)

    def __post_init__(self):
        # argmax takes the first maximum: ties go to the smallest theta, then the smallest lam
        flat = int(torch.argmax(self.acc))
        t, l = divmod(flat, len(self.lams))
        self.theta, self.lam = self.thetas[t], self.lams[l]
        self.best_acc = float(self.acc[t, l])
        t_co = int(torch.argmax(self.acc_cache_only))
        self.theta_cache_only = self.thetas[t_co]
        self.best_acc_cache_only = float(self.acc_cache_only[t_co])


def _check(q: torch.Tensor, p_net: torch.Tensor, labels: torch.Tensor, memory: CacheMemory):
    if not (len(q) == len(p_net) == len(labels)):
        raise CachevizError(f"Queries, p_net and labels disagree in length: {len(q)}, {len(p_net)}, {len(labels)}.")
    if q.shape[1] != memory.dim:
        raise CachevizError(f"Query dimension {q.shape[1]} does not match the cache's key dimension {memory.dim}.")


def grid_search(
    memory: CacheMemory,
    q: torch.Tensor,
    p_net: torch.Tensor,
    labels: torch.Tensor,
    thetas: Sequence[float],
    lams: Sequence[float],
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
) -> GridResult:
    """Accuracy of every (theta, lam) and of cache-only at every theta, on (q, p_net, labels)."""
    _check(q, p_net, labels, memory)
    dev = memory.device
    # counts stay on the device (no sync per cell); every lam of a theta in one broadcast
    correct = torch.zeros(len(thetas), len(lams), dtype=torch.long, device=dev)
    correct_co = torch.zeros(len(thetas), dtype=torch.long, device=dev)
    lam_t = torch.tensor([float(l) for l in lams], dtype=torch.float32, device=dev).view(-1, 1, 1)
    with torch.no_grad():
        for sl, sims in memory.iter_similarities(q, chunk_size):
            block = memory.block(sims)
            pn = p_net[sl].to(dev, torch.float32)
            y = labels[sl].to(dev)
            for t, (_, pm) in enumerate(block.p_mem_sweep(thetas)):
                correct_co[t] += (pm.argmax(1) == y).sum()
                correct[t] += (combine(pn, pm, lam_t).argmax(2) == y).sum(1)  # (L, n, C) -> (L,)
            if progress:
                progress(sl.stop, len(q), "")
    correct, correct_co = correct.cpu(), correct_co.cpu()
    n = max(len(q), 1)
    baseline = float((p_net.argmax(1) == labels.to(p_net.device)).float().mean())
    return GridResult(list(thetas), list(lams), correct.float() / n, correct_co.float() / n, baseline)


def predict(
    memory: CacheMemory,
    q: torch.Tensor,
    p_net: torch.Tensor,
    thetas_lams: Sequence[tuple[float, float]],
    chunk_size: int | None = None,
    knn_k: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """p for each (theta, lam), and with `knn_k` > 0 the k-NN vote's labels, in ONE pass over
    the similarities: ([(N, C) on CPU per pair], (N,) labels on CPU or None)."""
    if len(q) != len(p_net) or q.shape[1] != memory.dim:
        raise CachevizError("Queries and p_net must have the same length and the cache's key dimension")
    outs = [torch.empty(len(q), memory.n_classes) for _ in thetas_lams]
    knn = torch.empty(len(q), dtype=torch.long) if knn_k > 0 else None
    k = min(int(knn_k), len(memory))
    with torch.no_grad():
        for sl, sims in memory.iter_similarities(q, chunk_size):
            if knn is not None:
                knn[sl] = memory.values[sims.topk(k, dim=1).indices].sum(1).argmax(1).cpu()
            block = memory.block(sims)
            pn = p_net[sl].to(memory.device, torch.float32)
            p_mem_by_theta: dict[float, torch.Tensor] = {}
            for out, (theta, lam) in zip(outs, thetas_lams):
                if theta not in p_mem_by_theta:
                    p_mem_by_theta[theta] = block.p_mem(theta)
                out[sl] = combine(pn, p_mem_by_theta[theta], lam).cpu()
            if progress:
                progress(sl.stop, len(q), "")
    return outs, knn


def accuracy(p: torch.Tensor, labels: torch.Tensor) -> float:
    return float((p.argmax(1) == labels.to(p.device)).float().mean()) if len(labels) else float("nan")
