"""Runs the paper's evaluation end to end: data -> model -> features -> cache -> tuning.

Every heavy intermediate (decoded data, per-layer features, results) persists under the data
directory keyed by what determines it, so a second run, or the app, reuses it at once.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__, store
from .cache import CacheMemory
from .config import Setup
from .data import Dataset, Split, load_dataset, make_split
from .errors import CachevizError
from .features import extract, list_layers, make_keys, resolve_layers
from .models import ModelSpec, load_model
from .tuning import accuracy, default_grid, grid_search

ProgressFn = Callable[[int, int, str], None]

STAGES = ("load data", "extract train features", "extract test features", "grid search", "test")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when there is one, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CachevizError(f"Unknown device '{device}'; use cpu, cuda or auto.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachevizError("CUDA was asked for but this machine has no usable GPU; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise CachevizError(f"Unsupported device '{device}'; use cpu, cuda or auto.")
    return dev


@dataclass
class Workspace:
    """A loaded setup: the dataset, the model, the split and the resolved key layers."""

    setup: Setup
    data_dir: Path
    device: torch.device
    ds: Dataset
    spec: ModelSpec
    split: Split
    layers: list[str]
    batch_size: int = 256

    def _feature_meta(self, part: str, idx: torch.Tensor, layer: str, flip: bool) -> dict:
        dims = {i.name: i.dim for i in list_layers(self.spec)}
        pd = self.setup.project_dim
        projected = bool(pd and dims[layer] > pd)
        return {
            "kind": "features",
            "dataset": self.ds.fingerprint,
            "model": self.spec.name,
            "weights": self.spec.weights_id,
            "part": part,
            "items": store.config_hash({"idx": idx.tolist()}),
            "n": len(idx),
            "layer": layer,
            "flip": flip,
            "project_dim": pd if projected else None,
            "projection_seed": self.setup.seed if projected else None,
            "projection": "sign-sketch" if projected else None,
            "format": store.FORMAT_VERSION,
        }

    def features(
        self,
        part: str,
        idx: torch.Tensor,
        layers: list[str],
        flip: bool = False,
        progress: ProgressFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """{layer: (N', d)} for items `idx` of `part`; stored layers load, the rest come from ONE pass."""
        out: dict[str, torch.Tensor] = {}
        metas = {}
        for layer in layers:
            meta = self._feature_meta(part, idx, layer, flip)
            metas[layer] = meta
            hit = store.load_tensors(self._feature_path(layer, meta), expect_meta=meta)
            if hit is not None:
                out[layer] = hit[0]["x"]
        missing = [l for l in layers if l not in out]
        if missing:
            images = (self.ds.train_x if part == "train" else self.ds.test_x)[idx]
            got = extract(
                self.spec, images, missing, batch_size=self.batch_size, device=self.device,
                flip=flip, project_dim=self.setup.project_dim, seed=self.setup.seed, progress=progress,
            )
            for layer, x in got.items():
                store.save_tensors(self._feature_path(layer, metas[layer]), {"x": x}, metas[layer])
            out.update(got)
        elif progress:
            progress(len(idx), len(idx), "features loaded from the store")
        return out

    def _feature_path(self, layer: str, meta: dict) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.spec.name}-{layer}")
        return self.data_dir / "features" / f"{slug}-{store.config_hash(meta)}.safetensors"


def prepare(
    setup: Setup,
    data_dir: str | Path,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
) -> Workspace:
    """Load data and model and check they fit together."""
    if batch_size < 1:
        raise CachevizError(f"batch-size must be a positive whole number; got {batch_size}.")
    data_dir = Path(data_dir)
    dev = resolve_device(device)
    ds = load_dataset(setup.dataset, data_dir, progress=progress)
    spec = load_model(setup.model, data_dir, checkpoint=setup.checkpoint, progress=progress)
    if spec.classes is not None and len(spec.classes) != len(ds.classes):
        raise CachevizError(
            f"{spec.name} predicts {len(spec.classes)} classes but {setup.dataset} has {len(ds.classes)}; "
            f"choose a model trained on {setup.dataset} or pass --checkpoint with one."
        )
    layers = resolve_layers(spec, list(setup.layers) or None)
    split = make_split(
        ds, seed=setup.seed, val_from_train=setup.val_from_train, val_fraction=setup.val_fraction,
        train_limit=setup.train_limit, test_limit=setup.test_limit,
    )
    return Workspace(setup, data_dir, dev, ds, spec, split, layers, batch_size)


def _rows(universe: torch.Tensor, idx: torch.Tensor, flip: bool) -> torch.Tensor:
    """Rows of features extracted for sorted `universe` (+ flips after) that hold items `idx`."""
    pos = torch.searchsorted(universe, idx)
    return torch.cat([pos, pos + len(universe)]) if flip else pos


class ExperimentData:
    """An experiment's queries and caches for any set of key layers, from ONE extraction.

    Extracts (or loads) `layers` for the training items — the test-time cache, a superset of
    the tuning cache, plus the validation items when they come from the training set — and
    for the test items. Then `queries(layers)` and `memory(layers, part)` serve any subset of
    those layers, so evaluate, the layer sweep and the cache-size sweep share one code path.
    """

    def __init__(self, ws: Workspace, layers: list[str], progress: ProgressFn | None = None,
                 on_stage: Callable[[str], None] | None = None):
        sp, flip = ws.split, ws.setup.flip
        self.ws, self.flip = ws, flip
        self.from_train = sp.val_part == "train"
        self.train_u = sp.cache_test_idx
        self.tf = ws.features("train", self.train_u, layers + (["logits"] if self.from_train else []),
                              flip=flip, progress=progress)
        if on_stage:
            on_stage("extract test features")
        self.test_u = sp.test_idx if self.from_train else torch.unique(torch.cat([sp.test_idx, sp.val_idx]))
        self.qf = ws.features("test", self.test_u, layers + ["logits"], progress=progress)
        y_train = ws.ds.train_y[self.train_u]
        self.y_cache = torch.cat([y_train, y_train]) if flip else y_train
        self.n_classes = len(ws.ds.classes)
        p_test_all = torch.softmax(self.qf["logits"], dim=1)
        self.baseline_acc_all_test = accuracy(p_test_all, ws.ds.test_y[self.test_u])
        self.trow = _rows(self.test_u, sp.test_idx, False)
        self.p_test, self.y_test = p_test_all[self.trow], ws.ds.test_y[sp.test_idx]
        if self.from_train:
            self.vrows = _rows(self.train_u, sp.val_idx, flip=False)
            self.p_val = torch.softmax(self.tf["logits"][self.vrows], dim=1)
            self.y_val = ws.ds.train_y[sp.val_idx]
            self.val_cache_rows = _rows(self.train_u, sp.cache_val_idx, flip)
        else:
            self.vrows = _rows(self.test_u, sp.val_idx, False)
            self.p_val, self.y_val = p_test_all[self.vrows], ws.ds.test_y[sp.val_idx]
            self.val_cache_rows = torch.arange(len(self.y_cache))

    def queries(self, layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(validation queries, queries for every extracted test item; index with `trow`)."""
        q_test_all = make_keys(self.qf, layers)
        q_val = make_keys(self.tf, layers, rows=self.vrows) if self.from_train else q_test_all[self.vrows]
        return q_val, q_test_all

    def cache_rows(self, part: str, subset: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the training features (flips included) in the `part` ('val'/'test') cache.

        `subset`: positions in the training universe to keep (a smaller cache); its flips follow.
        """
        rows = self.val_cache_rows if part == "val" else torch.arange(len(self.y_cache))
        if subset is not None:
            keep = torch.zeros(len(self.y_cache), dtype=torch.bool)
            keep[_rows(torch.arange(len(self.train_u)), subset, self.flip)] = True
            rows = rows[keep[rows]]
        return rows

    def memory(self, layers: list[str], part: str, subset: torch.Tensor | None = None) -> CacheMemory:
        rows = self.cache_rows(part, subset)
        if len(rows) == 0:
            raise CachevizError("That cache would be empty; use a larger cache size.")
        # keys built straight in class-grouped order, so CacheMemory needs no copy of its own
        rows = rows[torch.argsort(self.y_cache[rows], stable=True)]
        keys = make_keys(self.tf, layers, rows=rows)
        return CacheMemory(keys, self.y_cache[rows], self.n_classes, self.ws.device, order=rows)

    def release(self) -> None:
        """Drop the training features once the caches are built (they can be GBs)."""
        self.tf = {}


def result_path(setup: Setup, data_dir: str | Path) -> Path:
    return Path(data_dir) / "results" / f"evaluate-{store.config_hash(_result_key(setup))}.json"


def _result_key(setup: Setup) -> dict:
    # through JSON, so it compares equal to the copy read back from disk (tuples become lists)
    return json.loads(json.dumps({"kind": "evaluate", "setup": setup.to_dict(), "format": store.FORMAT_VERSION}))


def evaluate(
    setup: Setup,
    data_dir: str | Path,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> dict:
    """Baseline, cache and cache-only accuracy with theta and lam tuned on validation.

    Returns a JSON-able dict (see the README for the fields); persisted under results/.
    """
    resolve_device(device)  # a bad device is an error even when the result is already stored
    path = result_path(setup, data_dir)
    if not force:
        cached = store.load_json(path)
        if cached is not None and cached.get("key") == _result_key(setup):
            return cached["result"]
    t0 = time.perf_counter()
    stage = _Stages(progress)
    stage.begin("load data")
    ws = prepare(setup, data_dir, device, batch_size, progress=stage.inner)
    sp, layers, flip = ws.split, ws.layers, setup.flip

    stage.begin("extract train features")
    data = ExperimentData(ws, layers, progress=stage.inner, on_stage=stage.begin)
    q_val, q_test_all = data.queries(layers)
    p_val, y_val = data.p_val, data.y_val

    stage.begin("grid search")
    thetas, lams = default_grid(setup.n_theta, setup.n_lam)
    mem_val = data.memory(layers, "val")
    grid = grid_search(mem_val, q_val, p_val, y_val, thetas, lams, progress=stage.inner)
    # one cache in memory at a time: the tuning cache goes before the test cache is built
    mem_test = mem_val if not data.from_train else None
    del mem_val
    if mem_test is None:
        mem_test = data.memory(layers, "test")
    data.release()

    stage.begin("test")
    q_test, p_test, y_test = q_test_all[data.trow], data.p_test, data.y_test
    p_cache = torch.empty_like(p_test)
    p_cache_only = torch.empty_like(p_test)
    knn_k = 10
    knn_pred = torch.empty(len(q_test), dtype=torch.long)
    with torch.no_grad():
        for sl, sims in mem_test.iter_similarities(q_test):
            block = mem_test.block(sims)
            pm = block.p_mem(grid.theta)
            p_cache[sl] = ((1 - grid.lam) * p_test[sl].to(pm.device) + grid.lam * pm).cpu()
            p_cache_only[sl] = block.p_mem(grid.theta_cache_only).cpu()
            nn_idx = sims.topk(min(knn_k, len(mem_test)), dim=1).indices
            knn_pred[sl] = mem_test.values[nn_idx].sum(1).argmax(1).cpu()
            stage.inner(sl.stop, len(q_test), "test")
    pred_net, pred_cache = p_test.argmax(1), p_cache.argmax(1)
    result = {
        "baseline_acc": accuracy(p_test, y_test),
        "cache_acc": accuracy(p_cache, y_test),
        "cache_only_acc": accuracy(p_cache_only, y_test),
        "knn_acc": float((knn_pred == y_test).float().mean()),
        "knn_k": knn_k,
        "baseline_acc_val": grid.baseline_acc,
        "cache_acc_val": grid.best_acc,
        "cache_only_acc_val": grid.best_acc_cache_only,
        "baseline_acc_all_test": data.baseline_acc_all_test,
        "theta": grid.theta,
        "lam": grid.lam,
        "theta_cache_only": grid.theta_cache_only,
        "n_fixed": int(((pred_net != y_test) & (pred_cache == y_test)).sum()),
        "n_broken": int(((pred_net == y_test) & (pred_cache != y_test)).sum()),
        "n_cache": len(mem_test),
        "n_cache_val": len(sp.cache_val_idx) * (2 if flip else 1),
        "n_val": len(y_val),
        "n_test": len(y_test),
        "val_part": sp.val_part,
        "dataset": setup.dataset,
        "model": ws.spec.name,
        "layers": layers,
        "key_dim": int(q_test.shape[1]),
        "flip": flip,
        "device": str(ws.device),
        "grid": {
            "thetas": thetas,
            "lams": lams,
            "acc": grid.acc.tolist(),
            "acc_cache_only": grid.acc_cache_only.tolist(),
        },
        "setup": setup.to_dict(),
        "code_version": __version__,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    result = _rounded(result)
    store.save_tensors(
        path.with_suffix(".safetensors"),
        {"test_idx": sp.test_idx, "y": y_test, "pred_net": pred_net, "pred_cache": pred_cache,
         "pred_cache_only": p_cache_only.argmax(1), "p_net": p_test, "p": p_cache},
        _result_key(setup),
    )
    store.atomic_write_json(path, {"key": _result_key(setup), "result": result})
    return result


def _rounded(obj, digits: int = 6):
    """Accuracies are float32 means; six digits is all they hold."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


class _Stages:
    """Turns per-stage progress into one callback: message 'stage: detail', done/total per stage."""

    def __init__(self, progress: ProgressFn | None):
        self.progress = progress
        self.stage = ""

    def begin(self, name: str):
        self.stage = name
        if self.progress:
            self.progress(0, 1, name)

    def inner(self, done: int, total: int, message: str = ""):
        if self.progress:
            self.progress(done, total, self.stage if not message or message == self.stage else f"{self.stage}: {message}")
