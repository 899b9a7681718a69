"""Model registry: name -> network + weights + preprocessing + tappable layers.

Three families:

* ``resnet<6n+2>``: the CIFAR-10 ResNets of He et al. (2016) exactly as in Y. Idelbayev's
  pytorch_resnet_cifar10, so its published checkpoints load unchanged.
* ``digits-cnn``: a small CNN for scikit-learn's 8x8 digits, trained here on first use.
* ``torchvision:<name>``: any torchvision classification model through its weights API.

A `ModelSpec` keeps the preprocessing and class names with the weights (the torchvision
weights-API idea), and lists the layers whose activations may become cache keys.
"""
from __future__ import annotations

import hashlib
import io
import math
import operator
import pickle
import re
import urllib.error
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import store
from .errors import CachevizError
from .features import OUTPUTS
from .progress import ProgressFn


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)

RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{}"
# The 8 hex digits are the start of each file's SHA-256 (torch.hub's hash_prefix convention).
RESNET_FILES = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
    110: "resnet110-1d1ed7c2.th",
    1202: "resnet1202-f3b1deed.th",
}
DIGITS_FILE = "digits-cnn.pt"
TORCHVISION_PREFIX = "torchvision:"


# ---------------------------------------------------------------------------------------------
# The spec every other module codes against


@dataclass
class ModelSpec:
    name: str
    net: nn.Module
    input_size: tuple[int, int]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None
    layers: list[tuple[str, float]]
    default_layers: list[str]
    weights_id: str
    # torchvision weights resize the shorter side and centre-crop instead of stretching.
    _resize_short: int | None = field(default=None, repr=False)
    _interpolation: str = field(default="bilinear", repr=False)

    def pixels01(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) images with values 0..255 -> (N, in_channels, *input_size) in [0, 1].

        The net's own input before normalisation, which is the space attacks perturb in.
        """
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise CachevizError(
                f"Pass images as an (N, H, W, C) tensor with C = 1 or 3, not one of shape {tuple(x.shape)}."
            )
        x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        c = x.shape[1]
        if c != self.in_channels:
            x = x.repeat(1, self.in_channels, 1, 1) if c == 1 else x.mean(dim=1, keepdim=True)
        h, w = x.shape[-2:]
        if self._resize_short is not None:
            x = _resize_shorter_side(x, self._resize_short, self._interpolation)
            x = _center_crop(x, self.input_size)
        elif (h, w) != tuple(self.input_size):
            x = F.interpolate(x, size=tuple(self.input_size), mode="bilinear", antialias=True, align_corners=False)
        return x.contiguous()

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> the normalised input the net was trained on."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        return (x01 - mean) / std

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) uint8 images of any size -> (N, in_channels, *input_size) normalised float32."""
        return self.normalize(self.pixels01(x))


