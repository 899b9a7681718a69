"""Neighbours and explanations: which stored items a query resembles and how they vote.

For one query image the similarities to the whole cache, `s = q K^T` (K,), are computed once
(`make_query`); everything the app shows afterwards follows from them without touching the
network again:

    sigma = softmax(theta * s)          the share of the similarity mass of each stored item
    p_mem = sigma @ V                   (V one-hot labels)
    p     = (1 - lam) p_net + lam p_mem

so moving the theta and lam sliders costs one softmax over K numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .cache import CacheMemory, SimilarityBlock, combine
from .errors import CachevizError
from .features import extract, make_keys, resolve_layers
from .progress import ProgressFn, Reporter, Stage


@dataclass
class CacheIndex:
    """A cache memory plus, for each of its K rows, the training item it came from."""

    layers: list[str]
    memory: CacheMemory  # keys (K, d), one-hot values (K, C)
    train_idx: torch.Tensor  # (K,) index into the dataset's training images
    flipped: torch.Tensor  # (K,) bool: the row holds the horizontal flip of that image
    classes: list[str]

    def __len__(self) -> int:
        return len(self.memory)

    @property
    def labels(self) -> torch.Tensor:
        return self.memory.labels


@dataclass
class Query:
    """One query image against one cache: its key, p_net and its similarity to every row."""

    layers: list[str]
    q: torch.Tensor  # (d,) unit-norm key
    p_net: np.ndarray  # (C,)
    sims: torch.Tensor  # (K,) cosine similarity to each cache row, on the CPU


@dataclass
class Explanation:
    """What the app shows for one query at one (theta, lam)."""

    theta: float
    lam: float
    p_net: np.ndarray  # (C,)
    p_mem: np.ndarray  # (C,)
    p: np.ndarray  # (C,)
    rows: np.ndarray  # (k,) cache rows of the top-k neighbours, most similar first
    train_idx: np.ndarray  # (k,) their training-set indices
    flipped: np.ndarray  # (k,) bool
    labels: np.ndarray  # (k,) their labels
    sims: np.ndarray  # (k,) their cosine similarities
    shares: np.ndarray  # (k,) sigma_k, their share of the similarity mass (sums to <= 1)

    @property
    def pred(self) -> int:
        return int(self.p.argmax())

    @property
    def pred_net(self) -> int:
        return int(self.p_net.argmax())

    @property
    def pred_mem(self) -> int:
        return int(self.p_mem.argmax())


# ---------------------------------------------------------------------------------------------
# Building


def build_index(ws, layers: Sequence[str] | None = None, progress: ProgressFn | None = None) -> CacheIndex:
    """The test-time cache of workspace `ws` (its setup's items and flips) keyed on `layers`.

    `layers` defaults to the setup's key layers; any other list gives the cache a comparison
    needs (same items, other keys). Features come from the store when they are there.
    """
    layers = resolve_layers(ws.spec, list(layers) if layers else list(ws.layers))
    idx = ws.split.cache_test_idx
    flip = bool(ws.setup.flip)
    feats = ws.features("train", idx, layers, flip=flip, progress=progress)
    train_idx = torch.cat([idx, idx]) if flip else idx.clone()
    flipped = torch.zeros(len(train_idx), dtype=torch.bool)
    if flip:
        flipped[len(idx) :] = True
    labels = ws.ds.train_y[train_idx]
    # Rows in class-grouped order, as CacheMemory keeps them, so it needs no copy of the keys;
    # train_idx / flipped follow the same order, so row r of the memory is item train_idx[r].
    rows = torch.argsort(labels, stable=True)
    keys = make_keys(feats, layers, rows=rows)
    del feats
    memory = CacheMemory(keys, labels[rows], n_classes=len(ws.ds.classes), device=ws.device)
    train_idx, flipped = train_idx[rows], flipped[rows]
    order = getattr(memory, "order", None)  # the memory's own regrouping, if it made one (identity here)
    if order is not None:
        train_idx, flipped = train_idx[order.cpu()], flipped[order.cpu()]
    return CacheIndex(layers, memory, train_idx, flipped, list(ws.ds.classes))


def store_cache_features(setup, data_dir, device, progress: Reporter) -> None:
    """Extract (or find) the features of `setup`'s test-time cache items in the store, so
    `build_index` only loads them. A module-level function: it runs in the app's worker."""
    from .workspace import prepare

    progress.stage(Stage.LOAD)
    ws = prepare(setup, data_dir, device, progress=progress.step)
    progress.stage(Stage.TRAIN_FEATURES)
    ws.features("train", ws.split.cache_test_idx, ws.layers, flip=setup.flip, progress=progress.step)


def as_batch(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, C) or (1, H, W, C) uint8 -> a (1, H, W, C) uint8 tensor, the engine's image format."""
    x = torch.as_tensor(np.asarray(image))
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != torch.uint8:
        raise CachevizError(
            f"Give the query as an (H, W, C) uint8 image with C = 1 or 3, not {tuple(x.shape)} {x.dtype}."
        )
    return x.contiguous()


def query_keys(
    spec,
    images: torch.Tensor,
    layers: Sequence[str],
    project_dim: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (N, d) and p_net (N, C) of uint8 images (N, H, W, C) of any size, in one forward pass.

    Same preprocessing, projection and normalisation as the stored cache keys, so a training
    image's key equals its own stored key.
    """
    layers = list(layers)
    wanted = layers + (["logits"] if "logits" not in layers else [])
    feats = extract(spec, images, wanted, batch_size=64, device=device, project_dim=project_dim, seed=seed)
    return make_keys(feats, layers), torch.softmax(feats["logits"], dim=1)


def make_query(ws, index: CacheIndex, image: np.ndarray | torch.Tensor) -> Query:
    """Run the network once on `image` (H, W, C) uint8 and keep its similarity to all of `index`."""
    x = as_batch(image)
    q, p_net = query_keys(
        ws.spec, x, index.layers, project_dim=ws.setup.project_dim, seed=ws.setup.seed, device=ws.device
    )
    with torch.no_grad():
        sims = torch.cat([s for _, s in index.memory.iter_similarities(q)], dim=0)[0]
    return Query(list(index.layers), q[0].cpu(), p_net[0].cpu().numpy(), sims.float().cpu())


# ---------------------------------------------------------------------------------------------
# Explaining


def shares(sims: torch.Tensor, theta: float) -> torch.Tensor:
    """sigma = softmax(theta * sims) along the last axis: each stored item's share of the mass."""
    if theta <= 0:
        raise CachevizError("must be positive", param="theta", value=theta)
    return torch.softmax(theta * sims.to(torch.float64), dim=-1).to(torch.float32)


def p_mem_from_similarities(sims: torch.Tensor, values: torch.Tensor, theta: float) -> torch.Tensor:
    """(K,) or (N, K) stored similarities -> p_mem (C,) or (N, C), without the network."""
    two_d = sims.ndim == 2
    s = sims if two_d else sims[None]
    out = SimilarityBlock(s.to(values.device, values.dtype), values).p_mem(float(theta))
    return out if two_d else out[0]


def explain(index: CacheIndex, query: Query, theta: float, lam: float, k: int = 12) -> Explanation:
    """p_net, p_mem, p and the top-k neighbours with their shares, at (theta, lam)."""
    if not 0.0 <= lam <= 1.0:
        raise CachevizError("must lie between 0 and 1", param="lam", value=lam)
    sims = query.sims
    p_mem = p_mem_from_similarities(sims, index.memory.values, theta).cpu()
    p_net = torch.as_tensor(query.p_net, dtype=torch.float32)
    p = combine(p_net, p_mem, lam)
    k = max(1, min(int(k), len(sims)))
    top_sims, rows = sims.topk(k)
    sigma = shares(sims, theta)[rows]
    return Explanation(
        theta=float(theta),
        lam=float(lam),
        p_net=p_net.numpy(),
        p_mem=p_mem.numpy(),
        p=p.numpy(),
        rows=rows.numpy(),
        train_idx=index.train_idx[rows].numpy(),
        flipped=index.flipped[rows].numpy(),
        labels=index.labels[rows].cpu().numpy(),
        sims=top_sims.numpy(),
        shares=sigma.numpy(),
    )


def neighbour_images(ds, explanation: Explanation) -> np.ndarray:
    """(k, H, W, C) uint8 training images of the neighbours, flipped where the row is a flip."""
    imgs = ds.train_x[torch.as_tensor(explanation.train_idx)].numpy().copy()
    flips = np.asarray(explanation.flipped, dtype=bool)
    if flips.any():
        imgs[flips] = imgs[flips][:, :, ::-1]
    return imgs


def model_view(spec, image: np.ndarray | torch.Tensor) -> np.ndarray:
    """The image as the network gets it (resized to its input, gray for 1-channel nets): (h, w, 3) uint8.

    The network then normalises these pixels with the model's mean and std.
    """
    x01 = spec.pixels01(as_batch(image))[0]  # (C, h, w) in [0, 1]
    img = (x01.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def invert(image: np.ndarray) -> np.ndarray:
    """Negative of a uint8 image (dark ink on white paper -> light ink on black, like `digits`)."""
    return (255 - np.asarray(image, dtype=np.uint8)).astype(np.uint8)


def background_differs(ds, image: np.ndarray) -> bool:
    """True when `image` has a light background and the training images a dark one (or back).

    For 1-channel data sets such as `digits` (light ink on black), a photo of a digit written
    on paper needs inverting before the network can make sense of it.
    """
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0].ravel(), img[-1].ravel(), img[:, 0].ravel(), img[:, -1].ravel()])
    train = ds.train_x[:512].to(torch.float32)
    train_border = torch.cat([train[:, 0].flatten(), train[:, -1].flatten(), train[:, :, 0].flatten(), train[:, :, -1].flatten()])
    return (float(border.mean()) > 127.5) != (float(train_border.mean()) > 127.5)
