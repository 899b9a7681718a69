"""Choosing theta and lam on held-out data, the way the paper does: a grid search.

The whole theta x lam grid costs about one evaluation: similarities are computed once per query
block, p_mem once per theta from them, and every lam is a cheap mix of two (n, C) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cache import SIM_BLOCK_BYTES, CacheMemory, SimilarityBlock, class_groups, combine
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
            _tally(memory.block(sims), p_net[sl].to(dev, torch.float32), labels[sl].to(dev), thetas, lam_t,
                   correct, correct_co)
            if progress:
                progress(sl.stop, len(q), "")
    return _grid_result(thetas, lams, correct, correct_co, p_net, labels)


def _tally(block: SimilarityBlock, pn: torch.Tensor, y: torch.Tensor, thetas: Sequence[float], lam_t: torch.Tensor,
           correct: torch.Tensor, correct_co: torch.Tensor) -> None:
    """Add one block's correct answers at every (theta, lam), and cache-only's at every theta."""
    for t, (_, pm) in enumerate(block.p_mem_sweep(thetas)):
        correct_co[t] += (pm.argmax(1) == y).sum()
        correct[t] += (combine(pn, pm, lam_t).argmax(2) == y).sum(1)  # (L, n, C) -> (L,)


def _grid_result(thetas, lams, correct, correct_co, p_net, labels) -> GridResult:
    n = max(len(labels), 1)
    baseline = float((p_net.argmax(1) == labels.to(p_net.device)).float().mean())
    return GridResult(list(thetas), list(lams), correct.cpu().float() / n, correct_co.cpu().float() / n, baseline)


class LayeredCache:
    """A cache kept as each layer's raw features, so that any SET of its layers is scored
    without building that set's keys.

    Keys of several layers are their features concatenated, then scaled to unit length
    (`features.make_keys`), so for a query q and a stored item k

        q . k = sum_l q_l . k_l / (|q| |k|),  with |q|^2 = sum_l |q_l|^2, and |k|^2 likewise:

    one matrix product per layer and query block serves every set of those layers. Scoring the
    41 sets of up to three of ResNet20's six stage-3 layers costs six products per block, not the
    90 of 41 separate caches. `feats` {layer: (N, d)} are referenced, not copied: `rows` picks the
    stored items among their rows, and each block's similarity columns are gathered into
    class-grouped order, the order `CacheMemory` keeps its keys in.
    """

    def __init__(self, feats: dict[str, torch.Tensor], rows: torch.Tensor, labels: torch.Tensor, n_classes: int,
                 sq: dict[str, torch.Tensor] | None = None):
        if len(rows) == 0:
            raise CachevizError("That cache would be empty", "use a larger cache size")
        self.feats = feats
        self.device = next(iter(feats.values())).device
        labels = labels.to(torch.long)
        perm = torch.argsort(labels, stable=True)
        self.rows, self.labels = rows[perm].to(self.device), labels[perm].to(self.device)
        self.n_classes = int(n_classes)
        self.values, self.bounds = class_groups(self.labels, self.n_classes)
        # |k_l|^2 of every row of the features, whichever rows this cache holds
        self.sq = sq if sq is not None else {name: f.pow(2).sum(1) for name, f in feats.items()}

    def regrouped(self, rows: torch.Tensor, labels: torch.Tensor) -> "LayeredCache":
        """Another cache over the same features (their norms not computed again)."""
        return LayeredCache(self.feats, rows, labels, self.n_classes, sq=self.sq)

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self, layers: Sequence[str]) -> int:
        return sum(self.feats[name].shape[1] for name in layers)

    def iter_set_similarities(self, q: dict[str, torch.Tensor], sets: Sequence[Sequence[str]], n: int,
                              chunk_size: int | None = None):
        """Yield (rows, set index, unit-key similarities (n', K) in class-grouped order) for each
        query block and each set; `q` {layer: (n, d) raw query features}."""
        layers = list(dict.fromkeys(name for s in sets for name in s))
        # CacheMemory's block height: a GEMM of fewer rows runs at half the rate on the CPU (83
        # rows against 671 for 50,000 x 4096-d keys); memory is one block per layer plus five
        rows_per = int(chunk_size) if chunk_size else max(1, SIM_BLOCK_BYTES // (4 * len(self.feats[layers[0]])))
        q_sq = {name: q[name].to(self.device, torch.float32).pow(2).sum(1) for name in layers}
        k_norm = {tuple(s): torch.stack([self.sq[name] for name in s]).sum(0).sqrt_().clamp_min_(1e-12)
                  for s in sets}
        for start in range(0, n, rows_per):
            sl = slice(start, min(start + rows_per, n))
            dots = {name: q[name][sl].to(self.device, torch.float32) @ self.feats[name].T for name in layers}
            for i, s in enumerate(sets):
                q_norm = torch.stack([q_sq[name][sl] for name in s]).sum(0).sqrt_().clamp_min_(1e-12)
                sims = dots[s[0]].div(q_norm[:, None])  # a new tensor: dots serve the other sets
                for name in s[1:]:
                    sims.addcdiv_(dots[name], q_norm[:, None])
                sims.div_(k_norm[tuple(s)][None, :])
                yield sl, i, sims.index_select(1, self.rows)

    def block(self, sims: torch.Tensor) -> SimilarityBlock:
        return SimilarityBlock(sims, self.values, self.bounds)


def grid_search_sets(
    cache: LayeredCache,
    q: dict[str, torch.Tensor],
    p_net: torch.Tensor,
    labels: torch.Tensor,
    sets: Sequence[Sequence[str]],
    thetas: Sequence[float],
    lams: Sequence[float],
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
) -> list[GridResult]:
    """`grid_search` for every key set in `sets`, in one pass over the queries (see LayeredCache)."""
    if len(p_net) != len(labels):
        raise CachevizError(f"p_net and labels disagree in length: {len(p_net)}, {len(labels)}.")
    dev = cache.device
    correct = [torch.zeros(len(thetas), len(lams), dtype=torch.long, device=dev) for _ in sets]
    correct_co = [torch.zeros(len(thetas), dtype=torch.long, device=dev) for _ in sets]
    lam_t = torch.tensor([float(l) for l in lams], dtype=torch.float32, device=dev).view(-1, 1, 1)
    with torch.no_grad():
        for sl, i, sims in cache.iter_set_similarities(q, sets, len(labels), chunk_size):
            _tally(cache.block(sims), p_net[sl].to(dev, torch.float32), labels[sl].to(dev), thetas, lam_t,
                   correct[i], correct_co[i])
            if progress and i == len(sets) - 1:
                progress(sl.stop, len(labels), "")
    return [_grid_result(thetas, lams, c, c_co, p_net, labels) for c, c_co in zip(correct, correct_co)]


def predict_sets(
    cache: LayeredCache,
    q: dict[str, torch.Tensor],
    p_net: torch.Tensor,
    sets: Sequence[Sequence[str]],
    thetas_lams: Sequence[Sequence[tuple[float, float]]],
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
) -> list[list[torch.Tensor]]:
    """`predict` for every key set, each with its own (theta, lam) pairs: [[(N, C) on CPU]]."""
    n = len(p_net)
    outs = [[torch.empty(n, cache.n_classes) for _ in tl] for tl in thetas_lams]
    with torch.no_grad():
        for sl, i, sims in cache.iter_set_similarities(q, sets, n, chunk_size):
            _mix_into(outs[i], sl, cache.block(sims), p_net[sl].to(cache.device, torch.float32), thetas_lams[i])
            if progress and i == len(sets) - 1:
                progress(sl.stop, n, "")
    return outs


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
            _mix_into(outs, sl, memory.block(sims), p_net[sl].to(memory.device, torch.float32), thetas_lams)
            if progress:
                progress(sl.stop, len(q), "")
    return outs, knn


def _mix_into(outs: list[torch.Tensor], sl: slice, block: SimilarityBlock, pn: torch.Tensor,
              thetas_lams: Sequence[tuple[float, float]]) -> None:
    """Write p = (1 - lam) p_net + lam p_mem(theta) of one block for each pair; p_mem once per theta."""
    p_mem_by_theta: dict[float, torch.Tensor] = {}
    for out, (theta, lam) in zip(outs, thetas_lams):
        if theta not in p_mem_by_theta:
            p_mem_by_theta[theta] = block.p_mem(theta)
        out[sl] = combine(pn, p_mem_by_theta[theta], lam).cpu()


def accuracy(p: torch.Tensor, labels: torch.Tensor) -> float:
    return float((p.argmax(1) == labels.to(p.device)).float().mean()) if len(labels) else float("nan")
