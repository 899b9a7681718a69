"""Tappable layers and one-pass multi-layer feature extraction.

Layer names are module paths (torchvision's `feature_extraction` convention), plus two pseudo
layers: `input` (the preprocessed image, depth 0) and `logits` (the output, depth 1).
"""
from __future__ import annotations

import difflib
import threading
import weakref
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import CachevizError
from .progress import ProgressFn



@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, ...]  # one item's activation shape, e.g. (64, 8, 8)
    dim: int  # flattened size
    depth: float  # normalised depth l/L: 0 = input image, 1 = output logits


class _StopForward(Exception):
    """Raised from a hook once every wanted activation is in hand, to skip the rest of the net."""


def resolve_layers(spec, names: Sequence[str] | str | None) -> list[str]:
    """Validate layer names against the model's tappable layers; None gives the defaults."""
    if names is None or names == "" or names == []:
        return list(spec.default_layers)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    known = [n for n, _ in spec.layers]
    out: list[str] = []
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise CachevizError(f"{spec.name} has no layer {n!r}{hint}", f"choose from {_listing(known)}",
                                param="layers", value=list(names))
        if n not in out:
            out.append(n)
    if not out:
        raise CachevizError("no layers given", f"choose from {_listing(known)}", param="layers", value=list(names))
    return out


def _listing(names: list[str], most: int = 12) -> str:
    if len(names) <= most:
        return ", ".join(names)
    head = most // 2
    return f"{', '.join(names[:head])}, …, {', '.join(names[-head:])} ({len(names)} layers)"


def _ordered(spec, layers: Sequence[str]) -> list[str]:
    order = {n: i for i, (n, _) in enumerate(spec.layers)}
    return sorted(layers, key=order.__getitem__)


# The network's output, twice: the logits, and the softmax probabilities the author's Figure 2
# keyed on (both at l/L = 1). Neither is a module output to hook; neither is ever projected.
OUTPUTS = ("logits", "probs")


# Hooks live on the module, so two threads running one net at once (two sessions of the app
# querying the same shared model) would fill each other's taps, or stop each other's pass:
# one lock per net makes a tapped forward pass exclusive.
_NET_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_NET_LOCKS_GUARD = threading.Lock()


def net_lock(net: torch.nn.Module) -> threading.RLock:
    with _NET_LOCKS_GUARD:
        lock = _NET_LOCKS.get(net)
        if lock is None:
            lock = _NET_LOCKS[net] = threading.RLock()
        return lock


