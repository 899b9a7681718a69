"""Tests of cacheviz.data: datasets as uint8 tensors, seeded stratified splits, the tensor-file cache."""
from __future__ import annotations

import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cacheviz import data
from cacheviz.data import (
    KNOWN_DATASETS,
    Dataset,
    balanced_subset,
    load_dataset,
    make_split,
    stratified_split,
)
from cacheviz.errors import CachevizError

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _counts(labels: torch.Tensor, n_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=n_classes).tolist()


def _fake_dataset(train_per_class: list[int], test_per_class: list[int]) -> Dataset:
    train_y = torch.cat([torch.full((n,), k) for k, n in enumerate(train_per_class)])
    test_y = torch.cat([torch.full((n,), k) for k, n in enumerate(test_per_class)])
    # Interleave so that "class by class" storage is not what makes the tests pass.
    train_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    return Dataset(
        name="fake",
        train_x=torch.zeros(len(train_y), 2, 2, 1, dtype=torch.uint8),
        train_y=train_y,
        test_x=torch.zeros(len(test_y), 2, 2, 1, dtype=torch.uint8),
        test_y=test_y,
        classes=[str(k) for k in range(len(train_per_class))],
        fingerprint="fake",
    )


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_classes(tmp_path):
    ds = load_dataset("digits", tmp_path / "d")
    assert ds.name == "digits"
    assert ds.train_x.shape == (1348, 8, 8, 1) and ds.test_x.shape == (449, 8, 8, 1)
    assert ds.train_x.dtype == torch.uint8 and ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    assert ds.classes == [str(d) for d in range(10)]
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    # The fixed split is stratified: every digit is about a quarter in the test set.
    total = torch.bincount(torch.cat([ds.train_y, ds.test_y]), minlength=10).double()
    share = torch.bincount(ds.test_y, minlength=10).double() / total
    assert torch.all((share - 0.25).abs() < 0.02)
    assert (tmp_path / "d").is_dir()


def test_digits_split_is_deterministic(tmp_path):
    a = load_dataset("digits", tmp_path)
    b = load_dataset("DIGITS", tmp_path)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) >= 8


def test_unknown_dataset_names_the_choices(tmp_path):
    with pytest.raises(CachevizError) as err:
        load_dataset("imagenet", tmp_path)
    for known in KNOWN_DATASETS:
        assert known in str(err.value)
    assert "folder:" in str(err.value)


# --- stratified_split --------------------------------------------------------------------------


def test_stratified_split_exact_and_proportional():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    first, rest = stratified_split(labels, 37, seed=3)
    assert len(first) == 37 and len(rest) == 63
    assert first.dtype == torch.int64 and rest.dtype == torch.int64
    assert torch.equal(first, first.sort().values) and torch.equal(rest, rest.sort().values)
    assert not set(first.tolist()) & set(rest.tolist())
    assert sorted(first.tolist() + rest.tolist()) == list(range(100))
    # 37% of 50/30/20 = 18.5/11.1/7.4 -> floors 18/11/7 (36), the largest remainder (.5) gets one more.
    assert _counts(labels[first], 3) == [19, 11, 7]


def test_stratified_split_seeds():
    labels = torch.arange(200) % 4
    a1, _ = stratified_split(labels, 80, seed=0)
    a2, _ = stratified_split(labels, 80, seed=0)
    b, _ = stratified_split(labels, 80, seed=1)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)
    assert _counts(labels[b], 4) == [20, 20, 20, 20]


def test_stratified_split_edges_and_bad_sizes():
    labels = torch.tensor([0, 0, 1, 1, 1])
    first, rest = stratified_split(labels, 0, seed=0)
    assert len(first) == 0 and len(rest) == 5
    first, rest = stratified_split(labels, 5, seed=0)
    assert len(first) == 5 and len(rest) == 0
    for bad in (-1, 6):
        with pytest.raises(CachevizError):
            stratified_split(labels, bad, seed=0)


# --- balanced_subset ---------------------------------------------------------------------------


def test_balanced_subset_is_balanced_sorted_and_seeded():
    labels = torch.arange(1000) % 10
    idx = balanced_subset(labels, 95, seed=0)
    assert len(idx) == 95 and len(set(idx.tolist())) == 95
    assert torch.equal(idx, idx.sort().values)
    counts = _counts(labels[idx], 10)
    assert max(counts) - min(counts) <= 1
    assert torch.equal(idx, balanced_subset(labels, 95, seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 95, seed=1))


def test_balanced_subset_small_class_gives_all_and_others_share():
    labels = torch.tensor([0] * 3 + [1] * 100 + [2] * 100)
    idx = balanced_subset(labels, 60, seed=0)
    assert _counts(labels[idx], 3) == [3, 28, 29] or _counts(labels[idx], 3) == [3, 29, 28]


