"""Tests of the model registry: architectures, checkpoints, preprocessing, tappable layers."""
from __future__ import annotations

import hashlib
import shutil
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from cacheviz import models
from cacheviz.__main__ import FLAGS
from cacheviz.errors import CachevizError
from cacheviz.models import ModelSpec, available_models, build_cifar_resnet, load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


class Opaque:
    """A class weights_only must refuse to unpickle."""


def _random_resnet(depth: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_cifar_resnet(depth)
    # Non-trivial BatchNorm statistics, so a checkpoint that loads them wrongly shows up.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _published_format(net: torch.nn.Module, path: Path) -> Path:
    # As the published files: under "state_dict", keys from DataParallel, no batch counters.
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"best_prec1": 91.7, "state_dict": state}, path)
    return path


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("no network")


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets and checkpoints


def test_published_format_checkpoint_reproduces_outputs(tmp_path):
    net = _random_resnet(20)
    ckpt = _published_format(net, tmp_path / "mine.th")
    spec = load_model("resnet20", tmp_path / "data", checkpoint=ckpt)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(spec.net(x), net(x), atol=1e-5)
    assert not spec.net.training
    assert spec.weights_id == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert models.weights_fingerprint("resnet20", tmp_path / "data", ckpt) == spec.weights_id
    assert spec.classes[:3] == ["airplane", "automobile", "bird"] and len(spec.classes) == 10
    assert (spec.input_size, spec.in_channels) == ((32, 32), 3)


def test_state_dict_keys_match_the_published_layout():
    net = build_cifar_resnet(20)
    keys = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert {"conv1.weight", "bn1.running_var", "layer3.2.conv2.weight", "layer2.0.bn1.bias", "linear.weight"} <= keys
    # Option A shortcuts have no parameters: only conv/bn/linear tensors, 97 as in the published file.
    assert len(keys) == 97
    assert all(k.split(".")[-2] in ("conv1", "conv2", "bn1", "bn2", "linear") for k in keys)
    assert sum(p.numel() for p in net.parameters()) == 269_722


