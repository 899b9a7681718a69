"""Input-output Jacobians of the network, the cache model and the cache-only model (Figure 4).

J(x) = d p(y|x) / d x: the derivative of the whole probability vector (softmax of the network,
the mixture p of the cache model, p_mem of cache-only, at their tuned theta, lam) with respect
to the normalised input, a C x (channels * H * W) matrix per image; all C singular values kept.

One forward pass per batch of images gives p_net, p_mem(theta) and p_mem(theta_cache_only) (the
network and the similarities are shared), and ONE batched backward (`is_grads_batched`: the C
vector-Jacobian products of each output vmapped together) gives J_net, J_mem and J_mem_only.
The cache model's is then (1 - lam) J_net + lam J_mem, exactly, since p is that mixture (a test
checks it against the cache model's own Jacobian).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attacks import MODELS, Victims
from .features import forward_layers
from .progress import ProgressFn


def _outputs(v: Victims, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, C): p_net, p_mem at theta, p_mem at the cache-only theta, from one network pass."""
    acts = forward_layers(v.spec, x, [*v.layers, "logits"])
    p_net = torch.softmax(acts["logits"], dim=1)
    sims = v.classifiers["cache"].query(acts).to(v.memory.device) @ v.memory.keys.T
    p_mem = (torch.softmax(v.theta * sims, dim=1) @ v.memory.values).to(p_net.device)
    p_co = (torch.softmax(v.theta_cache_only * sims, dim=1) @ v.memory.values).to(p_net.device)
    return torch.stack([p_net, p_mem, p_co], dim=1)


def batch_jacobians(v: Victims, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{model: (B, C, D)} for a batch of normalised images x (B, channels, H, W)."""
    x = x.detach().to(v.device).requires_grad_(True)
    with torch.enable_grad():
        out = _outputs(v, x)  # (B, 3, C)
        b, k, c = out.shape
        # every one-hot direction of the 3C outputs, each for all B images at once
        eye = torch.eye(k * c, device=out.device, dtype=out.dtype).view(k * c, 1, k, c).expand(k * c, b, k, c)
        try:
            (g,) = torch.autograd.grad(out, x, grad_outputs=eye, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: one backward pass per direction
            g = torch.stack([torch.autograd.grad(out, x, grad_outputs=eye[i], retain_graph=i < k * c - 1)[0]
                             for i in range(k * c)])
    j = g.reshape(k, c, b, -1).permute(2, 0, 1, 3)  # (B, 3, C, D)
    j_net, j_mem, j_co = j[:, 0], j[:, 1], j[:, 2]
    return {"network": j_net, "cache": (1.0 - v.lam) * j_net + v.lam * j_mem, "cache-only": j_co}


@dataclass
class JacobianStats:
    """Per image and model: the Frobenius norm and the C singular values (descending)."""

    norms: dict[str, torch.Tensor]  # {model: (N,)}
    singular_values: dict[str, torch.Tensor]  # {model: (N, C)}


def jacobian_stats(v: Victims, x: torch.Tensor, batch: int = 32, progress: ProgressFn | None = None,
                   keep: bool = False) -> tuple[JacobianStats, dict[str, torch.Tensor] | None]:
    """Norms and singular values of J for every image of x, `batch` images per pass; with
    `keep`, the Jacobians themselves too ({model: (N, C, D)} on the CPU; for a few images)."""
    norms = {m: [] for m in MODELS}
    svals = {m: [] for m in MODELS}
    kept = {m: [] for m in MODELS} if keep else None
    n = len(x)
    for s in range(0, n, batch):
        js = batch_jacobians(v, x[s:s + batch])
        for m in MODELS:
            j = js[m].detach()
            sv = torch.linalg.svdvals(j)  # (B, C), descending
            svals[m].append(sv.cpu())
            norms[m].append(sv.pow(2).sum(1).sqrt().cpu())  # Frobenius = sqrt(sum of squared singular values)
            if keep:
                kept[m].append(j.cpu())
        if progress:
            progress(min(s + batch, n), n, "Jacobians")
    stats = JacobianStats({m: torch.cat(norms[m]) for m in MODELS}, {m: torch.cat(svals[m]) for m in MODELS})
    return stats, ({m: torch.cat(kept[m]) for m in MODELS} if keep else None)
