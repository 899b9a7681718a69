"""A loaded setup (data, model, split, key layers) and the features one study extracts from it.

Features persist under the data directory keyed by what determines them (dataset fingerprint,
weights' SHA-256, items, layer, flips, projection), so a second study reuses them. On a GPU the
features of one study stay on the device while they fit in half of its free memory: extraction
writes into device tensors and keys, similarities and the grid never leave the device.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import env, store
from .cache import CacheMemory
from .config import Setup
from .data import Dataset, Split, inspect_classes, load_dataset, make_split
from .errors import CachevizError
from .features import OUTPUTS, extract, list_layers, make_keys, resolve_layers
from .models import ModelSpec, load_model
from .progress import ProgressFn, Reporter, Stage, Silent
from .tuning import accuracy

# Feature files on a GPU are written only when extracting took longer than writing would
# (at this many bytes per second): re-extracting there is usually cheaper than disk.
WRITE_BYTES_PER_S = 1e9
# Stored features are a cache of extraction, not results: they stay within this many bytes
# (least recently used go first; CACHEVIZ_FEATURE_BUDGET_GB overrides) and within half of the
# disk's free space, and are not written at all when the disk is nearly full. None: the variable's
# value, read when a study starts (env.feature_budget_bytes), so a bad one breaks no import.
FEATURE_BUDGET_BYTES: int | None = None
DISK_RESERVE_BYTES = 2 * 2**30
# Share of a GPU's free memory one study's features may take before they live on the host.
DEVICE_FEATURE_SHARE = 0.5
# Larger batches buy no speed and can exhaust memory (a whole dataset's activations at once).
MAX_BATCH = 4096


def machine_memory_bytes() -> int:
    """This machine's physical memory (8 GiB assumed where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when there is one, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CachevizError("no such device", "use cpu, cuda or auto", param="device", value=device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachevizError("this machine has no usable GPU", "use cpu", param="device", value=str(device))
    if dev.type not in ("cpu", "cuda"):
        raise CachevizError("unsupported device", "use cpu, cuda or auto", param="device", value=str(device))
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

    @property
    def fingerprints(self) -> dict:
        """What the inputs were: the dataset's fingerprint and the SHA-256 of the weights loaded."""
        return {"dataset": self.ds.fingerprint, "weights": self.spec.weights_id}

    def _feature_meta(self, part: str, idx: torch.Tensor, layer: str, flip: bool) -> dict:
        dims = {i.name: i.dim for i in list_layers(self.spec)}
        pd = self.setup.project_dim
        projected = bool(pd and dims[layer] > pd and layer not in OUTPUTS)
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

    def feature_bytes(self, n_items: int, layers: list[str], flip: bool = False) -> int:
        dims = {i.name: i.dim for i in list_layers(self.spec)}
        pd = self.setup.project_dim
        d = sum(min(dims[name], pd) if pd and name not in OUTPUTS else dims[name] for name in layers)
        return 4 * d * n_items * (2 if flip else 1)

    def feature_device(self, n_bytes: int) -> torch.device:
        """Where `n_bytes` of features should live: the GPU while they fit, else the host."""
        if self.device.type != "cuda":
            return torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if n_bytes <= DEVICE_FEATURE_SHARE * free else torch.device("cpu")

    def features(
        self,
        part: str,
        idx: torch.Tensor,
        layers: list[str],
        flip: bool = False,
        progress: ProgressFn | None = None,
        out_device: torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """{layer: (N', d)} for items `idx` of `part`; stored layers load, the rest come from ONE pass."""
        out_device = out_device or torch.device("cpu")
        out: dict[str, torch.Tensor] = {}
        metas = {}
        for layer in layers:
            meta = self._feature_meta(part, idx, layer, flip)
            metas[layer] = meta
            hit = store.load_tensors(self._feature_path(layer, meta), expect_meta=meta)
            if hit is not None:
                store.touch(self._feature_path(layer, meta))
                out[layer] = hit[0]["x"].to(out_device)
        missing = [l for l in layers if l not in out]
        if missing:
            images = (self.ds.train_x if part == "train" else self.ds.test_x)[idx]
            t0 = time.perf_counter()
            got = extract(
                self.spec, images, missing, batch_size=self.batch_size, device=self.device,
                flip=flip, project_dim=self.setup.project_dim, seed=self.setup.seed, progress=progress,
                out_device=out_device,
            )
            seconds = time.perf_counter() - t0
            n_bytes = sum(x.numel() * 4 for x in got.values())
            if self.device.type == "cpu" or seconds > n_bytes / WRITE_BYTES_PER_S:
                self._store_features(got, metas, n_bytes)
            out.update(got)
        elif progress:
            progress(len(idx), len(idx), "features loaded from the store")
        return out

    def _store_features(self, got: dict[str, torch.Tensor], metas: dict, n_bytes: int) -> None:
        folder = self.data_dir / "features"
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free - n_bytes < DISK_RESERVE_BYTES:
            warnings.warn(
                f"features not stored: the disk under {folder} is nearly full "
                "(free some space to reuse features across studies)", stacklevel=3)
            return
        paths = {layer: self._feature_path(layer, metas[layer]) for layer in got}
        for layer, x in got.items():
            store.save_tensors(paths[layer], {"x": x}, metas[layer])
        budget = FEATURE_BUDGET_BYTES if FEATURE_BUDGET_BYTES is not None else env.feature_budget_bytes()
        store.prune_lru(folder, budget, keep={str(p) for p in paths.values()}, free_share=0.5)

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
    if not 1 <= batch_size <= MAX_BATCH:
        raise CachevizError(f"give a whole number from 1 to {MAX_BATCH}", param="batch_size", value=batch_size)
    env.feature_budget_bytes()  # a bad setting refused now, not after the features are extracted
    data_dir = Path(data_dir)
    dev = resolve_device(device)
    spec = load_model(setup.model, data_dir, checkpoint=setup.checkpoint, progress=progress)
    # checked from the listing, before decoding writes anything for a dataset that cannot serve
    n_classes, listing = inspect_classes(setup.dataset, data_dir)
    if spec.classes is not None and len(spec.classes) != n_classes:
        raise CachevizError(
            f"{spec.name} predicts {len(spec.classes)} classes but {setup.dataset} has {n_classes}",
            f"choose a model trained on {setup.dataset}", "pass {checkpoint} with one",
            param="model", value=setup.model,
        )
    ds = load_dataset(setup.dataset, data_dir, progress=progress, listing=listing)
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
    those layers, so every study shares one code path. Announces the two extraction stages.
    """

    def __init__(self, ws: Workspace, layers: list[str], progress: Reporter | None = None):
        progress = progress or Silent()
        sp, flip = ws.split, ws.setup.flip
        self.ws, self.flip = ws, flip
        self.from_train = sp.val_part == "train"
        self.train_u = sp.cache_test_idx
        self.test_u = sp.test_idx if self.from_train else torch.unique(torch.cat([sp.test_idx, sp.val_idx]))
        train_layers = layers + (["logits"] if self.from_train else [])
        test_layers = layers + ["logits"]
        n_bytes = (ws.feature_bytes(len(self.train_u), train_layers, flip)
                   + ws.feature_bytes(len(self.test_u), test_layers))
        self.device = ws.feature_device(n_bytes)
        progress.stage(Stage.TRAIN_FEATURES)
        self.tf = ws.features("train", self.train_u, train_layers, flip=flip, progress=progress.step,
                              out_device=self.device)
        progress.stage(Stage.TEST_FEATURES)
        self.qf = ws.features("test", self.test_u, test_layers, progress=progress.step, out_device=self.device)
        y_train = ws.ds.train_y[self.train_u]
        self.y_cache = torch.cat([y_train, y_train]) if flip else y_train
        self.n_classes = len(ws.ds.classes)
        p_test_all = torch.softmax(self.qf["logits"].float(), dim=1)
        self.baseline_acc_all_test = accuracy(p_test_all, ws.ds.test_y[self.test_u])
        self.trow = _rows(self.test_u, sp.test_idx, False)
        self.p_test, self.y_test = p_test_all[self.trow.to(p_test_all.device)], ws.ds.test_y[sp.test_idx]
        if self.from_train:
            val_flips = bool(ws.setup.val_flips and flip)
            self.vrows = _rows(self.train_u, sp.val_idx, flip=val_flips)
            self.p_val = torch.softmax(self.tf["logits"][self.vrows.to(self.device)], dim=1)
            y_val = ws.ds.train_y[sp.val_idx]
            self.y_val = torch.cat([y_val, y_val]) if val_flips else y_val
            self.val_cache_rows = _rows(self.train_u, sp.cache_val_idx, flip)
        else:
            self.vrows = _rows(self.test_u, sp.val_idx, False)
            self.p_val, self.y_val = p_test_all[self.vrows.to(p_test_all.device)], ws.ds.test_y[sp.val_idx]
            self.val_cache_rows = torch.arange(len(self.y_cache))

    def queries(self, layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(validation queries, test queries) for `layers`, on the features' device."""
        q_test_all = make_keys(self.qf, layers)
        q_val = (make_keys(self.tf, layers, rows=self.vrows) if self.from_train
                 else q_test_all[self.vrows.to(q_test_all.device)])
        return q_val, q_test_all[self.trow.to(q_test_all.device)]

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
            raise CachevizError("That cache would be empty", "use a larger cache size")
        # keys built straight in class-grouped order, so CacheMemory needs no copy of its own
        rows = rows[torch.argsort(self.y_cache[rows], stable=True)]
        keys = make_keys(self.tf, layers, rows=rows)
        return CacheMemory(keys, self.y_cache[rows], self.n_classes, self.ws.device, order=rows)

    def release(self) -> None:
        """Drop the training features once the caches are built (they can be GBs)."""
        self.tf = {}
