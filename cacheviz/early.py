"""Answer early (seed 003): a cache inside the network.

A *truncated* model runs the network only up to layer l and answers from a cache keyed at l
(the cache-only p_mem at its tuned theta; the k-NN vote is reported beside it), skipping the
remaining layers. A *gated* model answers there only when the cache is confident (max p_mem >=
tau) and otherwise runs the rest of the network from l's output, answering with the network's
p_net or, with `mix`, with the cache model's p = (1 - lam) p_net + lam p_mem as the paper does.
A *cascade* tries several exit layers in turn.

Accuracy comes from the engine's kernel (`study.score_keys`: theta, lam tuned on the validation
part for each layer and cache size, class-balanced caches of a fraction of the training set).
Time is measured, never estimated: the passes each model actually runs, on the same images,
alternating with the full network in the same run (median of `reps`), the cache's keys on the
study's device.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import CacheMemory
from .config import Setup
from .data import balanced_subset
from .errors import CachevizError
from .features import net_lock, list_layers
from .models import segments
from .progress import Stage
from .study import KNN_K, Run, Study, rounded, score_keys
from .tuning import accuracy, default_grid
from .workspace import ExperimentData

DEFAULT_FRACTIONS = (0.005, 0.025, 0.1, 1.0)
DEFAULT_TAUS = (0.5, 0.8, 0.9, 0.95, 0.99)
TIMING_IMAGES = 1000
REPS = 3
BATCH = 256
# Default exit layers: the chain's steps from this depth l/L on, before the pooling step.
MIN_EXIT_DEPTH = 0.6


# ---------------------------------------------------------------------------------------------
# Running part of the network


def chain(spec) -> list[tuple[str, Callable]]:
    steps = segments(spec.net)
    if steps is None:
        raise CachevizError(f"{spec.name} cannot answer early here: its forward pass is not a chain of named steps",
                            "use a CIFAR ResNet or digits-cnn", param="model", value=spec.name)
    return steps


def exit_layers(spec) -> list[str]:
    """The layers a pass can stop after and resume from (every step but the logits)."""
    return [name for name, _ in chain(spec)[:-1]]


def default_exit_layers(spec) -> list[str]:
    depth = {i.name: i.depth for i in list_layers(spec)}
    return [n for n in exit_layers(spec) if depth.get(n, 0) >= MIN_EXIT_DEPTH and n != "avgpool"]


@functools.lru_cache(maxsize=16)
def architecture(model: str):
    """A registered model's spec built from its architecture alone (no weights loaded), or None
    when it cannot answer early here (no chain of steps)."""
    from .models import architecture_only, untrained_digits_spec

    spec = untrained_digits_spec() if model == "digits-cnn" else architecture_only(model)
    return None if spec is None or segments(spec.net) is None else spec


def exit_choices(model: str) -> tuple[list[str], list[str]]:
    """(every exit layer, the default ones) of a registered model, from its architecture alone;
    ([], []) for a model that cannot answer early here."""
    spec = architecture(model)
    if spec is None:
        return [], []
    return exit_layers(spec), default_exit_layers(spec)


def check_layers(spec, layers: Sequence[str] | None) -> list[str]:
    if not layers:
        return default_exit_layers(spec)
    ok = exit_layers(spec)
    order = {n: i for i, n in enumerate(ok)}
    bad = [name for name in layers if name not in order]
    if bad:
        raise CachevizError(f"{spec.name} can stop and resume only after {', '.join(ok)}",
                            "choose exit layers from those", param="layers", value=bad)
    return sorted(dict.fromkeys(layers), key=order.get)


def run_span(spec, a: torch.Tensor, start: str | None, stop: str | None) -> torch.Tensor:
    """The network's steps after `start` (None: from the input) up to and including `stop`
    (None: through the logits), applied to `a`, the output of `start`."""
    steps = chain(spec)
    names = [n for n, _ in steps]
    i = 0 if start is None else names.index(start) + 1
    j = len(steps) if stop is None else names.index(stop) + 1
    with net_lock(spec.net):  # another session's tapped pass must not see these modules' calls
        for _, step in steps[i:j]:
            a = step(a)
    return a


def query_key(a: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.flatten(1).float(), dim=1, eps=1e-12)


@dataclass
class Exit:
    """One exit: the cache keyed at `layer` and the thetas tuned for it."""

    layer: str
    memory: CacheMemory
    theta_cache_only: float
    theta: float
    lam: float


def truncated_answer(spec, ex: Exit, x: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Cache-only p_mem (N, C) of the network run only up to `ex.layer`, for normalised x."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            a = run_span(spec, x[s:s + batch], None, ex.layer)
            out.append(ex.memory.p_mem(query_key(a).to(ex.memory.device), ex.theta_cache_only).cpu())
    return torch.cat(out)


def gated_answer(spec, exits: Sequence[Exit], tau: float, x: torch.Tensor, mix: bool = False,
                 batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels (N,), the exit each image took: its position in `exits`, or len(exits)
    for the whole network). At each exit in turn the images still running answer from the
    cache when max p_mem >= tau; the rest run on from that layer's output."""
    preds = torch.empty(len(x), dtype=torch.long)
    where = torch.full((len(x),), len(exits), dtype=torch.long)
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            a = x[s:s + batch]
            alive = torch.arange(s, s + len(a))
            prev = None
            q_last = None
            for k, ex in enumerate(exits):
                a = run_span(spec, a, prev, ex.layer)
                prev = ex.layer
                q = query_key(a).to(ex.memory.device)
                p_co = ex.memory.p_mem(q, ex.theta_cache_only).cpu()
                conf, lab = p_co.max(1)
                done = conf >= tau
                preds[alive[done]] = lab[done]
                where[alive[done]] = k
                keep = ~done
                a, alive, q_last = a[keep.to(a.device)], alive[keep], q[keep.to(q.device)]
                if len(alive) == 0:
                    break
            if len(alive) == 0:
                continue
            if not exits:
                prev = None
            p = torch.softmax(run_span(spec, a, prev, None).float(), dim=1).cpu()
            if mix and exits and q_last is not None:
                last = exits[-1]
                p = (1 - last.lam) * p + last.lam * last.memory.p_mem(q_last, last.theta).cpu()
            preds[alive] = p.argmax(1)
    return preds, where


