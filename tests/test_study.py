"""The study contract: keys that cannot go stale, damaged results recomputed, lookups that load nothing."""
from __future__ import annotations

import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cacheviz import store
from cacheviz.config import Setup
from cacheviz.experiment import Evaluate
from cacheviz.models import DigitsCNN
from cacheviz.progress import Stage
from cacheviz.sweeps import LayerSweep, SizeSweep, Table1

SETUP = Setup(dataset="digits", model="digits-cnn", layers=("relu3",))


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
    """A data directory of this module's own: its tests replace weights and data in it."""
    d = tmp_path_factory.mktemp("study")
    Evaluate(SETUP).run(d, "cpu")  # trains digits-cnn once
    return d


def _weights(d):
    return d / "checkpoints" / "digits-cnn.pt"


def test_nothing_changed_gives_the_stored_result_at_once(ddir, monkeypatch):
    first = Evaluate(SETUP).run(ddir, "cpu")
    import cacheviz.data
    import cacheviz.models
    import cacheviz.study
    import cacheviz.workspace

    def refuse(*_a, **_k):
        pytest.fail("a lookup loaded data or a model, or computed")

    for mod, name in ((cacheviz.study, "prepare"), (cacheviz.workspace, "load_dataset"),
                      (cacheviz.workspace, "load_model"), (cacheviz.workspace, "extract"),
                      (cacheviz.data, "load_dataset"), (cacheviz.models, "load_model")):
        monkeypatch.setattr(mod, name, refuse)
    t0 = time.perf_counter()
    assert Evaluate(SETUP).lookup(ddir) == first == Evaluate(SETUP).run(ddir, "cpu")
    assert time.perf_counter() - t0 < 2
    # not stored: None, and still nothing loaded
    assert Evaluate(SETUP.replace(seed=7)).lookup(ddir) is None
    assert LayerSweep(SETUP, layers=("pool",)).lookup(ddir) is None


def test_swapped_weights_give_new_numbers_without_force(ddir):
    before = Evaluate(SETUP).run(ddir, "cpu")
    original = _weights(ddir).read_bytes()
    torch.manual_seed(123)
    other = DigitsCNN()  # untrained: about chance
    try:
        torch.save(other.state_dict(), _weights(ddir))
        assert Evaluate(SETUP).lookup(ddir) is None, "a result stored for other weights was served"
        after = Evaluate(SETUP).run(ddir, "cpu")
        assert after["baseline_acc"] < 0.5 < before["baseline_acc"]
        assert after["inputs"]["weights"] == hashlib.sha256(_weights(ddir).read_bytes()).hexdigest()
        assert after["inputs"]["weights"] != before["inputs"]["weights"]
    finally:
        store.atomic_write_bytes(_weights(ddir), original)
    assert Evaluate(SETUP).lookup(ddir) == before  # the original weights: their result, at once


def test_a_checkpoint_path_is_keyed_by_its_content(ddir, tmp_path):
    path = tmp_path / "mine.pt"
    shutil.copy(_weights(ddir), path)
    setup = SETUP.replace(checkpoint=str(path))
    # the same weights elsewhere: the same key, so the stored result, computed nothing
    assert Evaluate(setup).key(ddir) == Evaluate(SETUP).key(ddir)
    assert Evaluate(setup).lookup(ddir) == Evaluate(SETUP).run(ddir, "cpu")
    torch.manual_seed(5)
    torch.save(DigitsCNN().state_dict(), path)
    assert Evaluate(setup).lookup(ddir) is None
    assert Evaluate(setup).run(ddir, "cpu")["baseline_acc"] < 0.5


