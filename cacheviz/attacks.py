"""Adversarial and corrupted images against the network, the cache model and the cache-only model.

Everything happens in the network's normalised input space, as in the paper and the author's
code: an attack perturbs `spec.preprocess(image)`, and rho_adv = |x_adv - x|_2 / |x|_2 there.
Perturbed images are clipped per channel to the range a real image can take in that space.

The label attacked is the attacked model's own prediction; accuracy is against the true label.

Minimal-perturbation searches (`minimal`) grow one strength per image — FGSM's or I-FGSM's
epsilon, the Gaussian blur's sigma — over a geometric grid until the label flips, then bisect
between the last strength that failed and the first that flipped, all images in one batch with
per-image strengths. The single-pixel attack tries every pixel (in a seeded random order), each
set to the image's maximum and minimum on all channels, until the label flips; a batch of
candidates per image per forward pass. An attack that never flips the label leaves the image
unchanged and counts as a failure.

FGSM and I-FGSM are written here with per-image epsilons (Foolbox 3's take one epsilon per call,
which the bisection cannot use); `tests/test_attacks.py` checks them against Foolbox's `FGSM`
and `LinfBasicIterativeAttack` at a shared epsilon. The strength curves call Foolbox itself
with the whole epsilon list, and the decision-based check is Foolbox's `HopSkipJumpAttack`.

Gradients of the cache models flow through the query's features, the similarities and the
softmax (`cache.CacheClassifier`). Their "logits" are log p, so the attacks' cross-entropy is
-log p_y: the cross-entropy of the models' own probability output, unclipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheMemory, CacheClassifier, combine
from .errors import CachevizError
from .features import forward_layers
from .progress import ProgressFn

MODELS = ("network", "cache", "cache-only")
GRADIENT_ATTACKS = ("fgsm", "ifgsm")
MINIMAL_ATTACKS = ("fgsm", "ifgsm", "pixel", "blur", "hopskipjump")
# Curve attacks: Foolbox with the whole epsilon list (L-inf FGSM and I-FGSM, and L2 I-FGSM),
# and perturbations that need no model: blur sigma, and brightness, contrast and gamma factors.
CURVE_ATTACKS = ("fgsm", "ifgsm", "l2", "blur", "brightness", "contrast", "gamma")
CORRUPTIONS = ("blur", "brightness", "contrast", "gamma")
ATTACKS = tuple(dict.fromkeys([*MINIMAL_ATTACKS, *CURVE_ATTACKS]))
DECISION_ATTACK = "hopskipjump"  # Foolbox's HopSkipJumpAttack

# The paper's search ranges: FGSM/I-FGSM epsilon from 0 to 0.5, blur sigma from 0 to max(h, w).
MAX_EPSILON = 0.5
IFGSM_STEPS = 10
IFGSM_REL_STEP = 0.2  # Foolbox 3's LinfBasicIterativeAttack default: step = 0.2 epsilon
# The geometric grid grows by sqrt(2) per step; BISECT more halvings then put a flip point
# within 2**(-BISECT) of that bracket (0.29 epsilon wide: within 0.5% of epsilon for 6).
GRID_RATIO = math.sqrt(2.0)
EPS_GRID_STEPS = 21  # 0.5 / 2**10 ... 0.5
BISECT = 6
# Default budget of the decision-based check (queries per image: about 100 * sum sqrt(t)).
HSJ_STEPS = 8
HSJ_INIT_EVALS = 50
HSJ_MAX_EVALS = 400
# Default strength lists of the curves.
DEFAULT_EPSILONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
DEFAULT_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def _foolbox():
    """Foolbox 3, or one sentence naming the fix."""
    try:
        import foolbox
    except ImportError:
        raise CachevizError("this attack needs Foolbox 3, which is not installed",
                            "pip install -r requirements.txt (or pip install 'foolbox>=3.3,<4')") from None
    return foolbox


def fp32():
    """Full float32 convolutions on a GPU (no TF32), as the feature extraction uses: an attack's
    gradient signs and flip points then agree with the CPU's."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


def check_attack(attack: str, curve: bool) -> str:
    name = str(attack).strip().lower()
    allowed = CURVE_ATTACKS if curve else MINIMAL_ATTACKS
    if name not in allowed:
        raise CachevizError(f"unknown {'curve' if curve else 'minimal-perturbation'} attack",
                            f"use one of {', '.join(allowed)}", param="attack", value=attack)
    return name