class _Taps:
    """Forward hooks that collect the outputs of named modules during one forward pass."""

    def __init__(self, net: torch.nn.Module, names: Sequence[str], stop_after: str | None = None):
        modules = dict(net.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            if name == "input" or name in OUTPUTS:
                continue
            self.handles.append(modules[name].register_forward_hook(self._hook(name, name == stop_after)))

    def _hook(self, name: str, stop: bool):
        def hook(_module, _inputs, output):
            self.out[name] = output
            if stop:
                raise _StopForward

        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def forward_layers(spec, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run the net once on preprocessed `x` (N, C, H, W) and return the wanted activations.

    Differentiable: no `no_grad` here, so `CacheClassifier` can push gradients through it.
    When `logits` is not wanted the forward stops at the deepest wanted layer.
    """
    wanted = _ordered(spec, layers)
    need_logits = any(n in wanted for n in OUTPUTS)
    taps_needed = [n for n in wanted if n != "input" and n not in OUTPUTS]
    stop_after = None if need_logits or not taps_needed else taps_needed[-1]
    out: dict[str, torch.Tensor] = {}
    if "input" in wanted:
        out["input"] = x
    if taps_needed or need_logits:
        with net_lock(spec.net), _Taps(spec.net, taps_needed, stop_after) as taps:
            try:
                logits = spec.net(x)
            except _StopForward:
                logits = None
            out.update(taps.out)
        if "logits" in wanted:
            out["logits"] = logits
        if "probs" in wanted:
            out["probs"] = torch.softmax(logits, dim=1)
    return out


# Shapes depend only on the architecture, so each net is probed once.
_LAYER_INFOS: "weakref.WeakKeyDictionary[torch.nn.Module, list[LayerInfo]]" = weakref.WeakKeyDictionary()


def list_layers(spec) -> list[LayerInfo]:
    """Every tappable layer of `spec` with its activation shape and normalised depth."""
    if spec.net in _LAYER_INFOS:
        return list(_LAYER_INFOS[spec.net])
    names = [n for n, _ in spec.layers]
    p = next(spec.net.parameters())
    x = torch.zeros(1, spec.in_channels, *spec.input_size, dtype=p.dtype, device=p.device)
    with torch.no_grad():
        acts = forward_layers(spec, x, names)
    infos = []
    for name, depth in spec.layers:
        shape = tuple(acts[name].shape[1:])
        infos.append(LayerInfo(name, shape, int(torch.Size(shape).numel()), float(depth)))
    _LAYER_INFOS[spec.net] = infos
    return list(infos)


class SignSketch:
    """Seeded sparse random projection d -> dim (a count sketch): every input coordinate is
    added, with a random sign, to one random output coordinate.

    It keeps inner products in expectation with O(1/dim) variance, like a Gaussian
    Johnson-Lindenstrauss map, but costs one pass over the input instead of a d x dim GEMM
    (for ResNet20's 16384-wide early layers at dim 1024, 2 x 16384 x 1024 FLOPs per image, far
    more than the network's whole forward pass). Differentiable (index_add), so
    `CacheClassifier` can use it. Seeded per layer name so a layer gets the same projection
    whichever set it is extracted with.
    """

    def __init__(self, d: int, dim: int, seed: int, layer: str):
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(layer.encode()))
        self.d, self.dim = d, dim
        self.bucket = torch.randint(0, dim, (d,), generator=g)
        self.sign = torch.randint(0, 2, (d,), generator=g).float().mul_(2).sub_(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, dim)."""
        bucket, sign = self.bucket.to(x.device), self.sign.to(x.device, x.dtype)
        out = torch.zeros(x.shape[0], self.dim, device=x.device, dtype=x.dtype)
        return out.index_add(1, bucket, x * sign)


def extract(
    spec,
    images: torch.Tensor,
    layers: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = False,
    project_dim: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    out_device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Flattened activations of `layers` for `images` (N, H, W, C) uint8, in ONE forward pass.

    Returns {layer: (N', d) float32 on `out_device`}; with `flip`, N' = 2N: the N images, then their
    horizontal flips in the same order. Layers wider than `project_dim` are randomly projected
    to `project_dim` dimensions as they are extracted, so the full-width tensor never exists.
    Not normalised: keys are normalised after concatenation (`make_keys`).
    """
    layers = resolve_layers(spec, list(layers))
    device = torch.device(device)
    spec.net.to(device).eval()  # in place: modules move, so the spec keeps its net
    n = len(images)
    n_out = 2 * n if flip else n
    dims = {i.name: i.dim for i in list_layers(spec) if i.name in layers}
    # the logits are never projected: they are p_net's input, and at most C wide anyway
    proj = {name: SignSketch(d, project_dim, seed, name) for name, d in dims.items()
            if project_dim and d > project_dim and name not in OUTPUTS}
    out = {name: torch.empty(n_out, project_dim if name in proj else d, device=out_device) for name, d in dims.items()}
    done = 0
    # full float32 convolutions on GPUs too (no TF32), so keys agree with the CPU's to rounding
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for start in range(0, n, batch_size):
            x = spec.preprocess(images[start : start + batch_size].to(device))
            b = len(x)
            if flip:
                x = torch.cat([x, x.flip(-1)])
            acts = forward_layers(spec, x, layers)
            for name in layers:
                a = acts[name].flatten(1).float()
                if name in proj:
                    a = proj[name](a)
                out[name][start : start + b] = a[:b]
                if flip:
                    out[name][n + start : n + start + b] = a[b:]
            done += b
            if progress:
                progress(done, n, "extracting features")
    return out


def make_keys(
    feats: dict[str, torch.Tensor], layers: Sequence[str], rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate the layers' features and L2-normalise each whole row: (N, sum d).

    `rows` selects and orders items. The result is filled layer by layer, so peak memory is
    the keys plus one layer's selection, not two full copies of the keys.
    """
    device = feats[layers[0]].device
    if rows is not None:
        rows = rows.to(device)
    n = len(feats[layers[0]]) if rows is None else len(rows)
    dims = [feats[name].shape[1] for name in layers]
    keys = torch.empty(n, sum(dims), dtype=torch.float32, device=device)
    off = 0
    for name, d in zip(layers, dims):
        keys[:, off : off + d] = feats[name] if rows is None else feats[name][rows]
        off += d
    norms = keys.norm(dim=1, keepdim=True).clamp_min_(1e-12)
    return keys.div_(norms)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=1e-12)
