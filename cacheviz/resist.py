"""Why the cache resists: one test image, its FGSM / I-FGSM adversarial at one epsilon, and what
the network and the cache make of both, for the app's "Why it resists" page.

Everything is computed from the normalised tensors themselves. The Neighbours page's query goes
through uint8 pixels (`retrieval.make_query`); an adversarial must not, since rounding to 1/255
would erase a perturbation smaller than half a grey level, which is where the interesting
epsilons of a real network lie.

As in `attacks`, the label attacked is the attacked model's own prediction on the clean image,
and perturbed images are clipped per channel to the range a real image can take.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from . import attacks as A
from .errors import CachevizError
from .features import forward_layers
from .retrieval import CacheIndex, Explanation, Query, explain, p_mem_from_similarities
from .robustness import PAPER_N, attack_sample

ATTACKS = A.GRADIENT_ATTACKS  # what the page offers: one epsilon, one gradient attack
NEIGHBOURS = 12
# The amplified perturbation maps the largest |delta| to this far from mid-grey, so the
# perturbation always fills the image's contrast whatever epsilon is.
AMPLIFY_TO = 0.5


@dataclass
class Side:
    """One image (clean or adversarial) as every model and the cache see it."""

    x: torch.Tensor  # (1, C, H, W) normalised, on the CPU
    image: np.ndarray  # (H, W, 3) uint8, the pixels the network gets
    explanation: Explanation  # p_net, p_mem (at the cache's theta), p, and the top-k neighbours
    p_only: np.ndarray  # (C,) the cache-only model's p_mem, at its own theta
    truth: int

    @property
    def preds(self) -> dict[str, int]:
        ex = self.explanation
        return {"network": ex.pred_net, "cache": ex.pred, "cache-only": int(self.p_only.argmax()), "p_mem": ex.pred_mem}

    @property
    def true_neighbours(self) -> int:
        """How many of the top-k neighbours carry the true label."""
        return int((np.asarray(self.explanation.labels) == self.truth).sum())

    @property
    def true_share(self) -> float:
        return self.true_neighbours / max(1, len(self.explanation.labels))


@dataclass
class Comparison:
    """A clean image and its adversarial at one epsilon."""

    attack: str
    against: str
    eps: float  # in the normalised input space
    target: int  # the label attacked: `against`'s prediction on the clean image
    clean: Side
    adv: Side
    rho: float  # |x_adv - x|_2 / |x|_2 in the normalised space
    max_delta: float  # max |x_adv - x| in [0, 1] pixel units
    delta_image: np.ndarray  # (H, W, 3) uint8: mid-grey where nothing changed
    factor: float  # how much `delta_image` amplifies the perturbation

    @property
    def flipped(self) -> bool:
        """Did the attacked model's answer change?"""
        return self.adv.preds[self.against] != self.target


