"""The paper's sweeps as studies with tidy rows, one row per setting (Figure 2, Figure 3, Table 1).

Each extracts every layer it needs in ONE forward pass (through `ExperimentData`), scores each
key set with the shared kernel (`study.score_keys`), and returns rows that carry all their
settings, so a CSV or a figure can be remade from the rows alone.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from typing import Sequence

from . import store
from .config import COMBINE_TOP, Setup
from .data import balanced_subset
from .errors import CachevizError
from .features import OUTPUTS, list_layers, resolve_layers
from .progress import Stage
from .study import KeyScore, Run, Study, StudyGroup, rounded, score_key_sets, score_keys
from .tuning import LAM_RANGE, THETA_RANGE, accuracy, default_grid, on_edge
from .workspace import ExperimentData, machine_memory_bytes

# Figure 2 fixes theta and lam to the middle of their ranges.
MIDDLE_THETA = sum(THETA_RANGE) / 2
MIDDLE_LAM = sum(LAM_RANGE) / 2
# All of ResNet20's 21 layers at 1024-d: ~4.3 GB of float32 features for 50k + 10k images.
DEFAULT_SWEEP_DIM = 1024
DEFAULT_FRACTIONS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
EXTRACT = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES)


def _common(run: Run, ws, data: ExperimentData) -> dict:
    return {"model": ws.spec.name, "dataset": ws.setup.dataset, "baseline_acc": accuracy(data.p_test, data.y_test),
            "n_test": len(data.y_test), "device": run.device_name}


@dataclass(frozen=True)
class LayerSweep(Study):
    """Figure 2: each layer alone as keys, theta and lam fixed to the middle (or re-tuned).

    `layers` None: every tappable layer from the input image to the logits; `setup.layers` is
    ignored; `setup.project_dim` (None = exact keys) bounds each layer's key dimension.
    Rows: model, dataset, layer, depth (l/L), dim, full_dim, acc, cache_only_acc, baseline_acc,
    theta, lam, theta_cache_only, retuned, n_cache, n_test, project_dim, device, seconds.
    """

    setup: Setup
    layers: tuple[str, ...] | None = None
    retune: bool = False
    kind = "sweep-layers"
    stages = (*EXTRACT, Stage.LAYERS)

    def __post_init__(self):
        object.__setattr__(self, "setup", self.setup.replace(layers=()))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers) or None)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "layers": list(self.layers) if self.layers else None,
                "retune": self.retune}

    def compute(self, run: Run) -> list[dict]:
        ws = run.prepare(self.setup)
        infos = {i.name: i for i in list_layers(ws.spec)}
        names = list(infos) if not self.layers else resolve_layers(ws.spec, list(self.layers))
        data = ExperimentData(ws, names, run.progress)
        thetas, lams = default_grid(self.setup.n_theta, self.setup.n_lam, self.setup.theta_max)
        given = None if self.retune else (MIDDLE_THETA, MIDDLE_LAM, MIDDLE_THETA)
        common = _common(run, ws, data)
        rows = []
        run.progress.stage(Stage.LAYERS)
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            sc = score_keys(data, [name], thetas, lams, given=given)
            info = infos[name]
            rows.append(rounded({
                **common, "layer": name, "depth": info.depth, "dim": sc.key_dim, "full_dim": info.dim,
                "acc": sc.acc, "cache_only_acc": sc.cache_only_acc, "theta": sc.theta, "lam": sc.lam,
                "theta_cache_only": sc.theta_cache_only, "retuned": self.retune, "n_cache": sc.n_cache,
                "theta_on_edge": bool(self.retune) and on_edge(sc.theta, thetas),
                "project_dim": self.setup.project_dim, "seconds": time.perf_counter() - t0,
            }))
            run.progress.step(i + 1, len(names), name)
        return rows


@dataclass(frozen=True)
class SizeSweep(Study):
    """Figure 3: class-balanced random caches of a fraction of the training items, theta and
    lam re-tuned on validation at each size and seed. Fraction 0 is the network alone.

    Rows: model, dataset, layers, fraction, seed, subset (a hash naming the items drawn),
    n_cache, baseline_acc, cache_acc, cache_only_acc, gain (points), theta, lam, theta_cache_only.
    """

    setup: Setup
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seeds: tuple[int, ...] = (0, 1)
    kind = "sweep-size"
    stages = (*EXTRACT, Stage.SIZES)

    def __post_init__(self):
        fractions = tuple(sorted({float(f) for f in self.fractions}))
        if not fractions or fractions[0] < 0 or fractions[-1] > 1:
            raise CachevizError("cache sizes are fractions of the training set", "give values from 0 to 1, e.g. 0,0.1,1",
                                param="fractions", value=list(self.fractions))
        if not self.seeds:
            raise CachevizError("no seeds given", "give at least one, e.g. 0,1", param="seeds", value=[])
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "fractions": list(self.fractions), "seeds": list(self.seeds)}

    def compute(self, run: Run) -> list[dict]:
        ws = run.prepare(self.setup)
        data = ExperimentData(ws, ws.layers, run.progress)
        thetas, lams = default_grid(self.setup.n_theta, self.setup.n_lam, self.setup.theta_max)
        common = {**_common(run, ws, data), "layers": list(ws.layers)}
        base = common["baseline_acc"]
        y_universe = ws.ds.train_y[data.train_u]
        rows, todo = [], [(f, s) for f in self.fractions for s in self.seeds]
        run.progress.stage(Stage.SIZES)
        for i, (frac, seed) in enumerate(todo):
            n = int(round(frac * len(y_universe)))
            row = {**common, "fraction": frac, "seed": seed}
            if n < len(ws.ds.classes):  # too small to hold every class: the network alone
                row.update(subset=None, n_cache=0, cache_acc=base, cache_only_acc=None, gain=0.0,
                           theta=None, lam=None, theta_cache_only=None, theta_on_edge=False)
            else:
                subset = balanced_subset(y_universe, n, seed)
                sc = score_keys(data, ws.layers, thetas, lams, subset=subset)
                row.update(subset=store.config_hash({"idx": data.train_u[subset].tolist()})[:12], n_cache=sc.n_cache,
                           cache_acc=sc.acc, cache_only_acc=sc.cache_only_acc, gain=100 * (sc.acc - base),
                           theta=sc.theta, lam=sc.lam, theta_cache_only=sc.theta_cache_only,
                           theta_on_edge=on_edge(sc.theta, thetas))
            rows.append(rounded(row))
            run.progress.step(i + 1, len(todo), f"{frac:.0%} of the training set, seed {seed}")
        return rows


# Cache3's candidate layers that may sit in memory at once: this share of the machine's RAM.
CANDIDATE_RAM_SHARE = 0.4


def cache3_candidates(spec) -> list[str]:
    """The layers Cache3 searches: every tappable layer of the last stage of a ResNet (`layerN.*`
    with the largest N: stage 3 of the CIFAR ResNets, all 6 of ResNet20's and 18 of ResNet56's),
    else every hidden layer (neither the input nor the output)."""
    names = [i.name for i in list_layers(spec) if i.name != "input" and i.name not in OUTPUTS]
    stages = sorted({int(m.group(1)) for n in names if (m := re.match(r"layer(\d+)\.", n))})
    if stages:
        return [n for n in names if n.startswith(f"layer{stages[-1]}.")]
    return names


def _groups(layers: list[str], layer_bytes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive groups of `layers` whose features fit `budget` bytes together (one layer may not)."""
    groups: list[list[str]] = []
    used = budget + 1
    for name in layers:
        if used + layer_bytes[name] > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += layer_bytes[name]
    return groups


