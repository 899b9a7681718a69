"""The robustness lab as studies: the paper's Tables 2-4 and the strength curves, one row per
model shown the perturbed images, every row carrying all its settings.

`Attack` (minimal perturbation, no `epsilons`): N seeded test images (from the test part, never
the tuning part) attacked against one model (`against`: network, cache, cache-only), the
adversarials shown to all three. Against the network that is Table 2 (gray-box); the row whose
model is the attacked one is Table 3 (white-box); with `source` another network makes the
adversarials and this setup's three models are shown them (Table 4, transfer).

`Curve` (`epsilons` given): the same images perturbed at each strength of a fixed list (Foolbox
attacks with the whole list in one call, or blur / brightness / contrast / gamma), accuracy of
every model with its standard error over the images.

theta, lam are the cache model's tuned values: the setup's `Evaluate` result (computed first
when it is not stored; its key is part of this study's through the same setup).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import attacks as A
from .config import Setup
from .errors import CachevizError
from .experiment import Evaluate
from .progress import Reporter, Stage
from .study import Run, Study, rounded

PAPER_N = 250


class _Within:
    """Another study's stages as details of one stage of this one."""

    def __init__(self, inner: Reporter, stage: str):
        self.inner, self.current = inner, ""
        inner.stage(stage)

    def stage(self, name: str) -> None:
        self.current = name
        self.inner.step(0, 1, name)

    def step(self, done: int, total: int, detail: str = "") -> None:
        self.inner.step(done, total, f"{self.current}: {detail}" if detail else self.current)


