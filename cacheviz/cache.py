"""The paper's core: a key-value cache memory and its mixture with the network.

    p_mem = softmax(theta * q K^T) @ V         (Eq. 1-2; V one-hot labels)
    p     = (1 - lam) * p_net + lam * p_mem    (Eq. 3)

Similarities are computed in query chunks so memory stays bounded for 100k-item caches, and
the softmax is taken in log-space, so theta = 90 on cosine similarities never overflows
(exp(90) does in float32, which the original code did not guard against).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CachevizError

# Bytes of one (chunk, K) similarity block; bounds memory whatever the cache size.
SIM_BLOCK_BYTES = 128 * 2**20


def combine(p_net: torch.Tensor, p_mem: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 3: p = (1 - lam) p_net + lam p_mem. lam = 0 is the network, lam = 1 cache-only."""
    return (1.0 - lam) * p_net + lam * p_mem


def p_mem_from_sims(sims: torch.Tensor, values: torch.Tensor, theta: float) -> torch.Tensor:
    """(n, K) similarities, (K, C) values -> (n, C) p_mem = softmax(theta * sims) @ values.

    Differentiable; use `SimilarityBlock` on hot paths that need no gradient.
    """
    return torch.softmax(theta * sims, dim=1) @ values


def class_shares(w: torch.Tensor, values: torch.Tensor, bounds: list[int] | None = None,
                 method: str = "auto") -> torch.Tensor:
    """(n, K) softmax weights -> (n, C) shares per class. `method`: "slices" (row-slice sums over
    a class-grouped cache, needs `bounds`), "matmul" (w @ V), or "auto" (slices on the CPU,
    matmul on a GPU: see `SimilarityBlock`)."""
    if method == "auto":
        method = "matmul" if bounds is None or w.is_cuda else "slices"
    if method == "slices":
        b = bounds
        mass = torch.stack([w[:, b[c] : b[c + 1]].sum(1) for c in range(len(b) - 1)], dim=1)
    else:
        mass = w @ values
    return mass / mass.sum(dim=1, keepdim=True)


class SimilarityBlock:
    """One block of similarities, from which p_mem for any theta costs one elementwise pass.

    Values are one-hot, so the softmax denominator is the sum of the class masses and needs no
    pass of its own; with the cache grouped by class (`bounds`) a class mass is a contiguous
    row-slice sum, ~4x cheaper than w @ V on the CPU; on a GPU one w @ V kernel beats ten slice
    sums (2x on an H200), so there the product is used. For a sweep over evenly spaced theta,
    exp(theta_k s) = exp(theta_0 s) * exp(step s)^k turns every exp after the first two into a
    multiply, but that multiply is only ~1.7x cheaper than an exp pass, so the sweep over the
    default 9 thetas is ~1.1x faster than `p_mem` per theta, not more. (Measured by
    benchmarks/run.py (f) on a 2-core CPU: a 671 x 50000 block of ResNet20 layer3.0
    similarities of CIFAR-10.) The row maximum is subtracted first, which keeps
    exp(theta s) finite for theta = 90.
    """

    def __init__(self, sims: torch.Tensor, values: torch.Tensor, bounds: list[int] | None = None):
        self.shifted = sims - sims.amax(dim=1, keepdim=True)  # <= 0
        self.values = values
        self.bounds = bounds  # class c occupies columns bounds[c]:bounds[c + 1]
        self._buf = torch.empty_like(self.shifted)

    def _class_mass(self, w: torch.Tensor) -> torch.Tensor:
        return class_shares(w, self.values, self.bounds)

    def p_mem(self, theta: float) -> torch.Tensor:
        """(n, C) p_mem at one theta."""
        if theta <= 0:
            raise CachevizError("must be positive", param="theta", value=theta)
        torch.mul(self.shifted, theta, out=self._buf)
        self._buf.exp_()
        return self._class_mass(self._buf)

    def p_mem_sweep(self, thetas: Sequence[float]) -> Iterator[tuple[float, torch.Tensor]]:
        """Yield (theta, p_mem) for each theta, in order; fast when they are evenly spaced."""
        thetas = [float(t) for t in thetas]
        steps = {round(b - a, 9) for a, b in zip(thetas, thetas[1:])}
        if len(thetas) < 3 or len(steps) != 1 or min(steps) <= 0:
            for t in thetas:
                yield t, self.p_mem(t)
            return
        step = torch.exp(self.shifted * (thetas[1] - thetas[0]))
        yield thetas[0], self.p_mem(thetas[0])  # leaves exp(theta_0 s) in _buf
        for t in thetas[1:]:
            self._buf.mul_(step)
            yield t, self._class_mass(self._buf)