def check_against(against: str) -> str:
    name = str(against).strip().lower()
    if name not in MODELS:
        raise CachevizError("unknown model to attack", f"use one of {', '.join(MODELS)}", param="against",
                            value=against)
    return name


def check_strengths(values: Sequence[float], attack: str) -> tuple[float, ...]:
    """Curve strengths: epsilons and sigmas >= 0, factors > 0, at least one."""
    vals = tuple(float(v) for v in values)
    if not vals or not all(math.isfinite(v) for v in vals):
        raise CachevizError("give at least one finite strength", "e.g. 0,0.01,0.05,0.1", param="epsilons",
                            value=list(values))
    factor = attack in ("brightness", "contrast", "gamma")
    if factor and min(vals) <= 0:
        raise CachevizError(f"{attack} factors must be positive", "e.g. 0.25,0.5,1,1.5,2", param="epsilons",
                            value=list(values))
    if not factor and min(vals) < 0:
        raise CachevizError("strengths cannot be negative", "e.g. 0,0.01,0.05,0.1", param="epsilons",
                            value=list(values))
    return tuple(sorted(set(vals)))


def default_strengths(attack: str) -> tuple[float, ...]:
    if attack == "blur":
        return DEFAULT_SIGMAS
    if attack in ("brightness", "contrast", "gamma"):
        return DEFAULT_FACTORS
    if attack == "l2":
        return tuple(round(10 * e, 6) for e in DEFAULT_EPSILONS)  # an L2 ball over ~3000 values
    return DEFAULT_EPSILONS


# ---------------------------------------------------------------------------------------------
# The three models as differentiable modules


