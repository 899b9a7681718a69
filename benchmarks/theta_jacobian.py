"""Which way θ moves the cache-only model's input-output Jacobian: mean and median ‖J‖ per θ.

CIFAR-10 (ResNet20, keys layer3.0, a 1,000-item cache of 100 seeded training images per class,
30 test images, 3 per class) when the data directory holds CIFAR-10 and the ResNet20 checkpoint;
then digits' default setup (digits-cnn, its default keys, the 225 test-part images).

    python benchmarks/theta_jacobian.py --data-dir data
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cacheviz.attacks import Victims
from cacheviz.cache import CacheMemory
from cacheviz.config import Setup
from cacheviz.features import extract, make_keys
from cacheviz.jacobian import cache_only_norms
from cacheviz.models import load_model
from cacheviz.progress import Silent
from cacheviz.robustness import load_victims
from cacheviz.study import Run

CIFAR_THETAS = (10, 30, 50, 90, 150, 200, 300, 500, 1000)
DIGITS_THETAS = (1, 3, 10, 30, 90, 200, 500)


def pick(root: Path, split: str, per: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """`per` seeded images of each class, the classes in name order."""
    xs, ys = [], []
    for c, d in enumerate(sorted((root / split).iterdir())):
        files = sorted(d.iterdir())
        xs += [np.asarray(Image.open(files[i]).convert("RGB")) for i in rng.choice(len(files), per, replace=False)]
        ys += [c] * per
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args()
    data = Path(args.data_dir)
    root, ckpt = data / "cifar10", data / "checkpoints" / "resnet20-12fca82f.th"
    if (root / "train").is_dir() and ckpt.is_file():
        rng = np.random.default_rng(0)
        spec = load_model("resnet20", data, checkpoint=ckpt)
        (kx, ky), (tx, _) = pick(root, "train", 100, rng), pick(root, "test", 3, rng)
        mem = CacheMemory(make_keys(extract(spec, kx, ["layer3.0"]), ["layer3.0"]), ky, 10)
        v = Victims(spec, mem, ["layer3.0"], 1.0, 0.5, 1.0)  # only its cache and key layers are used
        for t, n in cache_only_norms(v, spec.preprocess(tx), CIFAR_THETAS).items():
            print(f"CIFAR-10 θ {t:g}: mean {n.mean():.3g}, median {n.median():.3g}")
    else:
        print(f"no CIFAR-10 in {data} (cifar10/ and checkpoints/resnet20-12fca82f.th): digits only")
    ws, v, _ = load_victims(Setup(), Run(str(data), "cpu", 256, Silent()))
    x = ws.spec.preprocess(ws.ds.test_x[ws.split.test_idx])
    for t, n in cache_only_norms(v, x, DIGITS_THETAS).items():
        print(f"digits θ {t:g}: mean {n.mean():.3g}, median {n.median():.3g}")


if __name__ == "__main__":
    main()