def test_balanced_subset_limit_at_least_len_returns_all():
    labels = torch.tensor([1, 0, 1])
    assert balanced_subset(labels, 3, seed=0).tolist() == [0, 1, 2]
    assert balanced_subset(labels, 10, seed=5).tolist() == [0, 1, 2]


# --- make_split --------------------------------------------------------------------------------


def test_make_split_validation_from_test():
    ds = _fake_dataset([30] * 4, [25] * 4)
    s = make_split(ds, seed=0, val_fraction=0.4)
    assert s.val_part == "test"
    assert len(s.val_idx) == 40 and len(s.test_idx) == 60
    assert not set(s.val_idx.tolist()) & set(s.test_idx.tolist())
    assert sorted(s.val_idx.tolist() + s.test_idx.tolist()) == list(range(100))
    assert _counts(ds.test_y[s.val_idx], 4) == [10] * 4
    assert torch.equal(s.cache_val_idx, torch.arange(120)) and torch.equal(s.cache_test_idx, torch.arange(120))
    again = make_split(ds, seed=0, val_fraction=0.4)
    assert torch.equal(again.val_idx, s.val_idx)


def test_make_split_validation_from_train_with_limits():
    ds = _fake_dataset([30] * 4, [25] * 4)
    s = make_split(ds, seed=2, val_from_train=20, train_limit=80, test_limit=40)
    assert s.val_part == "train"
    assert len(s.cache_test_idx) == 80 and _counts(ds.train_y[s.cache_test_idx], 4) == [20] * 4
    assert len(s.test_idx) == 40 and _counts(ds.test_y[s.test_idx], 4) == [10] * 4
    val, cval, ctest = set(s.val_idx.tolist()), set(s.cache_val_idx.tolist()), set(s.cache_test_idx.tolist())
    assert len(val) == 20 and _counts(ds.train_y[s.val_idx], 4) == [5] * 4
    assert not val & cval
    assert cval <= ctest and val <= ctest and val | cval == ctest


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_from_train": -1},
        {"val_from_train": 120},
        {"val_from_train": 50, "train_limit": 50},
        {"val_fraction": 0.0},
        {"val_fraction": 1.0},
        {"val_fraction": 1.5},
        {"train_limit": 3},
        {"test_limit": 2},
        {"val_fraction": 0.001},
    ],
)
def test_make_split_rejects_nonsense(kwargs):
    ds = _fake_dataset([30] * 4, [25] * 4)
    with pytest.raises(CachevizError):
        make_split(ds, **kwargs)


# --- image folders -----------------------------------------------------------------------------