def _resize_shorter_side(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    # Same rounding as torchvision.transforms.functional.resize, so crops match the weights' recipe.
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    if new == (h, w):
        return x
    out = F.interpolate(x, size=new, mode=mode, antialias=True, align_corners=False)
    # Bicubic overshoots; the [0, 1] range is part of the contract of pixels01.
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    ch, cw = size
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (Idelbayev's pytorch_resnet_cifar10, "option A" shortcuts)


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling plus zero channels on both sides."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in place: a hook on bn2 must keep seeing bn2's own output.
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = _blocks_per_stage(depth)
        self.depth = operator.index(depth)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def segments(net: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """The network as a chain of named steps, each taking the previous step's output: a forward
    pass can stop after any step and later resume from its output (answering early). Names are
    the tappable layers the steps end at; the last is `logits`. None for architectures without
    such a chain (torchvision models: their forward is not written as one here)."""
    if isinstance(net, CifarResNet):
        steps: list = [("relu", lambda x: net.relu(net.bn1(net.conv1(x))))]
        for s, stage in enumerate((net.layer1, net.layer2, net.layer3), start=1):
            steps += [(f"layer{s}.{b}", block) for b, block in enumerate(stage)]
        steps += [("avgpool", net.avgpool), ("logits", lambda a: net.linear(torch.flatten(a, 1)))]
        return steps
    if isinstance(net, DigitsCNN):
        return [("relu1", lambda x: net.relu1(net.conv1(x))), ("relu2", lambda a: net.relu2(net.conv2(a))),
                ("pool", net.pool), ("relu3", lambda a: net.relu3(net.fc1(torch.flatten(a, 1)))),
                ("logits", net.fc2)]
    return None


def _blocks_per_stage(depth: int) -> int:
    try:
        d = operator.index(depth)
    except TypeError:
        d = None
    if d is None or isinstance(depth, bool) or d < 8 or (d - 2) % 6 != 0:
        raise CachevizError(
            f"a CIFAR ResNet needs a depth of 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...), not {depth}",
            "for ImageNet ResNets use torchvision:<name>, e.g. torchvision:resnet18",
            param="model", value=f"resnet{depth}",
        )
    return (d - 2) // 6


def build_cifar_resnet(depth: int, num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet of the given depth (6n+2), randomly initialised, in eval mode."""
    return CifarResNet(depth, num_classes).eval()


def _cifar_resnet_layers(depth: int) -> tuple[list[tuple[str, float]], list[str]]:
    """Tappable layers with depth l/L, l = weight layers (conv/linear) applied so far, L = depth."""
    n = _blocks_per_stage(depth)
    L = float(depth)
    layers: list[tuple[str, float]] = [("input", 0.0), ("relu", 1 / L)]
    k = 0
    for stage in (1, 2, 3):
        for i in range(n):
            layers.append((f"layer{stage}.{i}.relu1", (2 + 2 * k) / L))
            layers.append((f"layer{stage}.{i}", (3 + 2 * k) / L))
            k += 1
    # avgpool has no weights, so it sits at the same l as the last block's output.
    layers += [("avgpool", (L - 1) / L), ("logits", 1.0), ("probs", 1.0)]
    return layers, cifar_resnet_default_keys(depth)[0]


# The author's own key layers where his code shows them (ResNet20 and ResNet32).
AUTHOR_KEYS = {
    20: ["layer3.0.relu1", "layer3.1.relu1", "layer3.2.relu1"],
    32: ["layer3.0", "layer3.2.relu1", "layer3.3"],
}


def cifar_resnet_default_keys(depth: int) -> tuple[list[str], str]:
    """Three stage-3 layers spread over the stage (stage 3's layers are 8x8x64 = 4096 values),
    and why: ResNet20 and ResNet32 the author's own (`AUTHOR_KEYS`); other depths spread like
    his (for ResNet56 he took blocks 0, 4 and 8 of 9): the first block's output, the middle
    block's mid-block ReLU (as in his ResNet32 choice) and the last block's output. With fewer
    than three blocks, every block's mid-block ReLU."""
    n = _blocks_per_stage(depth)
    if depth in AUTHOR_KEYS:
        return list(AUTHOR_KEYS[depth]), f"the author's own key layers for ResNet{depth}"
    if n < 3:
        return ([f"layer3.{i}.relu1" for i in range(n)],
                "every stage-3 block's mid-block ReLU (fewer than three blocks)")
    return (["layer3.0", f"layer3.{n // 2}.relu1", f"layer3.{n - 1}"],
            "three stage-3 layers spread over the stage like the author's (for ResNet56 he took blocks 0, 4 "
            "and 8): the first block's output, the middle block's mid-block ReLU, the last block's output")


def _resnet_depth(name: str) -> int | None:
    """The depth in a CIFAR ResNet's name (`resnet56` -> 56), or None for other models."""
    m = re.fullmatch(r"resnet(\d+)", str(name).strip().lower())
    return int(m.group(1)) if m else None


def cifar_resnet_architecture(depth: int) -> ModelSpec:
    """A CIFAR ResNet's spec without its weights (random init): enough to list its layers,
    their shapes and its default keys, never to compute a result (its `weights_id` says so)."""
    layers, defaults = _cifar_resnet_layers(depth)
    return ModelSpec(name=f"resnet{depth}", net=build_cifar_resnet(depth), input_size=(32, 32), in_channels=3,
                     mean=CIFAR_MEAN, std=CIFAR_STD, classes=list(CIFAR10_CLASSES), layers=layers,
                     default_layers=defaults, weights_id="architecture-only")


# ---------------------------------------------------------------------------------------------
# digits-cnn


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(torch.flatten(out, 1))))


_DIGITS_TAPS = ["input", "relu1", "relu2", "pool", "relu3", "logits"]
# Position / (count - 1): weight-layer counting would put relu2 and pool at the same depth.
DIGITS_LAYERS = [(n, i / (len(_DIGITS_TAPS) - 1)) for i, n in enumerate(_DIGITS_TAPS)] + [("probs", 1.0)]
DIGITS_MEAN = (0.5,)
DIGITS_STD = (0.5,)
_DIGITS_EPOCHS = 30
_DIGITS_BATCH = 64
_DIGITS_LR = 3e-3


def _digits_spec_shell(net: nn.Module, weights_id: str) -> ModelSpec:
    return ModelSpec(
        name="digits-cnn",
        net=net.eval(),
        input_size=(8, 8),
        in_channels=1,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        classes=[str(d) for d in range(10)],
        layers=list(DIGITS_LAYERS),
        default_layers=["relu3"],
        weights_id=weights_id,
    )


def untrained_digits_spec() -> ModelSpec:
    """digits-cnn's architecture with random weights: enough to list its layers before training."""
    return _digits_spec_shell(DigitsCNN(), "untrained")


def train_digits_cnn(data_dir, seed: int = 0, progress: ProgressFn | None = None,
                     classes: Sequence[int] | None = None) -> nn.Module:
    """Train digits-cnn on the digits training split, deterministically; returns it in eval mode.

    Adam with a one-cycle schedule and random one-pixel shifts; about 5 s on one CPU core.
    Saving is left to `load_model`, so a run with another seed never replaces the default file.
    `classes`: train on the training items of these digits only, with a head of one output per
    digit (output i is the i-th smallest); the net never sees another digit.
    """
    from .data import load_dataset

    ds = load_dataset("digits", data_dir)
    shell = _digits_spec_shell(nn.Identity(), "training")
    x = shell.preprocess(ds.train_x)
    y = ds.train_y.to(torch.int64)
    n_out = len(ds.classes)
    if classes is not None:
        wanted = torch.tensor(sorted({int(c) for c in classes}), dtype=torch.int64)
        keep = torch.isin(y, wanted)
        x, y = x[keep], torch.searchsorted(wanted, y[keep])
        n_out = len(wanted)
    n = len(y)
    steps_per_epoch = math.ceil(n / _DIGITS_BATCH)
    # One thread: as fast as two for a net this small, immune to the many-fold slowdown of
    # OpenMP threads on a busy machine, and one reduction order whatever the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Forking keeps the caller's global RNG untouched while making training repeatable.
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DigitsCNN(n_out)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(net.parameters(), lr=_DIGITS_LR)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=_DIGITS_LR, total_steps=_DIGITS_EPOCHS * steps_per_epoch
            )
            background = float(shell.normalize(torch.zeros(1, 1, 1, 1)))
            padded = F.pad(x, (1, 1, 1, 1), value=background)
            net.train()
            for epoch in range(_DIGITS_EPOCHS):
                # A one-pixel shift is the variation hand-written digits really have; flips are not.
                dy = torch.randint(0, 3, (n,), generator=gen)
                dx = torch.randint(0, 3, (n,), generator=gen)
                rows = (dy.view(n, 1) + torch.arange(8).view(1, 8)).view(n, 1, 8, 1).expand(n, 1, 8, 10)
                shifted = padded.gather(2, rows)
                cols = (dx.view(n, 1) + torch.arange(8).view(1, 8)).view(n, 1, 1, 8).expand(n, 1, 8, 8)
                shifted = shifted.gather(3, cols)
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, _DIGITS_BATCH):
                    idx = order[start : start + _DIGITS_BATCH]
                    loss = F.cross_entropy(net(shifted[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                if progress is not None:
                    progress(epoch + 1, _DIGITS_EPOCHS, "training digits-cnn")
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def _load_digits(data_dir: Path, checkpoint: Path | None, progress, train_if_missing: bool) -> ModelSpec:
    net = DigitsCNN()
    if checkpoint is not None:
        _load_weights(net, checkpoint, "digits-cnn")
        return _digits_spec_shell(net, store.file_sha256(checkpoint))
    path = data_dir / "checkpoints" / DIGITS_FILE
    if path.exists():
        try:
            _load_weights(net, path, "digits-cnn")
            return _digits_spec_shell(net, store.file_sha256(path))
        except CachevizError as exc:
            # Our own artefact: a damaged copy costs a retrain, never a wrong answer.
            if not train_if_missing:
                raise
            warnings.warn(f"{path} is unusable ({exc}); digits-cnn will be retrained.", stacklevel=3)
    elif not train_if_missing:
        raise CachevizError(
            f"digits-cnn has not been trained yet in {path.parent}",
            "load it once with training allowed", "pass {checkpoint}", param="model", value="digits-cnn",
        )
    net = train_digits_cnn(data_dir, seed=0, progress=progress)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    store.atomic_write_bytes(path, buf.getvalue())
    # the bytes this process trained, even if another process replaced the file meanwhile
    return _digits_spec_shell(net, hashlib.sha256(buf.getvalue()).hexdigest())


# Bump when the recipe of `digits_cnn_on_classes` changes: its files are keyed by the recipe.
_DIGITS_SUBSET_VERSION = 1


def digits_cnn_on_classes(data_dir: str | Path, classes: Sequence[int], seed: int = 0,
                          progress: ProgressFn | None = None) -> ModelSpec:
    """digits-cnn trained on the training items of `classes` only (`train_digits_cnn`'s recipe),
    its head one output per such digit: a backbone that has never seen the other digits (the
    incremental study's `first` backbone). Trained once and kept under the data directory, keyed
    by the recipe (classes, seed, epochs, batch, learning rate, the dataset's fingerprint)."""
    from .data import dataset_fingerprint

    data_dir = Path(data_dir).expanduser()
    wanted = sorted({int(c) for c in classes})
    if not wanted or wanted[0] < 0 or wanted[-1] > 9:
        raise CachevizError("digits-cnn's classes are the digits 0 to 9", param="classes", value=list(classes))
    recipe = {"model": "digits-cnn", "classes": wanted, "seed": int(seed), "epochs": _DIGITS_EPOCHS,
              "batch": _DIGITS_BATCH, "lr": _DIGITS_LR, "dataset": dataset_fingerprint("digits", data_dir),
              "version": _DIGITS_SUBSET_VERSION}
    tag = "-".join(map(str, wanted))
    path = data_dir / "checkpoints" / f"digits-cnn-classes-{tag}-{store.config_hash(recipe)}.pt"
    net = DigitsCNN(len(wanted))
    spec_id = None
    if path.exists():
        try:
            _load_weights(net, path, "digits-cnn")
            spec_id = store.file_sha256(path)
        except CachevizError as exc:
            # our own artefact: a damaged copy costs a retrain, never a wrong answer
            warnings.warn(f"{path} is unusable ({exc}); it will be retrained.", stacklevel=2)
            net = DigitsCNN(len(wanted))
    if spec_id is None:
        net = train_digits_cnn(data_dir, seed=seed, progress=progress, classes=wanted)
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        store.atomic_write_bytes(path, buf.getvalue())
        spec_id = hashlib.sha256(buf.getvalue()).hexdigest()
    spec = _digits_spec_shell(net, spec_id)
    spec.classes = [str(c) for c in wanted]
    return spec


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _state_dict_id(net: nn.Module) -> str:
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CachevizError(f"{path} does not exist", f"give the path of a checkpoint saved from {arch}",
                            param="checkpoint", value=str(path))
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickled classes and functions, which could run code when loaded.
        why = "it holds pickled objects other than tensors" if "global" in str(exc).lower() else "torch.load refused it"
        raise CachevizError(
            f"this must be a plain state_dict saved with torch.save(model.state_dict(), path) ({why})",
            f"re-save it that way from {arch}", param="checkpoint", value=str(path),
        ) from None
    except Exception as exc:
        raise CachevizError(
            f"this file could not be read as a checkpoint ({type(exc).__name__})",
            f"give a checkpoint saved from {arch} with torch.save", param="checkpoint", value=str(path),
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CachevizError(
            "this file holds no state_dict (a dict of tensors, bare or under 'state_dict')",
            f"give a checkpoint saved from {arch}", param="checkpoint", value=str(path),
        )
    # DataParallel (as in the published CIFAR checkpoints) prefixes every key with "module.".
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_weights(net: nn.Module, path: Path, arch: str, state: dict | None = None) -> None:
    """Load a checkpoint into `net`, or raise a CachevizError saying what does not fit."""
    state = _read_state_dict(path, arch) if state is None else state
    expected = net.state_dict()
    # Old checkpoints (the published CIFAR ones included) predate BatchNorm's batch counter.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"{k} has shape {tuple(state[k].shape)}"
        elif missing:
            detail = f"{len(missing)} keys are missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} keys are unexpected, e.g. {unexpected[0]}"
        like = [k for k in expected if k not in optional][-3]
        raise CachevizError(
            f"this checkpoint does not fit {arch} (expected keys like {like} with shape "
            f"{tuple(expected[like].shape)}, but {detail})",
            f"give a checkpoint saved from {arch}", param="checkpoint", value=str(path),
        )
    for k, ref in expected.items():
        if k in state and ref.is_floating_point():
            v = state[k]
            if not v.is_floating_point():
                raise CachevizError(f"{k} holds {v.dtype} values where {arch} has floating-point weights",
                                    f"give a checkpoint saved from a trained {arch}", param="checkpoint",
                                    value=str(path))
            if not bool(torch.isfinite(v).all()):
                raise CachevizError(f"{k} holds NaN or infinite values (a diverged training run?)",
                                    f"give a checkpoint saved from a trained {arch}", param="checkpoint",
                                    value=str(path))
    net.load_state_dict(state, strict=False)
    net.eval()


def _download(url: str, dst: Path, hash_prefix: str | None, what: str, *fixes: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Looked up at call time so tests can simulate a machine without network.
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = "its checksum did not match" if "hash" in str(exc).lower() else "no network?"
        raise CachevizError(f"Could not download {what} ({reason})", *fixes) from None


def _load_cifar_resnet(depth: int, data_dir: Path, checkpoint: Path | None, progress) -> ModelSpec:
    _blocks_per_stage(depth)
    name = f"resnet{depth}"
    if checkpoint is None:
        ckpt_dir = data_dir / "checkpoints"
        file = RESNET_FILES.get(depth)
        if file is None:
            checkpoint = ckpt_dir / f"{name}.th"
            if not checkpoint.exists():
                raise CachevizError(
                    f"there are no published weights for {name}", f"put {checkpoint.name} into {ckpt_dir}/",
                    "pass {checkpoint}", param="model", value=name,
                )
        else:
            checkpoint = ckpt_dir / file
            if not checkpoint.exists():
                if progress is not None:
                    progress(0, 1, f"downloading {name} weights")
                prefix = file.rsplit("-", 1)[1].split(".")[0]
                _download(
                    RESNET_URL.format(file),
                    checkpoint,
                    prefix,
                    f"{name} weights",
                    f"put {file} into {ckpt_dir}/",
                    "pass {checkpoint}",
                )
                if progress is not None:
                    progress(1, 1, f"downloading {name} weights")
    state = _read_state_dict(checkpoint, name)  # before building: a huge depth needs a real file first
    n = _blocks_per_stage(depth)
    if f"layer3.{n - 1}.conv2.weight" not in state or f"layer3.{n}.conv1.weight" in state:
        blocks = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
        if blocks == 0:
            raise CachevizError(f"this checkpoint holds no CIFAR ResNet (no layer3 blocks), so it does not fit {name}",
                                f"give a checkpoint saved from {name}", param="checkpoint", value=str(checkpoint))
        raise CachevizError(f"this checkpoint has {blocks} blocks per stage, {name} has {n}",
                            f"give a checkpoint saved from {name}", f"choose resnet{6 * blocks + 2} as {{model}}",
                            param="checkpoint", value=str(checkpoint))
    net = build_cifar_resnet(depth)
    _load_weights(net, checkpoint, name, state)
    layers, defaults = _cifar_resnet_layers(depth)
    return ModelSpec(
        name=name,
        net=net,
        input_size=(32, 32),
        in_channels=3,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        classes=list(CIFAR10_CLASSES),
        layers=layers,
        default_layers=defaults,
        weights_id=store.file_sha256(checkpoint),
    )


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision_weights(name: str):
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise CachevizError(
            "no such torchvision classification model",
            "pick one of torchvision.models.list_models(module=torchvision.models), e.g. torchvision:resnet18",
            param="model", value=TORCHVISION_PREFIX + name,
        )
    return torchvision.models.get_model_weights(name).DEFAULT


def _torchvision_layers(net: nn.Module, input_size: tuple[int, int]) -> list[tuple[str, float]]:
    """Module paths with at most one dot, in the order their outputs appear in a forward pass."""
    # An in-place activation would overwrite the tensor a hook captured from the layer before it.
    for m in net.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    modules = dict(net.named_modules())
    candidates = [n for n in modules if n and n.count(".") <= 1]
    seen: list[tuple[str, torch.Tensor, int]] = []

    def hook(name):
        def fn(_m, _i, out):
            if isinstance(out, torch.Tensor) and all(n != name for n, _, _ in seen):
                seen.append((name, out, out._version))

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in candidates]
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            logits = net(torch.randn(1, 3, *input_size, generator=gen))
    finally:
        for h in handles:
            h.remove()
    order: list[str] = []
    kept: list[torch.Tensor] = []
    for name, out, version in seen:
        # Changed in place by a functional op later on: the hook would not see this layer's output.
        if out._version != version:
            continue
        # A container (or eval-mode dropout) handing on a tensor already listed adds nothing, and
        # the classifier's last layer gives the logits themselves, listed as "logits".
        if out is logits or any(out is k for k in kept):
            continue
        order.append(name)
        kept.append(out)
    names = ["input", *order, "logits"]
    return [(n, i / (len(names) - 1)) for i, n in enumerate(names)] + [("probs", 1.0)]


def _torchvision_spec(
    name: str, data_dir: Path, checkpoint: Path | None = None, pretrained: bool = True
) -> ModelSpec:
    """Build a torchvision spec; `pretrained=False` (tests only) keeps the random init."""
    import torchvision

    weights = _torchvision_weights(name)
    full = TORCHVISION_PREFIX + name
    if checkpoint is not None or not pretrained:
        net = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
        if checkpoint is not None:
            _load_weights(net, checkpoint, full)
            weights_id = store.file_sha256(checkpoint)
        else:
            weights_id = _state_dict_id(net)
    else:
        hub_dir = data_dir / "checkpoints" / "torch-hub"
        file = weights.url.rsplit("/", 1)[-1]
        previous = torch.hub.get_dir()
        torch.hub.set_dir(str(hub_dir))
        try:
            net = torchvision.models.get_model(name, weights=weights)
        except (urllib.error.URLError, OSError) as exc:
            raise CachevizError(
                f"Could not download the weights of {full} (no network?: {type(exc).__name__})",
                f"put {file} into {hub_dir / 'checkpoints'}/", "pass {checkpoint}",
            ) from None
        except RuntimeError as exc:
            if "hash" not in str(exc).lower():
                raise
            raise CachevizError(
                f"The downloaded weights of {full} are damaged (checksum mismatch); delete "
                f"{hub_dir / 'checkpoints' / file} and try again."
            ) from None
        finally:
            torch.hub.set_dir(previous)
        weights_id = store.file_sha256(hub_dir / "checkpoints" / file)
    net = net.eval()
    tf = weights.transforms()
    crop = tuple(tf.crop_size) if len(tf.crop_size) == 2 else (tf.crop_size[0], tf.crop_size[0])
    resize = int(tf.resize_size[0])
    interp = "bicubic" if "bicubic" in str(tf.interpolation).lower() else "bilinear"
    layers = _torchvision_layers(net, crop)
    modules_before_logits = [n for n, _ in layers[1:] if n not in OUTPUTS]
    default = modules_before_logits[-1] if modules_before_logits else "logits"
    return ModelSpec(
        name=full,
        net=net,
        input_size=crop,
        in_channels=3,
        mean=tuple(float(m) for m in tf.mean),
        std=tuple(float(s) for s in tf.std),
        classes=list(weights.meta["categories"]),
        layers=layers,
        default_layers=[default],
        weights_id=weights_id,
        _resize_short=resize,
        _interpolation=interp,
    )


# ---------------------------------------------------------------------------------------------
# Registry


def available_models() -> list[str]:
    """Registered model names.

    Besides these, any ``resnet<6n+2>`` (e.g. resnet8, resnet14; weights via --checkpoint) and
    any ``torchvision:<name>`` from ``torchvision.models.list_models(module=torchvision.models)``
    are accepted by `load_model`.
    """
    return [f"resnet{d}" for d in sorted(RESNET_FILES)] + ["digits-cnn"]


def weights_path(name: str, data_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The file `load_model` reads model `name`'s weights from, found without loading anything.

    It may not exist yet (published weights not downloaded, digits-cnn not trained). Raises
    `CachevizError` for an unknown model, as `load_model` would.
    """
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    key = str(name).strip()
    data_dir = Path(data_dir).expanduser()
    if key.lower().startswith(TORCHVISION_PREFIX):
        file = _torchvision_weights(key[len(TORCHVISION_PREFIX) :]).url.rsplit("/", 1)[-1]
        return data_dir / "checkpoints" / "torch-hub" / "checkpoints" / file
    key = key.lower()
    if key == "digits-cnn":
        return data_dir / "checkpoints" / DIGITS_FILE
    depth = _resnet_depth(key)
    if depth is not None:
        _blocks_per_stage(depth)
        return data_dir / "checkpoints" / RESNET_FILES.get(depth, f"resnet{depth}.th")
    raise _unknown_model(name)


def weights_fingerprint(name: str, data_dir: str | Path, checkpoint: str | Path | None = None) -> str | None:
    """SHA-256 of the weights `load_model` would load, or None while that file does not exist."""
    path = weights_path(name, data_dir, checkpoint)
    return store.file_sha256(path) if path.is_file() else None


def _unknown_model(name: str) -> CachevizError:
    return CachevizError(
        "no such model", f"choose one of {', '.join(available_models())}, resnet<6n+2> or torchvision:<name>",
        param="model", value=name,
    )


def load_model(
    name: str,
    data_dir: str | Path,
    checkpoint: str | Path | None = None,
    progress: ProgressFn | None = None,
    train_if_missing: bool = True,
) -> ModelSpec:
    """The spec of model `name` with its weights, on CPU, in eval mode.

    Weights come from `checkpoint` when given, else from `<data_dir>/checkpoints/` (downloaded
    or, for digits-cnn, trained there on first use).
    """
    key = str(name).strip()
    data_dir = Path(data_dir).expanduser()
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else None
    if key.lower().startswith(TORCHVISION_PREFIX):
        return _torchvision_spec(key[len(TORCHVISION_PREFIX) :], data_dir, ckpt)
    key = key.lower()
    if key == "digits-cnn":
        return _load_digits(data_dir, ckpt, progress, train_if_missing)
    depth = _resnet_depth(key)
    if depth is not None:
        return _load_cifar_resnet(depth, data_dir, ckpt, progress)
    raise _unknown_model(name)


def default_keys_reason(name: str) -> str:
    """Why `name`'s default key layers are what they are (for `layers` and the app)."""
    depth = _resnet_depth(name)
    if depth is not None:
        return cifar_resnet_default_keys(depth)[1]
    return "the model's last hidden layer before the output"


def architecture_only(name: str) -> ModelSpec | None:
    """`name`'s spec without weights for the published CIFAR ResNets (none is deeper than
    ResNet1202), else None: a depth nobody published is not built for a listing."""
    depth = _resnet_depth(name)
    return cifar_resnet_architecture(depth) if depth in RESNET_FILES else None