def class_groups(sorted_labels: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, list[int]]:
    """One-hot values (K, C) of labels sorted by class, and where each class's run starts and
    ends (`bounds[c]:bounds[c + 1]`), so class masses are row-slice sums."""
    counts = torch.bincount(sorted_labels.cpu(), minlength=n_classes)
    return F.one_hot(sorted_labels, n_classes).to(dtype), [0] + torch.cumsum(counts, 0).tolist()


def p_mem_from_topk(sims: torch.Tensor, labels: torch.Tensor, theta: float, n_classes: int) -> torch.Tensor:
    """p_mem over the k retrieved items only: (N, k) similarities and their (N, k) labels ->
    (N, C) softmax(theta * sims) summed per class. Any search backend (FAISS, a database) gives
    these two; with k = K it is the exact p_mem, and the items it leaves out are the ones whose
    weights exp(theta * s) are smallest."""
    w = torch.softmax(theta * sims, dim=1)
    return torch.zeros(len(sims), n_classes, dtype=w.dtype, device=w.device).scatter_add_(1, labels.long(), w)


class CacheMemory:
    """Keys (K, d), unit-norm rows, and integer labels (K,) as one-hot values (K, C).

    Items are kept grouped by class (stable order) so class masses are slice sums; `order[i]`
    is the caller's index of stored row i, and `topk` answers in the caller's indices. Pass
    labels already sorted (as `experiment` does) to avoid a copy of the keys.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        labels: torch.Tensor,
        n_classes: int | None = None,
        device: str | torch.device = "cpu",
        normalize: bool = False,
        dtype: torch.dtype = torch.float32,
        order: torch.Tensor | None = None,
    ):
        if keys.ndim != 2 or labels.ndim != 1 or len(keys) != len(labels):
            raise CachevizError(f"Keys must be (K, d) and labels (K,); got {tuple(keys.shape)} and {tuple(labels.shape)}.")
        if len(keys) == 0:
            raise CachevizError("The cache is empty; give it at least one training item.")
        self.device = torch.device(device)
        labels = labels.to(torch.long)
        self.order = torch.arange(len(labels)) if order is None else order.to(torch.long).cpu()
        if bool((labels[1:] < labels[:-1]).any()):
            perm = torch.argsort(labels, stable=True)
            keys, labels, self.order = keys[perm], labels[perm], self.order[perm]
        keys = keys.to(self.device, dtype)
        self.keys = F.normalize(keys, dim=1) if normalize else keys
        self.labels = labels.to(self.device)
        self.n_classes = int(n_classes if n_classes is not None else int(labels.max()) + 1)
        self.values, self.bounds = class_groups(self.labels, self.n_classes, dtype)

    def block(self, sims: torch.Tensor) -> SimilarityBlock:
        return SimilarityBlock(sims, self.values, self.bounds)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def chunk_rows(self, chunk_size: int | None = None) -> int:
        if chunk_size:
            return int(chunk_size)
        return max(1, SIM_BLOCK_BYTES // (4 * len(self)))

    def iter_similarities(
        self, q: torch.Tensor, chunk_size: int | None = None
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (rows, q[rows] @ K^T) block by block; q (N, d) unit-norm queries."""
        rows = self.chunk_rows(chunk_size)
        for start in range(0, len(q), rows):
            sl = slice(start, min(start + rows, len(q)))
            yield sl, q[sl].to(self.device, self.keys.dtype) @ self.keys.T

    def p_mem(self, q: torch.Tensor, theta: float, chunk_size: int | None = None) -> torch.Tensor:
        """(N, d) queries -> (N, C) p_mem on the memory's device."""
        out = torch.empty(len(q), self.n_classes, device=self.device, dtype=self.keys.dtype)
        with torch.no_grad():
            for sl, sims in self.iter_similarities(q, chunk_size):
                out[sl] = self.block(sims).p_mem(theta)
        return out

    def topk(self, q: torch.Tensor, k: int, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar stored items per query: (similarities (N, k), caller's indices (N, k))."""
        k = min(int(k), len(self))
        sims_out = torch.empty(len(q), k, device=self.device, dtype=self.keys.dtype)
        idx_out = torch.empty(len(q), k, dtype=torch.long, device=self.device)
        for sl, sims in self.iter_similarities(q, chunk_size):
            sims_out[sl], idx_out[sl] = sims.topk(k, dim=1)
        return sims_out, self.order.to(self.device)[idx_out]

    def p_mem_topk(self, q: torch.Tensor, theta: float, k: int, chunk_size: int | None = None) -> torch.Tensor:
        """p_mem from the k most similar items (see `p_mem_from_topk`), on the memory's device."""
        k = min(int(k), len(self))
        out = torch.empty(len(q), self.n_classes, device=self.device, dtype=self.keys.dtype)
        with torch.no_grad():
            for sl, sims in self.iter_similarities(q, chunk_size):
                top = sims.topk(k, dim=1)
                out[sl] = p_mem_from_topk(top.values, self.labels[top.indices], theta, self.n_classes)
        return out

    def knn_predict(self, q: torch.Tensor, k: int = 10, chunk_size: int | None = None) -> torch.Tensor:
        """Plain k-nearest-neighbour vote (seed 002's classifier), as (N, C) vote shares."""
        k = min(int(k), len(self))
        votes = torch.empty(len(q), self.n_classes, device=self.device, dtype=self.keys.dtype)
        for sl, sims in self.iter_similarities(q, chunk_size):
            votes[sl] = self.values[sims.topk(k, dim=1).indices].sum(dim=1)
        return votes / votes.sum(dim=1, keepdim=True)


class CacheClassifier(nn.Module):
    """Differentiable images -> p: the network and its cache as one module.

    Input: preprocessed images (N, C, H, W), so attacks and Jacobians work in the same
    normalised input space as the paper. Keys stay constant; gradients flow through the
    query features, the similarities and the softmax.
    """

    def __init__(
        self,
        spec,
        memory: CacheMemory,
        layers: Sequence[str],
        theta: float,
        lam: float,
        projections: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ):
        super().__init__()
        from .features import resolve_layers

        self.spec = spec
        self.net = spec.net
        self.layers = resolve_layers(spec, list(layers))
        self.memory = memory
        self.theta = float(theta)
        self.lam = float(lam)
        self.projections = projections or {}

    def query(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name in self.layers:
            a = acts[name].flatten(1)
            if name in self.projections:
                a = self.projections[name](a)
            parts.append(a)
        return F.normalize(torch.cat(parts, dim=1), dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .features import forward_layers

        acts = forward_layers(self.spec, x, [*self.layers, "logits"])
        p_net = torch.softmax(acts["logits"], dim=1)
        if self.lam == 0.0:
            return p_net
        q = self.query(acts).to(self.memory.device)
        sims = q @ self.memory.keys.T
        p_mem = p_mem_from_sims(sims, self.memory.values, self.theta).to(p_net.device)
        return combine(p_net, p_mem, self.lam)