class _ClampST(torch.autograd.Function):
    """Per-channel clamp whose backward is the identity: a Foolbox attack (scalar bounds) keeps
    its gradient while the model only ever sees images a camera could take."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        return torch.maximum(torch.minimum(x, hi), lo)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class Victims:
    """The network, the cache model and the cache-only model of one setup, as functions of the
    normalised input; the cache's keys stay on `memory`'s device."""

    def __init__(self, spec, memory: CacheMemory, layers: Sequence[str], theta: float, lam: float,
                 theta_cache_only: float, device: str | torch.device = "cpu"):
        self.spec, self.memory, self.layers = spec, memory, list(layers)
        self.theta, self.lam, self.theta_cache_only = float(theta), float(lam), float(theta_cache_only)
        self.device = torch.device(device)
        spec.net.to(self.device).eval()
        for p in spec.net.parameters():
            p.requires_grad_(False)
        c = spec.in_channels
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, c, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1).expand(1, c, 1, 1)
        self.lo = ((0 - mean) / std).to(self.device)  # (1, C, 1, 1): a black pixel
        self.hi = ((1 - mean) / std).to(self.device)
        self.classifiers = {
            "network": CacheClassifier(spec, memory, layers, theta, 0.0),
            "cache": CacheClassifier(spec, memory, layers, theta, lam),
            "cache-only": CacheClassifier(spec, memory, layers, theta_cache_only, 1.0),
        }

    @property
    def bounds(self) -> tuple[float, float]:
        """Scalar bounds that hold every channel's range (what Foolbox can take)."""
        return float(self.lo.min()), float(self.hi.max())

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.lo) / (self.hi - self.lo)

    def from_pixels(self, x01: torch.Tensor) -> torch.Tensor:
        return self.lo + x01 * (self.hi - self.lo)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    def probs(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return self.classifiers[which](x)

    def log_probs(self, which: str) -> nn.Module:
        """The model as Foolbox and the gradient attacks take it: x -> log p (clamped per channel)."""
        return _LogProbs(self, which)

    def all_probs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """p_net, p_mem (cache-only) and p of the cache model from ONE network pass and one
        similarity product; no gradient."""
        with torch.no_grad():
            acts = forward_layers(self.spec, x.to(self.device), [*self.layers, "logits"])
            p_net = torch.softmax(acts["logits"], dim=1)
            clf = self.classifiers["cache"]
            sims = clf.query(acts).to(self.memory.device) @ self.memory.keys.T
            p_mem = torch.softmax(self.theta * sims, dim=1) @ self.memory.values
            p_co = p_mem if self.theta_cache_only == self.theta else \
                torch.softmax(self.theta_cache_only * sims, dim=1) @ self.memory.values
            p_mem, p_co = p_mem.to(p_net.device), p_co.to(p_net.device)
            return {"network": p_net, "cache": combine(p_net, p_mem, self.lam), "cache-only": p_co,
                    "p_mem": p_mem}

    def predict(self, which: str, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for s in range(0, len(x), batch):
                out.append(self.probs(which, x[s:s + batch].to(self.device)).argmax(1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=self.device)

    def predict_all(self, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {m: [] for m in MODELS}
        for s in range(0, len(x), batch):
            p = self.all_probs(x[s:s + batch])
            for m in MODELS:
                out[m].append(p[m].argmax(1))
        return {m: torch.cat(v) for m, v in out.items()}


class _LogProbs(nn.Module):
    def __init__(self, victims: Victims, which: str):
        super().__init__()
        self.v, self.which = victims, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _ClampST.apply(x, self.v.lo, self.v.hi)
        # float32's smallest normal: log p is finite; where p_y saturates the gradient is truly 0
        return torch.log(self.v.probs(self.which, x).clamp_min(torch.finfo(torch.float32).tiny))


def input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), labels) / dx, the loss summed over the batch (each image its own gradient)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def rho(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rho_adv per image: |x_adv - x|_2 / |x|_2 in the normalised input space."""
    return (x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Perturbations with one strength per image


def _per_image(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.view(-1, *([1] * (x.ndim - 1))) if v.ndim else v


def fgsm_direction(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return input_gradient(model, x, labels).sign()


def ifgsm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps, clip: Callable,
          steps: int = IFGSM_STEPS, rel_step: float = IFGSM_REL_STEP) -> torch.Tensor:
    """I-FGSM (basic iterative method): `steps` signed-gradient steps of rel_step * eps, each
    projected back into the eps-ball around x and into the image range; eps per image."""
    e = _per_image(eps, x)
    adv = x.clone()
    for _ in range(steps):
        g = input_gradient(model, adv, labels)
        adv = adv + rel_step * e * g.sign()
        adv = clip(torch.minimum(torch.maximum(adv, x - e), x + e))
    return adv.detach()


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders, sigma per image (0 leaves it unchanged).
    The kernel always spans the widest radius reflection allows (min(h, w) - 1), so an image's
    blur never depends on the other images' sigmas in its batch."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(len(x))
    h, w = x.shape[-2:]
    r = min(h, w) - 1
    if float(s.max()) <= 0 or r < 1:
        return x.clone()
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None, :] / s.clamp_min(1e-6)[:, None]) ** 2)  # (N, 2r+1)
    k = k / k.sum(1, keepdim=True)
    k = torch.where((s > 0)[:, None], k, (t == 0).to(x.dtype)[None, :])
    n, c = x.shape[:2]
    # one group per (image, channel): each image its own kernel
    kk = k.repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), kk.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), kk.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def corrupt(spec, x: torch.Tensor, kind: str, factor) -> torch.Tensor:
    """Brightness, contrast or gamma (torchvision's definitions) by `factor` per image, applied
    to the pixels in [0, 1] and normalised again; blur by sigma."""
    if kind == "blur":
        return gaussian_blur(x, factor)
    import torchvision.transforms.functional as TF

    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x01 = (x * std + mean).clamp(0, 1)
    f = torch.as_tensor(factor, dtype=x.dtype, device=x.device).reshape(-1)
    out = torch.empty_like(x01)
    for v in f.unique():
        sel = (f == v) if f.numel() > 1 else torch.ones(len(x), dtype=torch.bool, device=x.device)
        img = x01[sel]
        if kind == "brightness":
            y = TF.adjust_brightness(img, float(v))
        elif kind == "contrast":
            y = TF.adjust_contrast(img, float(v)) if img.shape[1] == 3 else \
                (v * img + (1 - v) * img.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
        elif kind == "gamma":
            y = TF.adjust_gamma(img, float(v))
        else:
            raise CachevizError("unknown corruption", f"use one of {', '.join(CORRUPTIONS)}", param="attack",
                                value=kind)
        out[sel] = y
    return (out - mean) / std


# ---------------------------------------------------------------------------------------------
# Minimal-perturbation search


@dataclass
class MinimalResult:
    """Per image: the adversarial (the clean image where the attack failed), whether the attacked
    model's label flipped, the strength that flipped it (NaN on failure) and rho_adv (NaN too)."""

    x_adv: torch.Tensor  # (N, C, H, W) on the CPU
    success: torch.Tensor  # (N,) bool
    strength: torch.Tensor  # (N,) epsilon, sigma or the flipped pixel's index; NaN on failure
    rho: torch.Tensor  # (N,)
    evaluations: int  # images passed through the attacked model (forward passes, gradients aside)
    gradients: int  # images whose input gradient was computed


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def _grid(attack: str, h: int, w: int) -> list[float]:
    if attack == "blur":  # 0.25 ... max(h, w)
        top = float(max(h, w))
        k = int(math.floor(math.log(top / 0.25, GRID_RATIO)))
        return [top / GRID_RATIO ** i for i in range(k, -1, -1)]
    return [MAX_EPSILON / GRID_RATIO ** i for i in range(EPS_GRID_STEPS - 1, -1, -1)]


def _in_fp32(fn):
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with fp32():
            return fn(*args, **kwargs)

    return wrapped


@_in_fp32
def minimal(victims: Victims, against: str, attack: str, x: torch.Tensor, batch: int = 128,
            seed: int = 0, progress: ProgressFn | None = None, hsj: dict | None = None) -> MinimalResult:
    """The smallest perturbation of `attack` that flips `against`'s own label, per image of `x`
    (normalised, on any device). See the module doc for each search."""
    attack, against = check_attack(attack, curve=False), check_against(against)
    dev = victims.device
    x = x.to(dev)
    model = victims.log_probs(against)
    labels = victims.predict(against, x, batch)
    if attack == "pixel":
        return _pixel(victims, against, x, labels, batch, seed, progress)
    if attack == DECISION_ATTACK:
        return _hopskipjump(victims, against, x, labels, batch, seed, progress, **(hsj or {}))
    n = len(x)
    counts = {"evaluations": n, "gradients": 0}
    direction = None
    if attack == "fgsm":
        direction = torch.empty_like(x)
        for sl in _batches(n, batch):
            direction[sl] = fgsm_direction(model, x[sl], labels[sl])
        counts["gradients"] += n

    def perturb(idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if attack == "fgsm":
            return victims.clip(x[idx] + _per_image(s, x[idx]) * direction[idx])
        if attack == "ifgsm":
            counts["gradients"] += IFGSM_STEPS * len(idx)
            return ifgsm(model, x[idx], labels[idx], s, victims.clip)
        return victims.clip(gaussian_blur(x[idx], s))

    def flips(idx: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        advs, flipped = [], []
        for sl in _batches(len(idx), batch):
            a = perturb(idx[sl], s[sl])
            with torch.no_grad():
                flipped.append(victims.probs(against, a).argmax(1) != labels[idx[sl]])
            advs.append(a)
        counts["evaluations"] += len(idx)
        return torch.cat(advs), torch.cat(flipped)

    grid = _grid(attack, *x.shape[-2:])
    lo = torch.zeros(n, device=dev)  # the largest strength known not to flip
    hi = torch.full((n,), float("nan"), device=dev)  # the smallest known to flip
    x_adv = x.clone()
    active = torch.arange(n, device=dev)
    total = len(grid) + BISECT
    for i, s in enumerate(grid):
        if len(active) == 0:
            break
        adv, fl = flips(active, torch.full((len(active),), s, device=dev))
        done = active[fl]
        hi[done], x_adv[done] = s, adv[fl]
        lo[active[~fl]] = s
        active = active[~fl]
        if progress:
            progress(i + 1, total, f"{attack} strength {s:.4g}: {int((~hi.isnan()).sum())}/{n} flipped")
    found = torch.nonzero(~hi.isnan()).flatten()
    for j in range(BISECT):
        if len(found) == 0:
            break
        mid = (lo[found] + hi[found]) / 2
        adv, fl = flips(found, mid)
        hi[found[fl]], x_adv[found[fl]] = mid[fl], adv[fl]
        lo[found[~fl]] = mid[~fl]
        if progress:
            progress(len(grid) + j + 1, total, f"{attack}: refining the {len(found)} flips")
    success = ~hi.isnan()
    r = torch.where(success, rho(x_adv, x), torch.full_like(hi, float("nan")))
    return MinimalResult(x_adv.cpu(), success.cpu(), hi.cpu(), r.cpu(), counts["evaluations"], counts["gradients"])


def pixel_order(h: int, w: int, seed: int) -> torch.Tensor:
    """The seeded random order the single-pixel attack tries the pixels in."""
    return torch.randperm(h * w, generator=torch.Generator().manual_seed(int(seed)))


def _pixel(victims: Victims, against: str, x: torch.Tensor, labels: torch.Tensor, batch: int, seed: int,
           progress: ProgressFn | None) -> MinimalResult:
    """Every pixel (seeded order), each set to the image's max then its min on all channels,
    until the label flips: `batch` candidate images per forward pass."""
    n, c, h, w = x.shape
    dev = x.device
    order = pixel_order(h, w, seed).to(dev)
    cand_pix = order.repeat_interleave(2)  # candidate k: pixel order[k // 2], max if k even else min
    use_max = (torch.arange(2 * h * w, device=dev) % 2 == 0)
    n_cand = len(cand_pix)
    vmax, vmin = x.flatten(1).amax(1), x.flatten(1).amin(1)
    next_k = torch.zeros(n, dtype=torch.long, device=dev)
    found = torch.full((n,), -1, dtype=torch.long, device=dev)
    evaluations = n
    per = max(1, min(n_cand, batch))  # candidates of one image per pass when few images are left
    while True:
        active = torch.nonzero((found < 0) & (next_k < n_cand)).flatten()
        if len(active) == 0:
            break
        k_each = max(1, min(per, batch // max(1, len(active)) or 1))
        take = active[: max(1, batch // k_each)]
        ks = next_k[take, None] + torch.arange(k_each, device=dev)[None, :]  # (b, k)
        valid = ks < n_cand
        ks = ks.clamp_max(n_cand - 1)
        imgs = x[take].unsqueeze(1).expand(-1, k_each, -1, -1, -1).reshape(-1, c, h * w).clone()
        pix = cand_pix[ks].reshape(-1)
        val = torch.where(use_max[ks], vmax[take, None], vmin[take, None]).reshape(-1)
        imgs[torch.arange(len(pix), device=dev), :, pix] = val[:, None]
        with torch.no_grad():
            pred = victims.probs(against, imgs.view(-1, c, h, w)).argmax(1).view(len(take), k_each)
        evaluations += int(valid.sum())
        hit = (pred != labels[take, None]) & valid
        first = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(take, -1))
        got = first >= 0
        found[take[got]] = ks[got, first[got]]
        next_k[take] += k_each
        if progress:
            progress(int(((found >= 0) | (next_k >= n_cand)).sum()), n, f"single pixel: {int((found >= 0).sum())} flipped")
    success = found >= 0
    x_adv = x.clone().view(n, c, h * w)
    idx = torch.nonzero(success).flatten()
    if len(idx):
        k = found[idx]
        val = torch.where(use_max[k], vmax[idx], vmin[idx])
        x_adv[idx, :, cand_pix[k]] = val[:, None]
    x_adv = x_adv.view(n, c, h, w)
    strength = torch.where(success, cand_pix[found.clamp_min(0)].float(), torch.full((n,), float("nan"), device=dev))
    r = torch.where(success, rho(x_adv, x), torch.full((n,), float("nan"), device=dev))
    return MinimalResult(x_adv.cpu(), success.cpu(), strength.cpu(), r.cpu(), evaluations, 0)


class _Counting(nn.Module):
    """Counts the images a Foolbox attack queries; takes pixels in [0, 1] when `pixels`."""

    def __init__(self, inner: nn.Module, victims: "Victims | None" = None):
        super().__init__()
        self.inner, self.count, self.v = inner, 0, victims

    def forward(self, x):
        self.count += len(x)
        return self.inner(self.v.from_pixels(x) if self.v is not None else x)


def foolbox_model(victims: Victims, which: str):
    """`which` as a Foolbox PyTorchModel over the normalised input (scalar bounds holding every
    channel's range; the model itself clamps each channel)."""
    fb = _foolbox()

    return fb.PyTorchModel(victims.log_probs(which).eval(), bounds=victims.bounds, device=victims.device)


def _hopskipjump(victims: Victims, against: str, x: torch.Tensor, labels: torch.Tensor, batch: int, seed: int,
                 progress: ProgressFn | None, steps: int = HSJ_STEPS, init_evals: int = HSJ_INIT_EVALS,
                 max_evals: int = HSJ_MAX_EVALS) -> MinimalResult:
    """Foolbox's HopSkipJump (L2), a bounded budget: needs only the attacked model's labels.
    It runs on pixels in [0, 1] (Foolbox 3.3's HopSkipJump clips its proposals to [0, 1]
    whatever the model's bounds); its result is taken back to the normalised space."""
    fb = _foolbox()

    torch.manual_seed(seed)
    counting = _Counting(victims.log_probs(against), victims).eval()
    fmodel = fb.PyTorchModel(counting, bounds=(0.0, 1.0), device=victims.device)
    attack = fb.attacks.HopSkipJumpAttack(steps=steps, initial_gradient_eval_steps=init_evals,
                                          max_gradient_eval_steps=max_evals, constraint="l2")
    n = len(x)
    x_adv = x.clone()
    init = fb.attacks.LinearSearchBlendedUniformNoiseAttack(steps=50)
    for sl in _batches(n, batch):
        x01 = victims.to_pixels(x[sl])
        crit = fb.criteria.Misclassification(labels[sl])
        # its own starting points, so that an image no blend of noise flips fails alone, not the batch
        start = init.run(fmodel, x01, crit)
        with torch.no_grad():
            ok = counting(start).argmax(1) != labels[sl]
        if ok.any():
            adv = attack.run(fmodel, x01[ok], fb.criteria.Misclassification(labels[sl][ok]), starting_points=start[ok])
            x_adv[torch.arange(sl.start, sl.stop, device=x.device)[ok]] = victims.clip(victims.from_pixels(adv.detach()))
        if progress:
            progress(sl.stop, n, f"HopSkipJump: {sl.stop}/{n} images, {counting.count:,} queries")
    with torch.no_grad():
        success = victims.predict(against, x_adv, batch) != labels
    x_adv = torch.where(success.view(-1, 1, 1, 1), x_adv, x)
    r = torch.where(success, rho(x_adv, x), torch.full((n,), float("nan"), device=x.device))
    strength = torch.where(success, (x_adv - x).flatten(1).norm(dim=1), torch.full_like(r, float("nan")))
    return MinimalResult(x_adv.cpu(), success.cpu(), strength.cpu(), r.cpu(), counting.count, 0)


# ---------------------------------------------------------------------------------------------
# Curves: a fixed list of strengths


def curve_images(victims: Victims, against: str | None, attack: str, x: torch.Tensor, strengths: Sequence[float],
                 batch: int = 128, progress: ProgressFn | None = None):
    """Yield (strength, perturbed images) for each strength: Foolbox attacks against `against`
    (the whole epsilon list in one call per batch of images), or a corruption that needs no model."""
    attack = check_attack(attack, curve=True)
    strengths = list(strengths)
    x = x.to(victims.device)
    if attack in CORRUPTIONS:
        for i, s in enumerate(strengths):
            out = torch.cat([victims.clip(corrupt(victims.spec, x[sl], attack, s)) for sl in _batches(len(x), batch)])
            if progress:
                progress(i + 1, len(strengths), f"{attack} {s:g}")
            yield s, out
        return
    fb = _foolbox()

    fmodel = foolbox_model(victims, check_against(against))
    labels = victims.predict(against, x, batch)
    fb_attack = {"fgsm": fb.attacks.FGSM(),
                 "ifgsm": fb.attacks.LinfBasicIterativeAttack(steps=IFGSM_STEPS, rel_stepsize=IFGSM_REL_STEP),
                 "l2": fb.attacks.L2BasicIterativeAttack(steps=IFGSM_STEPS, rel_stepsize=IFGSM_REL_STEP)}[attack]
    outs: list[list[torch.Tensor]] = [[] for _ in strengths]
    positive = [e for e in strengths if e > 0]
    for sl in _batches(len(x), batch):
        if positive:
            _, clipped, _ = fb_attack(fmodel, x[sl], fb.criteria.Misclassification(labels[sl]), epsilons=positive)
        it = iter(clipped if positive else [])
        for i, e in enumerate(strengths):
            outs[i].append(x[sl] if e <= 0 else victims.clip(next(it).detach()))
        if progress:
            progress(sl.stop, len(x), f"{attack} against the {against}: {sl.stop}/{len(x)} images")
    for e, parts in zip(strengths, outs):
        yield e, torch.cat(parts)