def test_bare_state_dict_loads(tmp_path):
    net = _random_resnet(20, seed=1)
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    spec = load_model("resnet20", tmp_path, checkpoint=tmp_path / "bare.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(spec.net(x), net(x), atol=1e-5)


def test_checkpoint_of_another_depth_is_refused(tmp_path):
    ckpt = _published_format(_random_resnet(32), tmp_path / "resnet32.th")
    with pytest.raises(CachevizError, match="resnet20"):
        load_model("resnet20", tmp_path, checkpoint=ckpt)


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    torch.save(build_cifar_resnet(20, num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(CachevizError, match="linear"):
        load_model("resnet20", tmp_path, checkpoint=tmp_path / "c100.pt")


def test_garbage_and_missing_files_are_refused(tmp_path):
    (tmp_path / "garbage.th").write_bytes(b"not a checkpoint at all " * 20)
    with pytest.raises(CachevizError, match="resnet20"):
        load_model("resnet20", tmp_path, checkpoint=tmp_path / "garbage.th")
    with pytest.raises(CachevizError, match="does not exist"):
        load_model("resnet20", tmp_path, checkpoint=tmp_path / "nowhere.th")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "notensors.th")
    with pytest.raises(CachevizError, match="state_dict"):
        load_model("resnet20", tmp_path, checkpoint=tmp_path / "notensors.th")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": build_cifar_resnet(20).state_dict(), "extra": Opaque()}, tmp_path / "custom.th")
    with pytest.raises(CachevizError, match="plain state_dict saved with torch.save"):
        load_model("resnet20", tmp_path, checkpoint=tmp_path / "custom.th")


@pytest.mark.parametrize("name", ["resnet21", "resnet18", "resnet2"])
def test_depth_must_be_6n_plus_2(tmp_path, name):
    with pytest.raises(CachevizError, match="6n\\+2"):
        load_model(name, tmp_path)


def test_build_cifar_resnet_any_depth():
    with pytest.raises(CachevizError):
        build_cifar_resnet(21)
    net = build_cifar_resnet(8)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert len(net.layer3) == 1


def test_shortcut_option_a_is_parameter_free_subsample_and_pad():
    block = build_cifar_resnet(20).layer2[0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert not list(block.shortcut.parameters())


def test_resnet_layers_resolve_and_depths(tmp_path):
    ckpt = _published_format(_random_resnet(20), tmp_path / "r20.th")
    spec = load_model("resnet20", tmp_path, checkpoint=ckpt)
    names = [n for n, _ in spec.layers]
    depths = [d for _, d in spec.layers]
    modules = dict(spec.net.named_modules())
    assert names[0] == "input" and names[-2:] == ["logits", "probs"] and depths[0] == 0.0 and depths[-1] == 1.0
    assert all(n in modules for n in names[1:-2])
    # Increasing, with two ties: avgpool applies no weight layer, so it shares l with the last
    # block; the probabilities share l = L with the logits.
    steps = [b - a for a, b in zip(depths, depths[1:])]
    assert all(st >= 0 for st in steps) and sum(st == 0 for st in steps) == 2
    assert len(names) == 2 + 1 + 2 * 9 + 2
    d = dict(spec.layers)
    assert d["relu"] == pytest.approx(1 / 20)
    assert d["layer1.0.relu1"] == pytest.approx(2 / 20) and d["layer1.0"] == pytest.approx(3 / 20)
    assert d["layer3.2.relu1"] == pytest.approx(18 / 20) and d["layer3.2"] == pytest.approx(19 / 20)
    assert d["avgpool"] == pytest.approx(19 / 20)
    assert "layer1.0.relu2" not in d
    assert spec.default_layers == ["layer3.0.relu1", "layer3.1.relu1", "layer3.2.relu1"]
    assert set(spec.default_layers) <= set(names)


def test_block_output_is_its_relu2_output():
    net = _random_resnet(20)
    seen = {}
    for name in ("layer3.0", "layer3.0.relu2", "layer3.0.bn2"):
        dict(net.named_modules())[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    assert seen["layer3.0"] is seen["layer3.0.relu2"]
    assert seen["layer3.0"].shape == (2, 64, 8, 8)
    # The residual add must not write into bn2's output.
    assert (seen["layer3.0.bn2"] < 0).any()


def test_resnet_weights_from_data_dir_without_download(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    net = _random_resnet(20, seed=3)
    _published_format(net, ckpt_dir / "resnet20-12fca82f.th")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    spec = load_model("resnet20", tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(spec.net(x), net(x), atol=1e-5)


def test_no_network_download_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(CachevizError, match="resnet20-12fca82f.th") as err:
        load_model("resnet20", tmp_path)
    assert "pass checkpoint" in str(err.value) and str(tmp_path / "checkpoints") in str(err.value)
    assert "or pass --checkpoint PATH." in err.value.render(FLAGS)
    assert not list((tmp_path / "checkpoints").glob("*.th"))


def test_download_asks_for_the_published_file(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        _published_format(_random_resnet(56), Path(dst))

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    spec = load_model("resnet56", tmp_path)
    assert calls == [(models.RESNET_URL.format("resnet56-4bfd9763.th"), "4bfd9763")]
    assert (tmp_path / "checkpoints" / "resnet56-4bfd9763.th").exists()
    assert spec.default_layers == ["layer3.0", "layer3.4.relu1", "layer3.8"]  # blocks 0, 4 and 8 of 9
    calls.clear()
    load_model("resnet56", tmp_path)
    assert calls == []


def test_unpublished_depth_needs_a_checkpoint(tmp_path):
    with pytest.raises(CachevizError, match="pass checkpoint"):
        load_model("resnet14", tmp_path)
    ckpt = _published_format(_random_resnet(14), tmp_path / "r14.th")
    assert load_model("resnet14", tmp_path, checkpoint=ckpt).name == "resnet14"


def test_unknown_model_lists_available(tmp_path):
    with pytest.raises(CachevizError) as err:
        load_model("alexnet-cifar", tmp_path)
    for name in available_models():
        assert name in str(err.value)
    assert "torchvision:" in str(err.value)
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202", "digits-cnn"} == set(
        available_models()
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _cifar_spec() -> ModelSpec:
    layers, defaults = models._cifar_resnet_layers(20)
    return ModelSpec(
        "resnet20", build_cifar_resnet(20), (32, 32), 3, models.CIFAR_MEAN, models.CIFAR_STD,
        list(models.CIFAR10_CLASSES), layers, defaults, "test",
    )


def test_preprocess_gray_8x8_to_rgb_32():
    spec = _cifar_spec()
    x = torch.full((5, 8, 8, 1), 128, dtype=torch.uint8)
    out = spec.preprocess(x)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(models.CIFAR_MEAN)) / torch.tensor(models.CIFAR_STD)
    assert torch.allclose(out[0, :, 10, 10], expected, atol=1e-5)


def test_preprocess_same_size_is_exact_normalisation():
    spec = _cifar_spec()
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    out = spec.preprocess(x)
    mean = torch.tensor(models.CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (x.permute(0, 3, 1, 2).float() / 255 - mean) / std, atol=1e-6)
    assert torch.allclose(spec.normalize(spec.pixels01(x)), out)


def test_preprocess_rgb_to_one_channel():
    spec = models._digits_spec_shell(models.DigitsCNN(), "test")
    x = torch.randint(0, 256, (4, 28, 20, 3), dtype=torch.uint8)
    out = spec.preprocess(x)
    assert out.shape == (4, 1, 8, 8)
    x01 = spec.pixels01(x)
    assert x01.min() >= 0 and x01.max() <= 1
    rgb = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert torch.allclose(spec.pixels01(rgb)[:, 0], rgb.float().mean(-1) / 255, atol=1e-6)


def test_preprocess_rejects_bad_shapes():
    spec = _cifar_spec()
    with pytest.raises(CachevizError, match="N, H, W, C"):
        spec.preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(CachevizError):
        spec.preprocess(torch.zeros(32, 32, 3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# digits-cnn


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits-data")
    calls = []
    start = time.perf_counter()
    spec = load_model("digits-cnn", data_dir, progress=lambda done, total, msg: calls.append((done, total, msg)))
    return spec, data_dir, time.perf_counter() - start, calls


def test_digits_cnn_trains_fast_and_well(digits):
    from cacheviz.data import load_dataset

    spec, data_dir, seconds, calls = digits
    assert seconds < 40, f"training took {seconds:.1f} s"
    assert calls and calls[-1][0] == calls[-1][1] and calls[-1][2] == "training digits-cnn"
    assert len(calls) == calls[-1][1]
    ds = load_dataset("digits", data_dir)
    with torch.no_grad():
        acc = (spec.net(spec.preprocess(ds.test_x)).argmax(1) == ds.test_y).float().mean().item()
    assert acc >= 0.95
    assert (data_dir / "checkpoints" / "digits-cnn.pt").exists()
    assert not spec.net.training


def test_digits_cnn_is_reused_not_retrained(digits, monkeypatch):
    spec, data_dir, _, _ = digits

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(models, "train_digits_cnn", no_training)
    again = load_model("digits-cnn", data_dir, train_if_missing=False)
    assert again.weights_id == spec.weights_id
    x = torch.randint(0, 256, (3, 8, 8, 1), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again.net(again.preprocess(x)), spec.net(spec.preprocess(x)))


def test_digits_cnn_layers(digits):
    spec, _, _, _ = digits
    names = [n for n, _ in spec.layers]
    depths = [d for _, d in spec.layers]
    modules = dict(spec.net.named_modules())
    assert names[0] == "input" and names[-2:] == ["logits", "probs"]
    assert all(n in modules for n in names[1:-2])
    assert depths[0] == 0 and depths[-1] == depths[-2] == 1 and all(a < b for a, b in zip(depths, depths[1:-1]))
    assert spec.default_layers == [names[-3]]
    assert (spec.input_size, spec.in_channels, spec.classes) == ((8, 8), 1, [str(d) for d in range(10)])


def test_digits_cnn_untrained_without_training_is_an_error(tmp_path):
    with pytest.raises(CachevizError, match="digits-cnn"):
        load_model("digits-cnn", tmp_path, train_if_missing=False)


# ---------------------------------------------------------------------------------------------
# torchvision


def test_torchvision_registry_without_download(tmp_path):
    import torchvision

    spec = models._torchvision_spec("resnet18", tmp_path, pretrained=False)
    assert spec.name == "torchvision:resnet18"
    assert spec.input_size == (224, 224) and spec.in_channels == 3
    assert len(spec.classes) == 1000
    names = [n for n, _ in spec.layers]
    depths = [d for _, d in spec.layers]
    modules = dict(spec.net.named_modules())
    assert names[0] == "input" and names[-2:] == ["logits", "probs"]
    assert all(n in modules and n.count(".") <= 1 for n in names[1:-2])
    assert all(a < b for a, b in zip(depths, depths[1:-1])) and depths[-1] == depths[-2] == 1
    assert names[1:5] == ["conv1", "bn1", "relu", "maxpool"] and "layer4.1" in names and "fc" not in names
    assert spec.default_layers == ["avgpool"]

    # Resize-shorter-side + centre-crop must match the weights' own transform.
    tf = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
    img = torch.randint(0, 256, (1, 300, 400, 3), dtype=torch.uint8)
    ours = spec.preprocess(img)
    theirs = tf(img.permute(0, 3, 1, 2).float() / 255)
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_torchvision_no_network_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    before = torch.hub.get_dir()
    with pytest.raises(CachevizError, match="resnet18-.*pth") as err:
        load_model("torchvision:resnet18", tmp_path)
    assert str(tmp_path / "checkpoints" / "torch-hub") in str(err.value)
    assert torch.hub.get_dir() == before


def test_torchvision_unknown_name(tmp_path):
    with pytest.raises(CachevizError, match="list_models"):
        load_model("torchvision:resnet_nonexistent", tmp_path)


# ---------------------------------------------------------------------------------------------
# The published checkpoints (need ../shared)


def _shared_or_skip() -> Path:
    if not (SHARED / "weights" / "resnet20-12fca82f.th").exists():
        pytest.skip("needs the shared folder beside the repository")
    return SHARED


def _balanced_cifar_test_sample(root: Path, classes: list[str], per_class: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted((root / cls).glob("*.jpg"))
        for i in rng.choice(len(files), per_class, replace=False):
            with Image.open(files[i]) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


@pytest.mark.slow
@pytest.mark.parametrize("depth,file", [(20, "resnet20-12fca82f.th"), (56, "resnet56-4bfd9763.th")])
def test_shared_checkpoints_load_from_data_dir(tmp_path, monkeypatch, depth, file):
    shared = _shared_or_skip()
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(shared / "weights" / file, tmp_path / "checkpoints" / file)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    spec = load_model(f"resnet{depth}", tmp_path)
    # The 8 hex digits in the published name are the start of the file's SHA-256.
    assert spec.weights_id.startswith(file.split("-")[1][:8])
    assert spec.net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.slow
def test_shared_resnet20_accuracy(tmp_path):
    shared = _shared_or_skip()
    root = shared / "data" / "cifar10" / "test"
    if not root.is_dir():
        pytest.skip("needs the shared CIFAR-10 test images")
    spec = load_model("resnet20", tmp_path, checkpoint=shared / "weights" / "resnet20-12fca82f.th")
    x, y = _balanced_cifar_test_sample(root, spec.classes, per_class=200)
    with torch.no_grad():
        pred = torch.cat([spec.net(spec.preprocess(x[i : i + 500])).argmax(1) for i in range(0, len(x), 500)])
    acc = (pred == y).float().mean().item()
    assert abs(acc - 0.81) <= 0.02, f"accuracy {acc:.3f}"


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110, 1202])
def test_default_keys_are_three_stage3_layers_spread_over_the_stage(depth):
    n = (depth - 2) // 6
    keys, _ = models.cifar_resnet_default_keys(depth)
    names = [name for name, _ in models._cifar_resnet_layers(depth)[0]]
    assert set(keys) <= set(names) and all(k.startswith("layer3.") for k in keys)
    assert len(set(keys)) == min(3, n)
    blocks = [int(k.split(".")[1]) for k in keys]
    assert blocks == sorted(blocks)
    if depth == 20:
        assert keys == ["layer3.0.relu1", "layer3.1.relu1", "layer3.2.relu1"]  # the author's
    elif depth == 32:
        assert keys == ["layer3.0", "layer3.2.relu1", "layer3.3"]  # the author's
    elif n >= 3:
        assert keys == ["layer3.0", f"layer3.{n // 2}.relu1", f"layer3.{n - 1}"]
        assert blocks[0] == 0 and blocks[-1] == n - 1  # the first and last blocks: spread over the stage


def test_layers_lists_a_resnet_without_its_weights_and_says_why_the_defaults(tmp_path, capsys, monkeypatch):
    from cacheviz.__main__ import main

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert main(["layers", "--model", "resnet56", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer3.4.relu1" in out and "default keys: layer3.0, layer3.4.relu1, layer3.8" in out
    assert "blocks 0, 4 and 8" in out and "the weights were not loaded" in out
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
