"""The contract every experiment follows, and the kernel they share.

A study is one object: `key(data_dir)` (everything that determines its result: its options,
the fingerprint of each dataset and the SHA-256 of each model's weights, the result format),
`stages` (names from `progress.Stage`), `lookup(data_dir)` (the stored result or None; reads
file listings and hashes weights but loads no data or model and computes nothing) and
`run(data_dir, device, progress)`. The CLI and the app are thin adapters over it.

`score_keys` is the kernel every study uses to score one key set: tune theta and lam on the
validation part (or take them as given), build the test-time cache, predict, count the test
items the cache fixed and broke, and the k-NN vote.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from . import __version__, store
from .cache import CacheMemory
from .config import Setup
from .data import dataset_fingerprint
from .locks import build_lock
from .models import weights_fingerprint
from .progress import Prefixed, ProgressFn, Reporter, Silent, Stage, prefixed, reporter
from .tuning import GridResult, LayeredCache, accuracy, grid_search, grid_search_sets, predict, predict_sets
from .workspace import ExperimentData, Workspace, prepare, resolve_device

# Bump when a change to the engine alters what a stored result means or holds.
RESULT_FORMAT = 3
KNN_K = 10


# ---------------------------------------------------------------------------------------------
# The kernel


@dataclass
class KeyScore:
    """One key set scored on the test part: tuned (or given) theta, lam and the predictions."""

    layers: list[str]
    key_dim: int
    n_cache: int
    n_cache_val: int | None  # None when theta, lam were given rather than tuned
    theta: float
    lam: float
    theta_cache_only: float
    grid: GridResult | None
    p_net: torch.Tensor  # (N, C) test items, CPU
    p: torch.Tensor  # (N, C) the cache model's p
    p_cache_only: torch.Tensor  # (N, C) p_mem at theta_cache_only
    knn_pred: torch.Tensor | None  # (N,) k-NN vote labels
    y: torch.Tensor  # (N,) true labels
    memory: CacheMemory | None = None  # the test-time cache, kept only when asked (`keep_memory`)

    @property
    def acc(self) -> float:
        return accuracy(self.p, self.y)

    @property
    def cache_only_acc(self) -> float:
        return accuracy(self.p_cache_only, self.y)

    @property
    def baseline_acc(self) -> float:
        return accuracy(self.p_net, self.y)

    @property
    def knn_acc(self) -> float | None:
        return None if self.knn_pred is None else float((self.knn_pred == self.y).float().mean())

    @property
    def val_acc(self) -> float | None:
        return None if self.grid is None else self.grid.best_acc

    @property
    def n_fixed(self) -> int:
        net, cache = self.p_net.argmax(1), self.p.argmax(1)
        return int(((net != self.y) & (cache == self.y)).sum())

    @property
    def n_broken(self) -> int:
        net, cache = self.p_net.argmax(1), self.p.argmax(1)
        return int(((net == self.y) & (cache != self.y)).sum())


def score_keys(
    data: ExperimentData,
    layers: list[str],
    thetas: Sequence[float] = (),
    lams: Sequence[float] = (),
    given: tuple[float, float, float] | None = None,
    subset: torch.Tensor | None = None,
    knn_k: int = 0,
    release: bool = False,
    progress: Reporter | None = None,
    keep_memory: bool = False,
) -> KeyScore:
    """Score the key set `layers` of `data`: tune on validation, then predict the test part.

    `given` = (theta, lam, theta_cache_only) skips tuning. `subset`: positions in the training
    universe the cache keeps (a smaller cache). `release` drops the training features once the
    test-time cache is built (a study scoring one key set only). One cache is held at a time.
    `progress`: announce the tuning and test stages there (a study scoring one key set).
    `keep_memory`: return the test-time cache too (a study that goes on querying it).
    """
    rep = progress or Silent()
    q_val, q_test = data.queries(layers)
    mem, grid, n_cache_val = None, None, None
    if given is None:
        mem = data.memory(layers, "val", subset)
        n_cache_val = len(mem)
        rep.stage(Stage.TUNE)
        grid = grid_search(mem, q_val, data.p_val, data.y_val, thetas, lams, progress=rep.step)
        theta, lam, theta_co = grid.theta, grid.lam, grid.theta_cache_only
        if data.from_train:  # the test-time cache also holds the validation items
            mem = None
    else:
        theta, lam, theta_co = given
    del q_val
    if mem is None:
        mem = data.memory(layers, "test", subset)
    if release:
        data.release()
    rep.stage(Stage.TEST)
    (p, p_co), knn = predict(mem, q_test, data.p_test, [(theta, lam), (theta_co, 1.0)], knn_k=knn_k,
                             progress=rep.step)
    return KeyScore(
        layers=list(layers), key_dim=int(q_test.shape[1]), n_cache=len(mem), n_cache_val=n_cache_val,
        theta=theta, lam=lam, theta_cache_only=theta_co, grid=grid, p_net=data.p_test.cpu(), p=p,
        p_cache_only=p_co, knn_pred=knn, y=data.y_test, memory=mem if keep_memory else None,
    )


def score_key_sets(
    data: ExperimentData,
    sets: Sequence[Sequence[str]],
    thetas: Sequence[float],
    lams: Sequence[float],
    progress: ProgressFn | None = None,
) -> list[KeyScore]:
    """`score_keys` for many key sets of `data`'s layers at once: each set tuned on validation
    and scored on the test part, from one matrix product per layer and query block for all the
    sets (`tuning.LayeredCache`; the same numbers as `score_keys` up to float rounding). No k-NN
    vote. `progress(done, total, detail)` over the query blocks of tuning, then of testing."""
    sets = [list(s) for s in sets]
    layers = list(dict.fromkeys(name for s in sets for name in s))
    dev = data.device
    feats = {name: data.tf[name] for name in layers}
    val_src = data.tf if data.from_train else data.qf
    q_val = {name: val_src[name][data.vrows.to(dev)] for name in layers}
    q_test = {name: data.qf[name][data.trow.to(dev)] for name in layers}
    val_rows, test_rows = data.cache_rows("val"), data.cache_rows("test")
    val_cache = LayeredCache(feats, val_rows, data.y_cache[val_rows], data.n_classes)
    n_val, n_test = len(data.y_val), len(data.y_test)
    total = n_val + n_test

    def tuning_step(done, _total, _detail=""):
        if progress:
            progress(done, total, "tuning every key set")

    def testing_step(done, _total, _detail=""):
        if progress:
            progress(n_val + done, total, "testing every key set")

    grids = grid_search_sets(val_cache, q_val, data.p_val, data.y_val, sets, thetas, lams, progress=tuning_step)
    del q_val
    # tuning on the test half uses the test-time cache; held-out training items leave the tuning cache
    test_cache = val_cache.regrouped(test_rows, data.y_cache[test_rows]) if data.from_train else val_cache
    outs = predict_sets(test_cache, q_test, data.p_test, sets,
                        [[(g.theta, g.lam), (g.theta_cache_only, 1.0)] for g in grids], progress=testing_step)
    p_net = data.p_test.cpu()
    return [
        KeyScore(layers=s, key_dim=test_cache.dim(s), n_cache=len(test_cache), n_cache_val=len(val_cache),
                 theta=g.theta, lam=g.lam, theta_cache_only=g.theta_cache_only, grid=g, p_net=p_net, p=p,
                 p_cache_only=p_co, knn_pred=None, y=data.y_test)
        for s, g, (p, p_co) in zip(sets, grids, outs)
    ]


# ---------------------------------------------------------------------------------------------
# The contract


@dataclass
class Run:
    """What `Study.compute` gets: where, on what device, how to report, and what it loaded."""

    data_dir: Path
    device: str
    batch_size: int
    progress: Reporter
    inputs: dict = field(default_factory=dict)  # Setup -> fingerprints of what was loaded
    tensors: dict[str, torch.Tensor] | None = None  # per-item results a study stores beside its JSON

    def prepare(self, setup: Setup) -> Workspace:
        self.progress.stage(Stage.LOAD)
        ws = prepare(setup, self.data_dir, self.device, self.batch_size, progress=self.progress.step)
        self.inputs[setup] = ws.fingerprints
        return ws

    @property
    def device_name(self) -> str:
        dev = resolve_device(self.device)
        return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


class Study(ABC):
    """One experiment: a key that cannot go stale, stages, lookup and run (see the module doc)."""

    kind: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    # Bump when a change to one study alters what its results mean (RESULT_FORMAT: all studies).
    version: ClassVar[int] = 1

    @property
    @abstractmethod
    def setups(self) -> tuple[Setup, ...]:
        """The setups whose data and weights the result depends on."""

    @abstractmethod
    def options(self) -> dict:
        """Everything else that determines the result (JSON-able)."""

    @abstractmethod
    def compute(self, run: Run) -> Any:
        """The result (a dict or a list of rows, JSON-able); `run.prepare` loads each setup."""

    def valid(self, result: Any) -> bool:
        """Does a stored result have this study's shape? (Checksums catch edits; this, bad types.)"""
        return isinstance(result, list) and all(isinstance(r, dict) for r in result)

    @property
    def title(self) -> str:
        s = self.setups[0]
        return f"{self.kind} {s.dataset}/{'+'.join(x.model for x in self.setups)}"

    def ident(self) -> str:
        """Names the request (setups as given, checkpoint paths included): one job per ident."""
        return store.config_hash({"kind": self.kind, "options": self.options(),
                                  "setups": [s.to_dict() for s in self.setups]})

    def key(self, data_dir: str | Path, max_age: float = 0.0) -> dict | None:
        """The result's key, or None while a model's weights are not on disk (download or
        training happens in `run`). `max_age`: see `data.dataset_fingerprint`."""
        inputs = []
        for s in self.setups:
            weights = weights_fingerprint(s.model, data_dir, s.checkpoint)
            if weights is None:
                return None
            inputs.append({"dataset": dataset_fingerprint(s.dataset, data_dir, max_age), "weights": weights})
        return self._key(inputs)

    def _key(self, inputs: list[dict]) -> dict:
        return store.canonical_json({"kind": self.kind, "format": RESULT_FORMAT, "version": self.version,
                                     "options": self.options(), "inputs": inputs})

    def path(self, data_dir: str | Path, key: dict) -> Path:
        return Path(data_dir) / "results" / f"{self.kind}-{store.config_hash(key)}.json"

    def lookup(self, data_dir: str | Path, max_age: float = 0.0) -> Any | None:
        """The stored result, or None; never loads data or a model, never computes."""
        key = self.key(data_dir, max_age)
        return None if key is None else self.load(data_dir, key)

    def load(self, data_dir: str | Path, key: dict) -> Any | None:
        path = self.path(data_dir, key)
        # a run killed mid-write after an identical result was stored leaves a temp file that no
        # later writer would meet (the result is found, nothing is written): readers sweep too
        store.sweep_stale_temps(path.parent)
        return store.load_result(path, key, self.valid)

    def run(self, data_dir: str | Path, device: str = "auto", progress: Reporter | ProgressFn | None = None,
            force: bool = False, batch_size: int = 256) -> Any:
        """The stored result, or compute it and store it under the key of what was loaded."""
        resolve_device(device)  # a bad device is an error even when the result is stored
        data_dir = Path(data_dir)
        if not force:
            hit = self.lookup(data_dir)
            if hit is not None:
                return hit
        store.check_data_dir(data_dir)
        rep = reporter(progress)
        # Another process (a second app server, the CLI) may be building the same request on this
        # data directory: wait for it and read what it stored, rather than compute it twice. The
        # ident, not the key: the key is unknown until the weights exist, which the build makes.
        with build_lock(data_dir, ("study", self.kind, self.ident()), rep) as waited:
            if not force or waited:  # a forced run that waited takes the result just computed
                hit = self.lookup(data_dir)
                if hit is not None:
                    return hit
            run = Run(data_dir, device, batch_size, rep)
            result = self.compute(run)
            key = self._key([run.inputs[s] for s in self.setups])
            path = self.path(data_dir, key)
            if run.tensors is not None:  # first, so a result file always has its tensors beside it
                store.save_tensors(path.with_suffix(".safetensors"), run.tensors, key)
            store.save_result(path, key, result, code_version=__version__, device=run.device_name)
            return store.canonical_json(result)