def attack_sample(test_idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """N test indices drawn at random (seeded) from the test part, in draw order."""
    if n < 1:
        raise CachevizError("give a positive number of images", param="n", value=n)
    if n > len(test_idx):
        raise CachevizError(f"the test part holds only {len(test_idx)} images", f"use --n {len(test_idx)} or fewer",
                            param="n", value=n)
    g = torch.Generator().manual_seed(int(seed))
    return test_idx[torch.randperm(len(test_idx), generator=g)[:n]]


def load_victims(setup: Setup, run: Run, network_only: bool = False) -> tuple[Any, A.Victims, dict | None]:
    """(workspace, the three models, the Evaluate result) of `setup` on `run`'s device."""
    from .retrieval import build_index

    result = None
    if not network_only:
        result = Evaluate(setup).run(run.data_dir, run.device, _Within(run.progress, Stage.CACHE_MODEL),
                                     batch_size=run.batch_size)
    ws = run.prepare(setup)
    if network_only:
        return ws, A.Victims(ws.spec, None, ws.layers, 1.0, 0.0, 1.0, device=ws.device), None
    index = build_index(ws, progress=run.progress.step)
    v = A.Victims(ws.spec, index.memory, ws.layers, result["theta"], result["lam"], result["theta_cache_only"],
                  device=ws.device)
    return ws, v, result


def _hyper(v: A.Victims, m: str) -> tuple[float | None, float | None]:
    return {"network": (None, None), "cache": (v.theta, v.lam), "cache-only": (v.theta_cache_only, 1.0)}[m]


def pixel_scale(spec) -> float:
    """One step in the normalised space in [0, 1] pixel units (the mean of the channels' stds)."""
    return float(sum(spec.std) / len(spec.std))


@dataclass(frozen=True)
class Attack(Study):
    """Tables 2-4 (see the module doc). Rows: attack, against, model, accuracy, clean_accuracy,
    changed (share of images whose answer the attack changed), success_rate (against `against`),
    rho_adv (mean over successes), rho_adv_median, strength (mean minimal epsilon or sigma over
    successes), epsilon_pixels, n, n_failed, theta, lam, net, source_model, dataset, layers,
    seed, device, seconds, evaluations, gradients."""

    setup: Setup
    attack: str = "fgsm"
    against: str = "network"
    n: int = PAPER_N
    seed: int = 0
    source: Setup | None = None  # Table 4: another network makes the adversarials
    kind = "attack"
    stages = (Stage.CACHE_MODEL, Stage.LOAD, Stage.SOURCE, Stage.ATTACK, Stage.SHOW)

    def __post_init__(self):
        object.__setattr__(self, "attack", A.check_attack(self.attack, curve=False))
        object.__setattr__(self, "against", A.check_against(self.against))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise CachevizError("give a positive number of images", param="n", value=self.n)
        if self.source is not None and self.against != "network":
            raise CachevizError("transfer adversarials are made against the source's network",
                                "use --against network with --source-model", param="against", value=self.against)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,) if self.source is None else (self.setup, self.source)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "attack": self.attack, "against": self.against, "n": self.n,
                "seed": self.seed, "source": None if self.source is None else self.source.identity(),
                "search": {"max_epsilon": A.MAX_EPSILON, "grid_steps": A.EPS_GRID_STEPS, "ratio": A.GRID_RATIO,
                           "bisect": A.BISECT, "ifgsm_steps": A.IFGSM_STEPS, "ifgsm_rel_step": A.IFGSM_REL_STEP,
                           "hsj": [A.HSJ_STEPS, A.HSJ_INIT_EVALS, A.HSJ_MAX_EVALS]}}

    @property
    def title(self) -> str:
        src = f" from {self.source.model}" if self.source else ""
        return f"{self.attack} against the {self.against}{src} · {self.setup.dataset}/{self.setup.model}"

    def compute(self, run: Run) -> list[dict]:
        with A.fp32():
            return self._compute(run)

    def _compute(self, run: Run) -> list[dict]:
        t0 = time.perf_counter()
        ws, victims, result = load_victims(self.setup, run)
        idx = attack_sample(ws.split.test_idx, self.n, self.seed)
        y = ws.ds.test_y[idx].to(victims.device)
        x = ws.spec.preprocess(ws.ds.test_x[idx].to(victims.device))
        maker, source_name = victims, ws.spec.name
        run.progress.stage(Stage.SOURCE)
        if self.source is not None:
            if self.source.dataset != self.setup.dataset:
                raise CachevizError("the source network must be trained on the same dataset",
                                    param="source_model", value=self.source.model)
            _, maker, _ = load_victims(self.source, run, network_only=True)
            source_name = maker.spec.name
        run.progress.stage(Stage.ATTACK)
        res = A.minimal(maker, self.against, self.attack, x, batch=min(run.batch_size, 128), seed=self.seed,
                        progress=run.progress.step)
        run.progress.stage(Stage.SHOW)
        clean = victims.predict_all(x)
        adv = victims.predict_all(res.x_adv.to(victims.device))
        n_ok = int(res.success.sum())
        ok = res.success
        scale = pixel_scale(ws.spec)
        strength = float(res.strength[ok].mean()) if n_ok and self.attack != "pixel" else None
        rows = []
        for m in A.MODELS:
            theta, lam = _hyper(victims, m)
            rows.append(rounded({
                "attack": self.attack, "against": self.against, "model": m,
                "accuracy": float((adv[m] == y).float().mean()),
                "clean_accuracy": float((clean[m] == y).float().mean()),
                "changed": float((adv[m] != clean[m]).float().mean()),
                "success_rate": n_ok / self.n,
                "rho_adv": float(res.rho[ok].mean()) if n_ok else None,
                "rho_adv_median": float(res.rho[ok].median()) if n_ok else None,
                "strength": strength,
                "epsilon_pixels": strength * scale if strength is not None and self.attack in A.GRADIENT_ATTACKS
                else None,
                "n": self.n, "n_failed": self.n - n_ok, "theta": theta, "lam": lam,
                "net": ws.spec.name, "source_model": source_name, "dataset": self.setup.dataset,
                "layers": list(victims.layers), "seed": self.seed, "device": run.device_name,
                "evaluations": res.evaluations, "gradients": res.gradients,
                "seconds": time.perf_counter() - t0,
            }))
        run.tensors = {"test_idx": idx, "y": y.cpu(), "success": res.success, "strength": res.strength,
                       "rho": res.rho, **{f"clean_{m}": clean[m].cpu() for m in A.MODELS},
                       **{f"adv_{m}": adv[m].cpu() for m in A.MODELS}}
        return rows