def to_image(victims: A.Victims, x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) normalised -> (H, W, 3) uint8 pixels (gray repeated)."""
    x01 = victims.to_pixels(x.to(victims.lo.device))[0].clamp(0, 1)
    img = (x01 * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def amplified(victims: A.Victims, x_adv: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """The perturbation in pixel units drawn around mid-grey: (image, factor, max |delta|)."""
    d = (victims.to_pixels(x_adv.to(victims.lo.device)) - victims.to_pixels(x.to(victims.lo.device)))[0]
    top = float(d.abs().max())
    factor = AMPLIFY_TO / top if top > 0 else 1.0
    img = ((0.5 + factor * d).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return (np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img), factor, top


def query_of(victims: A.Victims, index: CacheIndex, x: torch.Tensor) -> Query:
    """The cache's query for normalised `x` (1, C, H, W): its key, p_net and similarity to
    every stored row, with no pass through uint8."""
    with torch.no_grad():
        acts = forward_layers(victims.spec, x.to(victims.device), [*victims.layers, "logits"])
        q = victims.classifiers["cache"].query(acts)
        sims = q.to(index.memory.device, index.memory.keys.dtype) @ index.memory.keys.T
        p_net = torch.softmax(acts["logits"], dim=1)
    return Query(list(index.layers), q[0].cpu(), p_net[0].float().cpu().numpy(), sims[0].float().cpu())


def side(victims: A.Victims, index: CacheIndex, x: torch.Tensor, truth: int, k: int = NEIGHBOURS) -> Side:
    query = query_of(victims, index, x)
    ex = explain(index, query, victims.theta, victims.lam, k=k)
    p_only = p_mem_from_similarities(query.sims, index.memory.values, victims.theta_cache_only).cpu().numpy()
    return Side(x.detach().cpu(), to_image(victims, x), ex, p_only, int(truth))


def check(attack: str, against: str, eps: float) -> tuple[str, str, float]:
    attack = str(attack).strip().lower()
    if attack not in ATTACKS:
        raise CachevizError("this view shows one gradient attack at a time", f"use one of {', '.join(ATTACKS)}",
                            param="attack", value=attack)
    eps = float(eps)
    if not 0.0 <= eps <= A.MAX_EPSILON:
        raise CachevizError(f"epsilon must lie between 0 and {A.MAX_EPSILON:g}", param="epsilons", value=eps)
    return attack, A.check_against(against), eps


def target_label(victims: A.Victims, against: str, x: torch.Tensor) -> torch.Tensor:
    return victims.predict(against, x.to(victims.device))


def perturb(victims: A.Victims, x: torch.Tensor, attack: str, against: str, eps: float,
            direction: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """x_adv of one attack at one epsilon, clipped to real images; FGSM reuses `direction`
    (its signed gradient at x) when given."""
    attack, against, eps = check(attack, against, eps)
    x = x.to(victims.device)
    if eps == 0:
        return x.clone()
    if target is None:
        target = target_label(victims, against, x)
    model = victims.log_probs(against)
    if attack == "fgsm":
        if direction is None:
            direction = A.fgsm_direction(model, x, target)
        return victims.clip(x + eps * direction.to(x.device)).detach()
    return A.ifgsm(model, x, target, eps, victims.clip)


def compare(victims: A.Victims, index: CacheIndex, x: torch.Tensor, truth: int, attack: str, against: str,
            eps: float, k: int = NEIGHBOURS, direction: torch.Tensor | None = None,
            target: torch.Tensor | None = None, clean: Side | None = None) -> Comparison:
    """The clean image `x` (1, C, H, W, normalised) and its adversarial at `eps`, each with
    p_net, p_mem, p, the cache-only model's answer and the top-k neighbours. `direction`,
    `target` and `clean`, when given, are what this would compute for them."""
    attack, against, eps = check(attack, against, eps)
    if target is None:
        target = target_label(victims, against, x)
    x_adv = perturb(victims, x, attack, against, eps, direction, target)
    clean = clean if clean is not None else side(victims, index, x, truth, k)
    adv = side(victims, index, x_adv, truth, k)
    delta_image, factor, top = amplified(victims, x_adv, x)
    r = float(A.rho(x_adv.cpu(), x.cpu())[0])
    return Comparison(attack, against, eps, int(target[0]), clean, adv, r, top, delta_image, factor)


class Lab:
    """One setup's three models, its test-time cache and test images, for many slider moves.

    The clean side of each image and FGSM's signed gradient per (image, model attacked) are
    kept, so moving the FGSM epsilon slider costs one forward pass. One lock: the network's
    forward hooks are not safe to share between threads."""

    KEEP = 64

    def __init__(self, ws, index: CacheIndex, theta: float, lam: float, theta_cache_only: float):
        self.ws, self.index = ws, index
        self.victims = A.Victims(ws.spec, index.memory, index.layers, theta, lam, theta_cache_only, device=ws.device)
        self.classes = list(ws.ds.classes)
        self._lock = threading.Lock()
        self._directions: OrderedDict = OrderedDict()
        self._clean: OrderedDict = OrderedDict()
        self._targets: OrderedDict = OrderedDict()
        self._results: OrderedDict = OrderedDict()  # a slider moved back costs nothing

    def sample(self, n: int = PAPER_N, seed: int = 0) -> list[int]:
        """The first `n` images the robustness lab attacks with `seed` (all the test part if fewer)."""
        idx = self.ws.split.test_idx
        return [int(i) for i in attack_sample(idx, min(int(n), len(idx)), seed)]

    def image(self, test_idx: int) -> tuple[torch.Tensor, int]:
        i = int(test_idx)
        if not 0 <= i < len(self.ws.ds.test_y):
            raise CachevizError(f"no such test image (the test set holds {len(self.ws.ds.test_y)})", param="test_idx",
                                value=i)
        x = self.ws.spec.preprocess(self.ws.ds.test_x[i : i + 1]).to(self.victims.device)
        return x, int(self.ws.ds.test_y[i])

    def _kept(self, store: OrderedDict, key, make):
        if key in store:
            store.move_to_end(key)
            return store[key]
        value = store[key] = make()
        while len(store) > self.KEEP:
            store.popitem(last=False)
        return value

    def compare(self, test_idx: int, attack: str, against: str, eps: float, k: int = NEIGHBOURS) -> Comparison:
        attack, against, eps = check(attack, against, eps)
        i = int(test_idx)
        x, truth = self.image(i)
        with self._lock:
            return self._kept(self._results, (i, attack, against, eps, k),
                              lambda: self._compare(i, x, truth, attack, against, eps, k))

    def _compare(self, i: int, x: torch.Tensor, truth: int, attack: str, against: str, eps: float,
                 k: int) -> Comparison:
        v = self.victims
        clean = self._kept(self._clean, (i, k), lambda: side(v, self.index, x, truth, k))
        target = self._kept(self._targets, (i, against), lambda: target_label(v, against, x))
        direction = None
        if attack == "fgsm":
            direction = self._kept(self._directions, (i, against),
                                   lambda: A.fgsm_direction(v.log_probs(against), x, target))
        return compare(v, self.index, x, truth, attack, against, eps, k, direction, target, clean)

    def clean(self, test_idx: int, k: int = NEIGHBOURS) -> Side:
        """The clean image as every model and the cache see it (no attack)."""
        x, truth = self.image(test_idx)
        with self._lock:
            return self._kept(self._clean, (int(test_idx), k), lambda: side(self.victims, self.index, x, truth, k))

    def heatmaps(self, test_idx: int) -> dict[str, np.ndarray]:
        """{model: (C, H, W)} |dp_c/dx| summed over channels (`jacobian.heatmaps`)."""
        from .jacobian import heatmaps

        x, _ = self.image(test_idx)
        with self._lock:  # kept: every widget move reruns the page
            return self._kept(self._results, ("heatmaps", int(test_idx)), lambda: heatmaps(self.victims, x))

    def spectrum_at_theta(self, test_idx: int, theta: float) -> np.ndarray:
        """The cache-only model's singular values for this image at another theta."""
        from .jacobian import spectrum_at_theta

        x, _ = self.image(test_idx)
        with self._lock:
            return self._kept(self._results, ("theta", int(test_idx), float(theta)),
                              lambda: spectrum_at_theta(self.victims, x, theta))

    def kept(self) -> dict[str, int]:
        """How many of each kept object the lab holds now."""
        return {"clean": len(self._clean), "directions": len(self._directions), "results": len(self._results)}