def gated_predictions(p_net: torch.Tensor, p_mix: torch.Tensor | None, p_co: Sequence[torch.Tensor],
                      tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same decisions as `gated_answer`, from stored probabilities (N, C) of the whole test
    part: p_co per exit (cascade order), the continuation's p_net or mixture p."""
    n = len(p_net)
    preds = (p_mix if p_mix is not None else p_net).argmax(1).clone()
    where = torch.full((n,), len(p_co), dtype=torch.long)
    open_ = torch.ones(n, dtype=torch.bool)
    for k, p in enumerate(p_co):
        conf, lab = p.max(1)
        take = open_ & (conf >= tau)
        preds[take] = lab[take]
        where[take] = k
        open_ &= ~take
    return preds, where


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def timed_runs(fns: dict, device: torch.device, reps: int = REPS) -> dict[object, list[float]]:
    """Seconds of each function in each of `reps` rounds, taking turns (one untimed warm-up each
    first), so drift on the machine hits all of them and round i of two functions is a pair."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(clock(fn, device))
    return times


def timed(fns: dict, device: torch.device, reps: int = REPS) -> dict:
    """Median seconds of each function over `reps` rounds (see `timed_runs`)."""
    return {k: statistics.median(v) for k, v in timed_runs(fns, device, reps).items()}


def speedups(full: list[float], other: list[float]) -> dict:
    """The full pass's time over another's, round by round: the median and the range. A
    configuration counts as faster only when every round says so (speedup_low > 1): on a busy
    2-core machine a single pair of timings of the same work can differ by 10%."""
    r = [f / o for f, o in zip(full, other)]
    return {"speedup": statistics.median(r), "speedup_low": min(r), "speedup_high": max(r)}


def full_answer(spec, x: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([run_span(spec, x[s:s + batch], None, None).cpu() for s in range(0, len(x), batch)])


# ---------------------------------------------------------------------------------------------
# The study


@dataclass(frozen=True)
class Early(Study):
    """The accuracy/latency frontier of answering early. Rows: layer (`full` for the whole
    network; `a>b` for a cascade), cache_fraction, tau (null when ungated), accuracy,
    ms_per_image, exit_share, mode (`full`, `truncated`, `gated`, `cascade`), continue_with,
    knn_accuracy, n_cache, theta (the cache-only theta at the exit), key_dim, speedup (the full
    network's time over this one's, median of the rounds timed in turns) with speedup_low and
    speedup_high (its range over the rounds), timing_images, n_test, net, dataset, seed, device."""

    setup: Setup
    layers: tuple[str, ...] = ()
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    taus: tuple[float, ...] = DEFAULT_TAUS
    mix: bool = False
    timing_images: int = TIMING_IMAGES
    reps: int = REPS
    kind = "early"
    stages = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, "scoring", "timing")

    def __post_init__(self):
        fr = tuple(sorted({float(f) for f in self.fractions}))
        if not fr or fr[0] <= 0 or fr[-1] > 1:
            raise CachevizError("cache sizes are fractions of the training set", "give values in (0, 1], e.g. 0.025,1",
                                param="fractions", value=list(self.fractions))
        taus = tuple(sorted({float(t) for t in self.taus}))
        if any(not (t >= 0 and t < float("inf")) for t in taus):  # above 1: never exits early
            raise CachevizError("tau is a threshold on max p_mem", "give values from 0 to 1, e.g. 0.9,0.99",
                                param="taus", value=list(self.taus))
        if isinstance(self.timing_images, bool) or int(self.timing_images) < 1 or int(self.reps) < 1:
            raise CachevizError("give a positive number of timing images and runs", param="timing_images",
                                value=self.timing_images)
        if self.setup.project_dim:
            raise CachevizError("answering early takes the layers' full keys", "drop the projection (--project-dim)",
                                param="project_dim", value=self.setup.project_dim)
        object.__setattr__(self, "fractions", fr)
        object.__setattr__(self, "taus", taus)
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "layers": list(self.layers), "fractions": list(self.fractions),
                "taus": list(self.taus), "mix": bool(self.mix), "timing_images": int(self.timing_images),
                "reps": int(self.reps)}

    def compute(self, run: Run) -> list[dict]:
        ws = run.prepare(self.setup)
        spec = ws.spec
        layers = check_layers(spec, self.layers)
        data = ExperimentData(ws, layers, run.progress)
        thetas, lams = default_grid(self.setup.n_theta, self.setup.n_lam, self.setup.theta_max)
        y_universe = ws.ds.train_y[data.train_u]
        dims = {i.name: i.dim for i in list_layers(spec)}
        n_t = min(int(self.timing_images), len(data.y_test))
        # a class-balanced sample: the test folder is stored class by class, and a gate's exit
        # rate (so its time) depends on the class
        pick = balanced_subset(ws.ds.test_y[ws.split.test_idx], n_t, self.setup.seed)
        x_t = spec.preprocess(ws.ds.test_x[ws.split.test_idx[pick]].to(ws.device))
        common = {"net": spec.name, "dataset": self.setup.dataset, "seed": self.setup.seed, "device": run.device_name,
                  "timing_images": n_t, "n_test": len(data.y_test)}
        cont = "cache" if self.mix else "network"
        p_net, y = data.p_test.cpu(), data.y_test

        run.progress.stage("scoring")
        scores: dict[tuple[str, float], tuple] = {}
        todo = [(layer, f) for f in self.fractions for layer in layers]
        for i, (layer, frac) in enumerate(todo):
            n = max(len(ws.ds.classes), int(round(frac * len(y_universe))))
            subset = balanced_subset(y_universe, n, self.setup.seed)
            sc = score_keys(data, [layer], thetas, lams, subset=subset, knn_k=KNN_K, keep_memory=True)
            scores[(layer, frac)] = (sc, Exit(layer, sc.memory, sc.theta_cache_only, sc.theta, sc.lam))
            run.progress.step(i + 1, len(todo), f"{layer}, {frac:.1%} of the training set")
        data.release()

        run.progress.stage("timing")
        all_full = timed_runs({"full": lambda: full_answer(spec, x_t)}, ws.device, self.reps)["full"]
        t_full = statistics.median(all_full)
        base = accuracy(p_net, y)
        rows = [{**common, "layer": "full", "cache_fraction": None, "tau": None, "mode": "full", "continue_with": None,
                 "accuracy": base, "ms_per_image": 1e3 * t_full / n_t, "exit_share": 0.0, "knn_accuracy": None,
                 "n_cache": 0, "theta": None, "key_dim": None, "speedup": 1.0, "speedup_low": 1.0,
                 "speedup_high": 1.0}]
        n_timed = len(todo) + len(self.fractions) * (len(layers) > 1)
        done = 0

        def tick(what: str) -> None:
            nonlocal done
            done += 1
            run.progress.step(done, n_timed, what)

        for layer, frac in todo:
            sc, ex = scores[(layer, frac)]
            # the full pass, the truncated model and each gate, timed in turns in one group
            fns = {"full": lambda: full_answer(spec, x_t), "truncated": lambda ex=ex: truncated_answer(spec, ex, x_t)}
            fns.update({tau: (lambda ex=ex, tau=tau: gated_answer(spec, [ex], tau, x_t, self.mix)) for tau in self.taus})
            runs = timed_runs(fns, ws.device, self.reps)
            all_full += runs["full"]
            t = {k: statistics.median(v) for k, v in runs.items()}
            one = {**common, "layer": layer, "cache_fraction": frac, "n_cache": sc.n_cache, "theta": sc.theta_cache_only,
                   "key_dim": dims.get(layer)}
            rows.append({**one, "tau": None, "mode": "truncated", "continue_with": None, "accuracy": sc.cache_only_acc,
                         "ms_per_image": 1e3 * t["truncated"] / n_t, "exit_share": 1.0, "knn_accuracy": sc.knn_acc,
                         **speedups(runs["full"], runs["truncated"])})  # against the full pass timed beside it
            for tau in self.taus:
                preds, where = gated_predictions(sc.p_net, sc.p if self.mix else None, [sc.p_cache_only], tau)
                rows.append({**one, "tau": tau, "mode": "gated", "continue_with": cont,
                             "accuracy": float((preds == y).float().mean()), "ms_per_image": 1e3 * t[tau] / n_t,
                             "exit_share": float((where == 0).float().mean()), "knn_accuracy": None,
                             **speedups(runs["full"], runs[tau])})
            tick(f"{layer}, {frac:.1%}")
        if len(layers) > 1:
            for frac in self.fractions:
                exs = [scores[(layer, frac)] for layer in layers]
                last = exs[-1][0]
                fns = {"full": lambda: full_answer(spec, x_t)}
                fns.update({tau: (lambda tau=tau, exs=exs: gated_answer(spec, [e for _, e in exs], tau, x_t, self.mix))
                            for tau in self.taus})
                runs = timed_runs(fns, ws.device, self.reps)
                all_full += runs["full"]
                t = {k: statistics.median(v) for k, v in runs.items()}
                for tau in self.taus:
                    preds, where = gated_predictions(last.p_net, last.p if self.mix else None,
                                                     [sc.p_cache_only for sc, _ in exs], tau)
                    rows.append({**common, "layer": ">".join(layers), "cache_fraction": frac, "tau": tau,
                                 "mode": "cascade", "continue_with": cont, "accuracy": float((preds == y).float().mean()),
                                 "ms_per_image": 1e3 * t[tau] / n_t,
                                 "exit_share": float((where < len(layers)).float().mean()), "knn_accuracy": None,
                                 "n_cache": last.n_cache, "theta": None, "key_dim": None,
                                 **speedups(runs["full"], runs[tau])})
                tick(f"cascade, {frac:.1%}")
        # the network's own row: every full pass of the run (each speed-up is against its own group's)
        rows[0]["ms_per_image"] = 1e3 * statistics.median(all_full) / n_t
        for r in rows:
            r["ms_per_image"] = float(f"{r['ms_per_image']:.4g}")
            for k in ("speedup", "speedup_low", "speedup_high"):
                r[k] = float(f"{r[k]:.4g}")
        return [rounded(r) for r in rows]


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both accuracy and time (the Pareto front), fastest first."""
    pts = sorted(rows, key=lambda r: (r["ms_per_image"], -r["accuracy"]))
    out, best = [], -1.0
    for r in pts:
        if r["accuracy"] > best:
            out.append(r)
            best = r["accuracy"]
    return out
