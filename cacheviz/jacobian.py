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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import attacks as A
from .attacks import MODELS, Victims
from .config import Setup
from .errors import CachevizError
from .features import forward_layers
from .progress import ProgressFn, Stage
from .study import Run, Study


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


# ---------------------------------------------------------------------------------------------
# The study

# Images per batch of Jacobians: 3C backward directions of each are vmapped together.
JACOBIAN_BATCH = 32
# Without --n: this many images on the CPU, the whole test part on a GPU.
CPU_DEFAULT_N = 500


@dataclass(frozen=True)
class Jacobians(Study):
    """Figure 4: per test image and model, the Frobenius norm of J and its C singular values.
    The images are the robustness lab's (`robustness.attack_sample` with the same n and seed), so
    rows join with its per-image rho_adv on `index`. Rows: index, label, model, norm,
    singular_values, theta, lam, net, dataset, layers, seed, device."""

    setup: Setup
    n: int = CPU_DEFAULT_N
    seed: int = 0
    kind = "jacobian"
    stages = (Stage.CACHE_MODEL, Stage.LOAD, "Jacobians")

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise CachevizError("give a positive number of images", param="n", value=self.n)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "n": self.n, "seed": self.seed}

    def compute(self, run: Run) -> list[dict]:
        from .attacks import fp32
        from .robustness import attack_sample, load_victims

        with fp32():
            ws, v, _ = load_victims(self.setup, run)
            idx = attack_sample(ws.split.test_idx, self.n, self.seed)
            x = ws.spec.preprocess(ws.ds.test_x[idx].to(v.device))
            run.progress.stage("Jacobians")
            stats, _ = jacobian_stats(v, x, batch=JACOBIAN_BATCH, progress=run.progress.step)
        y = ws.ds.test_y[idx]
        hyper = {"network": (None, None), "cache": (v.theta, v.lam), "cache-only": (v.theta_cache_only, 1.0)}
        rows = []
        for i in range(len(idx)):
            for m in MODELS:
                theta, lam = hyper[m]
                # significant digits, not decimals: singular values span many orders of magnitude
                rows.append({
                    "index": int(idx[i]), "label": int(y[i]), "model": m, "norm": _sig(stats.norms[m][i]),
                    "singular_values": [_sig(s) for s in stats.singular_values[m][i]], "theta": theta, "lam": lam,
                    "net": ws.spec.name, "dataset": self.setup.dataset, "layers": list(v.layers), "seed": self.seed,
                    "device": run.device_name,
                })
        run.tensors = {"test_idx": idx, "y": y, **{f"norm_{m}": stats.norms[m] for m in MODELS},
                       **{f"sv_{m}": stats.singular_values[m] for m in MODELS}}
        return rows


def _sig(v) -> float:
    return float(f"{float(v):.6g}")


def summary(rows: list[dict]) -> list[dict]:
    """Per model: mean and median norm, and the mean spectrum with its s.e.m. over the images."""
    out = []
    for m in MODELS:
        rs = [r for r in rows if r["model"] == m]
        if not rs:
            continue
        norms = torch.tensor([r["norm"] for r in rs], dtype=torch.float64)
        sv = torch.tensor([r["singular_values"] for r in rs], dtype=torch.float64)
        sem = sv.std(0, unbiased=True) / math.sqrt(len(rs)) if len(rs) > 1 else torch.zeros(sv.shape[1])
        out.append({"model": m, "n": len(rs), "mean_norm": float(norms.mean()), "median_norm": float(norms.median()),
                    "mean_singular_values": sv.mean(0).tolist(), "sem_singular_values": sem.tolist()})
    return out


# ---------------------------------------------------------------------------------------------
# Beyond the paper: does a small Jacobian predict a large minimal perturbation?

RHO_ATTACKS = A.MINIMAL_ATTACKS


def rho_column(attack: str) -> str:
    return f"rho_adv_{attack}"


def stored_rho(setup: Setup, attack: str, seed: int, data_dir: str | Path, ns: tuple[int, ...],
               max_age: float = 0.0) -> dict[str, dict[int, float]]:
    """{model: {test index: minimal rho_adv}} from the robustness lab's stored white-box runs of
    `attack` (made against each model itself), with this setup and seed; for each model the first
    of `ns` (numbers of images) that is stored: the lab draws its images as a seeded permutation's
    first n, so runs with different n share their first images. Images the attack never flipped are left out (no
    minimal perturbation was found within the search's range). Never computes anything."""
    from .robustness import Attack, stored_attack_tensors

    out: dict[str, dict[int, float]] = {}
    for m in MODELS:
        for n in ns:
            t = stored_attack_tensors(Attack(setup, attack, m, int(n), int(seed)), data_dir, max_age)
            if t is None:
                continue
            ok = t["success"].bool() & torch.isfinite(t["rho"])
            out[m] = {int(i): _sig(r) for i, r in zip(t["test_idx"][ok], t["rho"][ok])}
            break
    return out


