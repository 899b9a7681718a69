"""The paper's evaluation as a study: baseline, cache and cache-only accuracy, theta and lam
tuned on validation, and the per-item test predictions the app's Neighbours page picks from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, store
from .config import Setup
from .errors import CachevizError
from .progress import Stage
from .study import KNN_K, Run, Study, rounded, score_keys
from .tuning import default_grid, on_edge
from .workspace import ExperimentData

PICK_TENSORS = ("test_idx", "y", "pred_net", "pred_cache", "pred_cache_only", "p_net", "p")


@dataclass(frozen=True)
class Evaluate(Study):
    """Network vs cache model vs cache-only vs k-NN on one setup (the README lists the fields)."""

    setup: Setup
    kind = "evaluate"
    stages = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, Stage.TUNE, Stage.TEST)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    @property
    def title(self) -> str:
        return f"{self.setup.dataset}/{self.setup.model}/{','.join(self.setup.layers) or 'default keys'}"

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "knn_k": KNN_K}

    def valid(self, result: Any) -> bool:
        return isinstance(result, dict) and all(
            isinstance(result.get(k), float) for k in ("baseline_acc", "cache_acc", "cache_only_acc", "theta", "lam"))

    def load(self, data_dir, key: dict) -> dict | None:
        # the result counts as stored only with its per-item tensors beside it
        result = super().load(data_dir, key)
        if result is None or store.load_tensors(self.path(data_dir, key).with_suffix(".safetensors"), key) is None:
            return None
        return result

    def picks(self, data_dir: str | Path) -> "TestPicks":
        """The per-item test predictions of the stored result."""
        key = self.key(data_dir)
        hit = None if key is None else store.load_tensors(self.path(data_dir, key).with_suffix(".safetensors"), key)
        if hit is None:
            raise CachevizError("This setup has no stored test predictions yet", "build its cache first")
        t = hit[0]
        return TestPicks(test_idx=t["test_idx"].numpy(), y=t["y"].numpy(),
                         pred_net=t["pred_net"].numpy(), pred_cache=t["pred_cache"].numpy())

    def compute(self, run: Run) -> dict:
        t0 = time.perf_counter()
        setup = self.setup
        ws = run.prepare(setup)
        data = ExperimentData(ws, ws.layers, run.progress)
        thetas, lams = default_grid(setup.n_theta, setup.n_lam, setup.theta_max)
        sc = score_keys(data, ws.layers, thetas, lams, knn_k=KNN_K, release=True, progress=run.progress)
        sp, g = ws.split, sc.grid
        run.tensors = {"test_idx": sp.test_idx, "y": sc.y, "pred_net": sc.p_net.argmax(1), "pred_cache": sc.p.argmax(1),
                       "pred_cache_only": sc.p_cache_only.argmax(1), "p_net": sc.p_net, "p": sc.p}
        return rounded({
            "baseline_acc": sc.baseline_acc, "cache_acc": sc.acc, "cache_only_acc": sc.cache_only_acc,
            "knn_acc": sc.knn_acc, "knn_k": KNN_K,
            "baseline_acc_val": g.baseline_acc, "cache_acc_val": g.best_acc, "cache_only_acc_val": g.best_acc_cache_only,
            "baseline_acc_all_test": data.baseline_acc_all_test,
            "theta": float(sc.theta), "lam": float(sc.lam), "theta_cache_only": float(sc.theta_cache_only),
            "theta_on_edge": on_edge(sc.theta, g.thetas), "theta_cache_only_on_edge": on_edge(sc.theta_cache_only, g.thetas),
            "n_fixed": sc.n_fixed, "n_broken": sc.n_broken,
            "n_cache": sc.n_cache, "n_cache_val": sc.n_cache_val, "n_val": len(data.y_val), "n_test": len(sc.y),
            "val_part": sp.val_part, "dataset": setup.dataset, "model": ws.spec.name, "layers": list(ws.layers),
            "key_dim": sc.key_dim, "flip": setup.flip, "device": run.device_name,
            "grid": {"thetas": g.thetas, "lams": g.lams, "acc": g.acc.tolist(), "acc_cache_only": g.acc_cache_only.tolist()},
            "setup": setup.to_dict(), "inputs": ws.fingerprints, "code_version": __version__,
            "seconds": round(time.perf_counter() - t0, 3),
        })


def evaluate(setup: Setup, data_dir: str | Path, device: str = "auto", batch_size: int = 256,
             progress=None, force: bool = False) -> dict:
    """`Evaluate(setup).run(...)`: the stored result, or computed and stored."""
    return Evaluate(setup).run(data_dir, device, progress, force, batch_size)


@dataclass
class TestPicks:
    """Test items of an evaluated setup, by what the network and the cache made of them."""

    test_idx: np.ndarray  # (n,) indices into the dataset's test images
    y: np.ndarray
    pred_net: np.ndarray
    pred_cache: np.ndarray

    def fixed(self) -> np.ndarray:
        """Wrong for the network, right with the cache."""
        return self.test_idx[(self.pred_net != self.y) & (self.pred_cache == self.y)]

    def broken(self) -> np.ndarray:
        """Right for the network, wrong with the cache."""
        return self.test_idx[(self.pred_net == self.y) & (self.pred_cache != self.y)]

    def of_class(self, c: int) -> np.ndarray:
        return self.test_idx[self.y == c]