def _write_folder(root, n_train=30, n_test=15, invert_test=False):
    """An image-folder tree of real 8x8 digits (a few per class)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    imgs = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    for part, lo, n in (("train", 0, n_train), ("test", 1000, n_test)):
        for c in range(10):
            (root / part / str(c)).mkdir(parents=True, exist_ok=True)
            idx = [i for i in range(lo, len(imgs)) if bunch.target[i] == c][:n]
            for k, i in enumerate(idx):
                im = 255 - imgs[i] if (invert_test and part == "test") else imgs[i]
                Image.fromarray(im).save(root / part / str(c) / f"{k:03d}.png")


def test_changed_folder_content_gives_new_numbers_without_force(ddir, tmp_path):
    root = tmp_path / "tree"
    _write_folder(root)
    setup = SETUP.replace(dataset=f"folder:{root}")
    before = Evaluate(setup).run(ddir, "cpu")
    assert Evaluate(setup).lookup(ddir) == before
    _write_folder(root, invert_test=True)  # same names, new pixels (new sizes and times)
    assert Evaluate(setup).lookup(ddir) is None, "a result of the old images was served"
    with pytest.warns(UserWarning, match="another state"):  # the decoded tensors are redone too
        after = Evaluate(setup).run(ddir, "cpu")
    assert after["baseline_acc"] != before["baseline_acc"]
    assert after["inputs"]["dataset"] != before["inputs"]["dataset"]


@pytest.mark.parametrize("change", [
    dict(seed=1), dict(flip=True), dict(train_limit=500), dict(test_limit=200), dict(val_from_train=100),
    dict(val_fraction=0.3), dict(project_dim=64), dict(n_theta=5), dict(n_lam=3), dict(layers=("pool",)),
])
def test_every_option_is_in_the_key(ddir, change):
    base, other = Evaluate(SETUP), Evaluate(SETUP.replace(**change))
    assert base.key(ddir) != other.key(ddir)
    assert base.path(ddir, base.key(ddir)) != other.path(ddir, other.key(ddir))


def test_study_options_are_in_the_key(ddir):
    keys = {json.dumps(s.key(ddir), sort_keys=True) for s in (
        LayerSweep(SETUP), LayerSweep(SETUP, retune=True), LayerSweep(SETUP, layers=("pool",)),
        SizeSweep(SETUP), SizeSweep(SETUP, seeds=(0, 2)), SizeSweep(SETUP, fractions=(0, 1)),
        Table1(SETUP), Table1(SETUP, combine_top=2), Evaluate(SETUP))}
    assert len(keys) == 9
    # the device and the checkpoint's path are not: results are the same numbers wherever made
    assert Evaluate(SETUP).key(ddir)["options"]["setup"].get("checkpoint", "absent") == "absent"


def _stored(study, ddir):
    key = study.key(ddir)
    return study.path(ddir, key), key


def _sha(key, result):
    body = json.loads(json.dumps({"key": key, "result": result}, sort_keys=True))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize("damage", ["truncated", "edited number", "ill-typed", "other key", "not json", "tensors"])
def test_a_damaged_result_is_recomputed_with_a_warning(ddir, damage):
    study = Evaluate(SETUP.replace(layers=("pool",)))
    good = study.run(ddir, "cpu")
    path, key = _stored(study, ddir)
    doc = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif damage == "edited number":
        doc["result"]["cache_acc"] = 1.0  # valid JSON, checksum left as it was
        path.write_text(json.dumps(doc))
    elif damage == "ill-typed":  # a consistent checksum over a result of the wrong shape
        doc["result"] = "high"
        doc["sha256"] = _sha(key, doc["result"])
        path.write_text(json.dumps(doc))
    elif damage == "other key":
        doc["key"]["options"]["setup"]["seed"] = 99
        doc["sha256"] = _sha(doc["key"], doc["result"])
        path.write_text(json.dumps(doc))
    elif damage == "not json":
        path.write_bytes(b"\x00\xff garbage")
    else:
        tensors = path.with_suffix(".safetensors")
        tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unusable"):
        assert study.lookup(ddir) is None
    with pytest.warns(UserWarning, match="unusable"):
        again = study.run(ddir, "cpu")
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in good.items() if k != "seconds"}
    assert study.lookup(ddir) == again  # repaired


def test_the_cli_says_a_damaged_result_is_recomputed(ddir, capsys):
    from cacheviz.__main__ import main

    study = Evaluate(SETUP)
    path, _ = _stored(study, ddir)
    doc = json.loads(path.read_text())
    doc["result"]["baseline_acc"] = 0.5
    path.write_text(json.dumps(doc))
    assert main(["evaluate", "--dataset", "digits", "--layers", "relu3", "--data-dir", str(ddir)]) == 0
    out, err = capsys.readouterr()
    assert "warning:" in err and "unusable (checksum mismatch); it will be recomputed" in err
    assert "50.00%" not in out


def test_stages_are_announced_by_name(ddir):
    seen = []

    class Rec:
        def stage(self, name):
            seen.append(name)

        def step(self, done, total, detail=""):
            pass

    Evaluate(SETUP.replace(seed=3)).run(ddir, "cpu", progress=Rec())
    assert seen == list(Evaluate.stages) == [Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, Stage.TUNE,
                                             Stage.TEST]