def _write_tree(root: Path, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else None
    for part, n in (("train", 4), ("test", 2)):
        for cls in ("dog", "cat"):
            d = root / part / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (6, 5, channels) if channels else (6, 5)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")


def test_folder_tree_loads_with_corrupt_and_odd_sized_files(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (11, 9), (200, 10, 10)).save(root / "train" / "dog" / "big.jpg")
    (root / "train" / "dog" / "notes.txt").write_text("ignored")
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(f"folder:{root}", tmp_path / "cache", progress=lambda d, t, m: calls.append((d, t)))
    messages = " ".join(str(w.message) for w in caught)
    assert "Skipped 1 unreadable" in messages and "Resized 1" in messages
    assert ds.name == f"folder:{root.resolve()}"
    assert ds.classes == ["cat", "dog"]
    assert ds.train_x.shape == (9, 6, 5, 3) and ds.test_x.shape == (4, 6, 5, 3)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert _counts(ds.train_y, 2) == [4, 5] and _counts(ds.test_y, 2) == [2, 2]
    # The odd-sized image was uniformly red, so it still is after resizing (give or take JPEG).
    px = ds.train_x.int()
    red = ds.train_x[((px[..., 0] - 200).abs() < 8).all(dim=(1, 2)) & (px[..., 1] < 30).all(dim=(1, 2))]
    assert len(red) == 1
    assert calls and calls[-1][0] == calls[-1][1] == 14  # 13 images + the broken file
    saved = np.asarray(Image.open(root / "test" / "cat" / "0.png"))
    assert any(np.array_equal(saved, x.numpy()) for x in ds.test_x)


def test_grayscale_tree_gives_one_channel(tmp_path):
    _write_tree(tmp_path / "gray", mode="L")
    ds = load_dataset(f"folder:{tmp_path / 'gray'}", tmp_path / "cache")
    assert ds.train_x.shape == (8, 6, 5, 1)


def test_relative_paths(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("folder:tree", "rel-cache")
    assert ds.name == f"folder:{(tmp_path / 'tree').resolve()}"
    assert list((tmp_path / "rel-cache" / "tensors").glob("*.safetensors"))


def test_folder_layout_errors(tmp_path):
    with pytest.raises(CachevizError, match=r"train/<class>/<images>"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}", tmp_path)
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(CachevizError, match="no test/ subfolder"):
        load_dataset(f"folder:{tmp_path / 'only'}", tmp_path)
    (tmp_path / "only" / "test" / "a").mkdir(parents=True)
    with pytest.raises(CachevizError, match="No image files"):
        load_dataset(f"folder:{tmp_path / 'only'}", tmp_path)
    _write_tree(tmp_path / "stray")
    (tmp_path / "stray" / "test" / "bird").mkdir()
    with pytest.raises(CachevizError, match="bird"):
        load_dataset(f"folder:{tmp_path / 'stray'}", tmp_path)


def test_tensor_file_is_reused_then_rebuilt_when_stale_or_corrupt(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _write_tree(root)
    first = load_dataset(f"folder:{root}", cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the tensor file")

    real_decode = data._decode_all
    monkeypatch.setattr(data, "_decode_all", no_decoding)
    second = load_dataset(f"folder:{root}", cache)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert first.fingerprint == second.fingerprint and first.classes == second.classes

    monkeypatch.setattr(data, "_decode_all", real_decode)
    data.forget_decoded()  # the in-process copy is right; the file is what this test damages
    (tensor_file,) = (cache / "tensors").glob("*.safetensors")
    tensor_file.write_bytes(tensor_file.read_bytes()[:-40] + b"\0" * 40)
    with pytest.warns(UserWarning, match="rebuilt"):
        third = load_dataset(f"folder:{root}", cache)
    assert torch.equal(first.train_x, third.train_x)

    Image.new("RGB", (5, 6), (0, 0, 0)).save(root / "train" / "cat" / "extra.png")
    with pytest.warns(UserWarning, match="rebuilt"):
        fourth = load_dataset(f"folder:{root}", cache)
    assert len(fourth.train_x) == len(first.train_x) + 1
    assert fourth.fingerprint != first.fingerprint
    assert len(list((cache / "tensors").glob("*.safetensors"))) == 1


# --- torchvision datasets ----------------------------------------------------------------------


def test_download_failure_names_the_offline_options(tmp_path, monkeypatch):
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    with pytest.raises(CachevizError) as err:
        load_dataset("cifar10", tmp_path)
    text = str(err.value)
    assert "Could not download CIFAR-10" in text and "digits" in text and str(tmp_path / "cifar10") in text
    with pytest.raises(CachevizError, match="downloading is off"):
        load_dataset("CIFAR-10", tmp_path, download=False)


def test_torchvision_data_is_converted_and_cached(tmp_path, monkeypatch):
    import torchvision.datasets

    made = []

    class FakeMNIST:
        classes = ["0 - zero", "1 - one"]

        def __init__(self, root, train, download):
            made.append(train)
            n = 6 if train else 4
            self.data = torch.arange(n * 28 * 28, dtype=torch.int64).reshape(n, 28, 28).remainder(256).to(torch.uint8)
            self.targets = torch.arange(n) % 2

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = load_dataset("mnist", tmp_path)
    assert ds.train_x.shape == (6, 28, 28, 1) and ds.test_x.shape == (4, 28, 28, 1)
    assert ds.train_y.dtype == torch.int64 and ds.classes == ["0 - zero", "1 - one"]
    again = load_dataset("mnist", tmp_path, download=False)
    assert made == [True, False]
    assert torch.equal(ds.train_x, again.train_x) and again.classes == ds.classes


def test_local_folder_tree_wins_over_download(tmp_path, monkeypatch):
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise AssertionError("touched the network although a local tree exists")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", NoNetwork)
    _write_tree(tmp_path / "fashion-mnist", mode="L")
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.train_x.shape == (8, 6, 5, 1)


# --- the real CIFAR-10 folder ------------------------------------------------------------------


@pytest.mark.slow
def test_shared_cifar10_folder(tmp_path):
    root = SHARED / "data" / "cifar10"
    if not root.is_dir():
        pytest.skip("../shared/data/cifar10 is not available on this machine")
    start = time.perf_counter()
    ds = load_dataset(f"folder:{root}", tmp_path)
    first = time.perf_counter() - start
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
    assert len(ds.classes) == 10 and ds.classes[0] == "airplane"
    assert _counts(ds.train_y, 10) == [5000] * 10 and _counts(ds.test_y, 10) == [1000] * 10
    start = time.perf_counter()
    again = load_dataset(f"folder:{root}", tmp_path)
    second = time.perf_counter() - start
    print(f"CIFAR-10 folder: first load {first:.1f} s, second {second:.2f} s")
    assert second < 2.0 and second < first / 5
    assert torch.equal(ds.test_x, again.test_x) and ds.fingerprint == again.fingerprint