@dataclass(frozen=True)
class Table1(Study):
    """Table 1: error of baseline / cache / cache-only, plus "Cache3".

    The cache with the setup's key layers (tuned on validation), and Cache3, the best key set on
    validation among: every candidate layer alone (`cache3_candidates`: all of a ResNet's last
    stage), then every pair and triple of the `combine_top` best single layers. With the default
    6 that is every combination of up to three of ResNet20's six stage-3 layers (41 sets); for
    ResNet56, its 18 stage-3 layers alone and the 35 pairs and triples of the best six. Every set
    is scored with theta and lam re-tuned (`study.score_key_sets`); candidates are extracted in
    groups that fit `CANDIDATE_RAM_SHARE` of the machine's memory.
    Rows: model, dataset, variant (baseline, cache, cache-only, cache3), error, val_acc, theta,
    lam, layers, key_dim, n_cache; the cache3 row adds candidates and n_combinations (sets tried).
    """

    setup: Setup
    combine_top: int = COMBINE_TOP
    kind = "table1"
    version = 2  # 2: Cache3's candidates are the whole last stage (1: the six deepest layers)
    stages = (*EXTRACT, Stage.KEY_SETS)

    def __post_init__(self):
        if int(self.combine_top) < 1:
            raise CachevizError("give a positive whole number", param="combine_top", value=self.combine_top)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "combine_top": int(self.combine_top)}

    def compute(self, run: Run) -> list[dict]:
        ws = run.prepare(self.setup)
        thetas, lams = default_grid(self.setup.n_theta, self.setup.n_lam, self.setup.theta_max)
        candidates = cache3_candidates(ws.spec)
        top_n = min(int(self.combine_top), len(candidates))
        combos = [c for size in (2, 3) for c in itertools.combinations(range(top_n), size)]
        total, done = 1 + len(candidates) + len(combos), 0
        n_train, n_test = len(ws.split.cache_test_idx), len(ws.ds.test_y)
        layer_bytes = {n: ws.feature_bytes(n_train, [n], self.setup.flip) + ws.feature_bytes(n_test, [n])
                       for n in dict.fromkeys([*candidates, *ws.layers])}
        budget = int(CANDIDATE_RAM_SHARE * machine_memory_bytes())

        def scored(data: ExperimentData, sets: list[list[str]]) -> list[KeyScore]:
            nonlocal done
            base = done
            run.progress.stage(Stage.KEY_SETS)

            def step(k, n, _detail=""):  # in key sets, scored together: this batch's share so far
                run.progress.step(base + len(sets) * k // max(n, 1), total, f"{len(sets)} key sets of "
                                  f"{', '.join(dict.fromkeys(x for s_ in sets for x in s_))}")

            out = score_key_sets(data, sets, thetas, lams, progress=step)
            done = base + len(sets)
            return out

        singles: list[KeyScore] = []
        for group in _groups(candidates, layer_bytes, budget):
            singles += scored(ExperimentData(ws, group, run.progress), [[n] for n in group])
        singles.sort(key=lambda sc: -sc.val_acc)  # stable: ties keep the shallower layer first
        top = [sc.layers[0] for sc in singles[:top_n]]
        # each set in network order: the order of concatenation changes no similarity, only the name
        sets = [sorted((top[i] for i in c), key=candidates.index) for c in combos]
        main_layers = list(ws.layers)
        both = list(dict.fromkeys([*top, *main_layers]))
        # the default keys with the combinations in one extraction when they fit, else one after the other
        batches = ([(both, [main_layers, *sets])] if sum(layer_bytes[n] for n in both) <= budget
                   else [(main_layers, [main_layers]), (top, sets)])
        main, *pairs = [sc for layers, batch in batches if batch
                        for sc in scored(ExperimentData(ws, layers, run.progress), batch)]
        best = max([*singles, *pairs], key=lambda sc: sc.val_acc)  # first of equals: fewer layers
        common = {"model": ws.spec.name, "dataset": self.setup.dataset, "device": run.device_name}

        def row(variant: str, acc: float, val_acc, sc: KeyScore | None, theta=None, lam=None, **extra) -> dict:
            return rounded({**common, "variant": variant, "error": 1 - acc, "val_acc": val_acc, "theta": theta,
                            "theta_on_edge": on_edge(theta, thetas), "lam": lam, "layers": sc.layers if sc else [],
                            "key_dim": sc.key_dim if sc else None, "n_cache": sc.n_cache if sc else 0, **extra})

        g = main.grid
        return [
            row("baseline", main.baseline_acc, g.baseline_acc, None),
            row("cache", main.acc, g.best_acc, main, main.theta, main.lam),
            row("cache-only", main.cache_only_acc, g.best_acc_cache_only, main, main.theta_cache_only, 1.0),
            row("cache3", best.acc, best.val_acc, best, best.theta, best.lam, candidates=candidates,
                n_combinations=len(singles) + len(pairs)),
        ]


def table1_group(setups: Sequence[Setup], combine_top: int = COMBINE_TOP) -> StudyGroup:
    """Table 1 for several models: one stored study per model, rows concatenated."""
    return StudyGroup([(s.model, Table1(s, combine_top)) for s in setups])
