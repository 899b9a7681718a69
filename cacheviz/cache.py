"""The paper's core: a key-value cache memory and its mixture with the network.

    p_mem = softmax(theta * q K^T) @ V         (Eq. 1-2; V one-hot labels)
    p     = (1 - lam) * p_net + lam * p_mem    (Eq. 3)

Similarities are computed in query chunks so memory stays bounded for 100k-item caches, and
the softmax is taken in log-space, so theta = 90 on cosine similarities never overflows
(exp(90) does in float32, which the original code did not guard against).
"""
from __future__ import annotations

from typing import Iterator, Sequence

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


class SimilarityBlock:
    """One block of similarities, ready to give p_mem for many theta at the cost of one exp each.

    Values are one-hot, so the softmax's denominator is the row sum of exp(...) @ V and needs no
    pass of its own; the row maximum is subtracted once for all theta (theta > 0), which is what
    keeps exp(theta * s) finite for theta = 90. About 3x faster than torch.softmax per theta here.
    """

    def __init__(self, sims: torch.Tensor, values: torch.Tensor):
        self.shifted = sims - sims.amax(dim=1, keepdim=True)  # <= 0
        self.values = values
        self._buf = torch.empty_like(self.shifted)

    def p_mem(self, theta: float) -> torch.Tensor:
        if theta <= 0:
            raise CachevizError(f"theta must be positive; got {theta}.")
        torch.mul(self.shifted, theta, out=self._buf)
        self._buf.exp_()
        mass = self._buf @ self.values
        return mass / mass.sum(dim=1, keepdim=True)


class CacheMemory:
    """Keys (K, d), unit-norm rows, and integer labels (K,) as one-hot values (K, C)."""

    def __init__(
        self,
        keys: torch.Tensor,
        labels: torch.Tensor,
        n_classes: int | None = None,
        device: str | torch.device = "cpu",
        normalize: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if keys.ndim != 2 or labels.ndim != 1 or len(keys) != len(labels):
            raise CachevizError(f"Keys must be (K, d) and labels (K,); got {tuple(keys.shape)} and {tuple(labels.shape)}.")
        if len(keys) == 0:
            raise CachevizError("The cache is empty; give it at least one training item.")
        self.device = torch.device(device)
        keys = keys.to(self.device, dtype)
        self.keys = F.normalize(keys, dim=1) if normalize else keys
        self.labels = labels.to(self.device, torch.long)
        self.n_classes = int(n_classes if n_classes is not None else int(labels.max()) + 1)
        self.values = F.one_hot(self.labels, self.n_classes).to(dtype)

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
                out[sl] = SimilarityBlock(sims, self.values).p_mem(theta)
        return out

    def topk(self, q: torch.Tensor, k: int, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar stored items per query: (similarities (N, k), indices (N, k))."""
        k = min(int(k), len(self))
        sims_out = torch.empty(len(q), k, device=self.device, dtype=self.keys.dtype)
        idx_out = torch.empty(len(q), k, dtype=torch.long, device=self.device)
        for sl, sims in self.iter_similarities(q, chunk_size):
            sims_out[sl], idx_out[sl] = sims.topk(k, dim=1)
        return sims_out, idx_out

    def knn_predict(self, q: torch.Tensor, k: int = 10, chunk_size: int | None = None) -> torch.Tensor:
        """Plain k-nearest-neighbour vote (seed 002's classifier), as (N, C) vote shares."""
        _, idx = self.topk(q, k, chunk_size)
        votes = self.values[idx].sum(dim=1)
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
        projections: dict[str, torch.Tensor] | None = None,
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
                a = a @ self.projections[name].to(a.device)
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