def with_rho(rows: list[dict], attack: str, rho: dict[str, dict[int, float]]) -> list[dict]:
    """Copies of the Jacobian rows with `rho_adv_<attack>`: the image's minimal rho_adv against
    its own model, None where that is not stored or the attack failed."""
    col = rho_column(attack)
    return [{**r, col: rho.get(r["model"], {}).get(int(r["index"]))} for r in rows]


def rank_correlations(rows: list[dict], attack: str) -> list[dict]:
    """Per model: Spearman's rank correlation of |J| with the minimal rho_adv over the images that
    have both, and its two-sided p-value. The paper's reading predicts a negative one (a smaller
    Jacobian, a larger perturbation needed)."""
    from scipy.stats import spearmanr

    col = rho_column(attack)
    out = []
    for m in MODELS:
        pairs = [(r["norm"], r[col]) for r in rows if r["model"] == m and r.get(col) is not None]
        if len(pairs) < 3:
            continue
        norm, rho = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
        res = spearmanr(norm, rho)
        if not np.isfinite(res.statistic):  # one side constant: no ranking to correlate
            continue
        out.append({"model": m, "attack": attack, "n": len(pairs), "spearman": _sig(res.statistic),
                    "p_value": _sig(res.pvalue), "median_norm": _sig(np.median(norm)),
                    "median_rho_adv": _sig(np.median(rho))})
    return out


# ---------------------------------------------------------------------------------------------
# One image, for the explorer


def heatmaps(v: Victims, x: torch.Tensor) -> dict[str, np.ndarray]:
    """{model: (C, H, W)}: for one normalised image x (1, channels, H, W), |dp_c/dx| summed over
    the channels, per class c: where in the image each class's probability is sensitive."""
    from .attacks import fp32

    with fp32():
        js = batch_jacobians(v, x[:1])
    b, ch, h, w = x[:1].shape
    return {m: j[0].reshape(-1, ch, h, w).abs().sum(1).detach().cpu().numpy() for m, j in js.items()}


# How theta moves J. d p_mem / d sims = theta Vᵀ (diag(w) - w wᵀ) with w = softmax(theta sims): a
# factor theta, times the spread of w over the classes. While w is spread, J grows with theta;
# once w saturates on one class's nearest items J falls towards 0 — except at images close to a
# tie between two classes' nearest items, whose J keeps growing. Which wins in the MEAN depends
# on the data: on CIFAR-10 (ResNet20, layer3.0 keys, 1,000 cached items, 30 images) it rose at
# every step from theta = 10 to 1000 while the median fell beyond theta = 90; on digits (the
# default setup) mean and median peak near theta = 10 and fall (README, "Jacobians";
# tests/test_jacobian.py checks the digits shape). A large theta does not simply flatten J.


def _at_theta(v: Victims, theta: float) -> Victims:
    theta = float(theta)
    if not math.isfinite(theta) or theta <= 0:
        raise CachevizError("theta must be a positive number", param="theta", value=theta)
    # a fresh Victims rather than editing v: v is shared by every session looking at this setup
    return Victims(v.spec, v.memory, v.layers, v.theta, v.lam, theta, device=v.device)


def cache_only_norms(v: Victims, x: torch.Tensor, thetas, batch: int = JACOBIAN_BATCH) -> dict[float, torch.Tensor]:
    """{theta: (N,) Frobenius norms of the cache-only model's J} for the normalised images x at
    each theta, with v's cache and keys (v's own theta and lam are not used)."""
    from .attacks import fp32

    out = {}
    for theta in thetas:
        other = _at_theta(v, theta)
        with fp32():
            out[float(theta)] = torch.cat([batch_jacobians(other, x[s:s + batch])["cache-only"].detach().flatten(1)
                                           .norm(dim=1).cpu() for s in range(0, len(x), batch)])
    return out


def spectrum_at_theta(v: Victims, x: torch.Tensor, theta: float) -> np.ndarray:
    """The C singular values (descending) of the cache-only model's J for one image at another
    theta. A larger theta sharpens the softmax over the cache: J scales with theta while the
    softmax is spread and collapses once it saturates, so one image's J may grow or shrink (see
    the note above `cache_only_norms`)."""
    from .attacks import fp32

    other = _at_theta(v, theta)
    with fp32():
        j = batch_jacobians(other, x[:1])["cache-only"][0].detach()
    return torch.linalg.svdvals(j).cpu().numpy()