@dataclass(frozen=True)
class Curve(Study):
    """Strength curves. Rows: attack, against (None for the corruptions), model, epsilon (the
    strength: epsilon, sigma or factor), epsilon_pixels, accuracy, sem, n, theta, lam, net,
    dataset, layers, seed, device."""

    setup: Setup
    attack: str = "fgsm"
    against: str | None = "network"
    epsilons: tuple[float, ...] = A.DEFAULT_EPSILONS
    n: int = PAPER_N
    seed: int = 0
    kind = "curve"
    stages = (Stage.CACHE_MODEL, Stage.LOAD, Stage.ATTACK)

    def __post_init__(self):
        attack = A.check_attack(self.attack, curve=True)
        object.__setattr__(self, "attack", attack)
        object.__setattr__(self, "against", None if attack in A.CORRUPTIONS else A.check_against(self.against or ""))
        object.__setattr__(self, "epsilons", A.check_strengths(self.epsilons, attack))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise CachevizError("give a positive number of images", param="n", value=self.n)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "attack": self.attack, "against": self.against,
                "epsilons": list(self.epsilons), "n": self.n, "seed": self.seed,
                "ifgsm": [A.IFGSM_STEPS, A.IFGSM_REL_STEP]}

    @property
    def title(self) -> str:
        who = f" against the {self.against}" if self.against else ""
        return f"{self.attack} curve{who} · {self.setup.dataset}/{self.setup.model}"

    def compute(self, run: Run) -> list[dict]:
        with A.fp32():
            return self._compute(run)

    def _compute(self, run: Run) -> list[dict]:
        ws, victims, _ = load_victims(self.setup, run)
        idx = attack_sample(ws.split.test_idx, self.n, self.seed)
        y = ws.ds.test_y[idx].to(victims.device)
        x = ws.spec.preprocess(ws.ds.test_x[idx].to(victims.device))
        run.progress.stage(Stage.ATTACK)
        scale = pixel_scale(ws.spec)
        rows = []
        for eps, imgs in A.curve_images(victims, self.against, self.attack, x, self.epsilons,
                                        batch=min(run.batch_size, 128), progress=run.progress.step):
            pred = victims.predict_all(imgs)
            for m in A.MODELS:
                acc = float((pred[m] == y).float().mean())
                theta, lam = _hyper(victims, m)
                rows.append(rounded({
                    "attack": self.attack, "against": self.against, "model": m, "epsilon": float(eps),
                    "epsilon_pixels": float(eps) * scale if self.attack in ("fgsm", "ifgsm", "l2") else None,
                    "accuracy": acc, "sem": math.sqrt(acc * (1 - acc) / self.n), "n": self.n,
                    "theta": theta, "lam": lam, "net": ws.spec.name, "dataset": self.setup.dataset,
                    "layers": list(victims.layers), "seed": self.seed, "device": run.device_name,
                }))
        return rows


def attack_study(setup: Setup, attack: str, against: str = "network", n: int = PAPER_N, seed: int = 0,
                 epsilons=None, source: Setup | None = None) -> Study:
    """The CLI's and the app's entry: a curve when strengths are given, else the minimal search."""
    if epsilons is not None:
        if source is not None:
            raise CachevizError("transfer runs the minimal search", "leave out --epsilons with --source-model",
                                param="source_model", value=source.model)
        return Curve(setup, attack, against, tuple(epsilons), n, seed)
    return Attack(setup, attack, against, n, seed, source)


def stored_attack_tensors(study: Attack, data_dir: str | Path, max_age: float = 0.0) -> dict[str, torch.Tensor] | None:
    from . import store

    key = study.key(data_dir, max_age)
    hit = None if key is None else store.load_tensors(study.path(data_dir, key).with_suffix(".safetensors"), key)
    return None if hit is None else hit[0]