class StudyGroup:
    """Several studies as one job (one per model, say): rows concatenated, each part stored and
    looked up on its own, so adding a model to a figure reuses the parts already stored."""

    def __init__(self, parts: Sequence[tuple[str, Study]]):
        if not parts:
            raise ValueError("a study group needs at least one study")
        self.parts = list(parts)
        self.kind = parts[0][1].kind
        labelled = len(parts) > 1
        self.labels = [label if labelled else "" for label, _ in parts]
        self.stages = tuple(prefixed(lb, s) for lb, (_, st) in zip(self.labels, parts) for s in st.stages)

    @property
    def title(self) -> str:
        s = self.parts[0][1].setups[0]
        return f"{self.kind} {s.dataset}/{'+'.join(st.setups[0].model for _, st in self.parts)}"

    def ident(self) -> str:
        return store.config_hash([st.ident() for _, st in self.parts])

    def key(self, data_dir: str | Path, max_age: float = 0.0) -> list | None:
        keys = [st.key(data_dir, max_age) for _, st in self.parts]
        return None if any(k is None for k in keys) else keys

    def lookup(self, data_dir: str | Path, max_age: float = 0.0) -> list | None:
        rows = []
        for _, st in self.parts:
            part = st.lookup(data_dir, max_age)
            if part is None:
                return None
            rows.extend(part)
        return rows

    def run(self, data_dir: str | Path, device: str = "auto", progress: Reporter | ProgressFn | None = None,
            force: bool = False, batch_size: int = 256) -> list:
        rep = reporter(progress)
        rows = []
        for label, (_, st) in zip(self.labels, self.parts):
            rows.extend(st.run(data_dir, device, Prefixed(rep, label) if label else rep, force, batch_size))
        return rows



def rounded(obj, digits: int = 6):
    """Accuracies are float32 means; six digits is all they hold."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj
