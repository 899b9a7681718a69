"""Layer listing and one-pass multi-layer extraction."""
import pytest
import torch

from cacheviz.errors import CachevizError
from cacheviz.features import SignSketch, extract, list_layers, make_keys, resolve_layers


def _images(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)


def test_list_layers_shapes_and_depths(resnet20_random):
    infos = list_layers(resnet20_random)
    names = [i.name for i in infos]
    assert names[0] == "input" and names[-2:] == ["logits", "probs"]
    assert infos[0].depth == 0.0 and infos[-1].depth == infos[-2].depth == 1.0
    assert all(a.depth <= b.depth for a, b in zip(infos, infos[1:]))
    by = {i.name: i for i in infos}
    assert by["input"].shape == (3, 32, 32)
    assert by["layer1.0"].shape == (16, 32, 32)
    assert by["layer3.0.relu1"].shape == (64, 8, 8) and by["layer3.0.relu1"].dim == 4096
    assert by["logits"].shape == (10,) and by["probs"].shape == (10,)
    # every stage-3 block: inner ReLU and output are tappable
    for i in range(3):
        assert f"layer3.{i}.relu1" in by and f"layer3.{i}" in by


def test_one_pass_equals_separate_passes(resnet20_random):
    x = _images()
    layers = ["input", "layer1.0", "layer2.1.relu1", "layer3.2", "logits"]
    together = extract(resnet20_random, x, layers, batch_size=7)
    for name in layers:
        alone = extract(resnet20_random, x, [name], batch_size=20)[name]
        assert torch.allclose(together[name], alone, atol=1e-5), name
    # the block output is the tensor after its final ReLU
    assert (together["layer3.2"] >= 0).all()


def test_extraction_stops_early_without_logits(resnet20_random):
    """Asking only for an early layer must not run the rest of the net."""
    list_layers(resnet20_random)  # the one-off shape probe is a full forward; keep it out of the count
    calls = []
    h = resnet20_random.net.linear.register_forward_hook(lambda *a: calls.append(1))
    try:
        extract(resnet20_random, _images(4), ["layer1.0"])
        assert calls == []
        extract(resnet20_random, _images(4), ["layer1.0", "logits"])
        assert calls
    finally:
        h.remove()


def test_flip_appends_mirrored_items(resnet20_random):
    x = _images(6)
    f = extract(resnet20_random, x, ["layer3.0"], flip=True)["layer3.0"]
    assert f.shape[0] == 12
    mirrored = extract(resnet20_random, x.flip(2), ["layer3.0"])["layer3.0"]
    assert torch.allclose(f[6:], mirrored, atol=1e-5)
    assert torch.allclose(f[:6], extract(resnet20_random, x, ["layer3.0"])["layer3.0"], atol=1e-5)


def test_keys_are_unit_norm_concatenations(resnet20_random):
    feats = extract(resnet20_random, _images(5), ["layer2.0", "layer3.0"])
    keys = make_keys(feats, ["layer2.0", "layer3.0"])
    assert keys.shape == (5, 8192 + 4096)
    assert torch.allclose(keys.norm(dim=1), torch.ones(5), atol=1e-5)
    raw = torch.cat([feats["layer2.0"], feats["layer3.0"]], 1)
    assert torch.allclose(keys, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("relu", [False, True])
def test_projection_keeps_inner_products_within_jl_tolerance(relu):
    """Johnson-Lindenstrauss: with D dims, inner products of unit vectors move by ~1/sqrt(D)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8192, generator=g)
    x = torch.nn.functional.normalize(x.clamp_min(0) if relu else x, dim=1)  # ReLU maps are non-negative
    sketch = SignSketch(8192, 1024, seed=0, layer="layer1.0")
    y = sketch(x)
    err = (y @ y.T - x @ x.T).abs()
    # eps = 4/sqrt(D) is a generous JL bound for 60 points (log n / D ~ 0.004)
    assert err.max() < 4 / 1024**0.5
    assert err.mean() < 1.5 / 1024**0.5
    assert torch.equal(y, SignSketch(8192, 1024, seed=0, layer="layer1.0")(x))
    assert not torch.equal(y, SignSketch(8192, 1024, seed=1, layer="layer1.0")(x))
    # errors shrink as D grows
    e4096 = (SignSketch(8192, 4096, 0, "l")(x) @ SignSketch(8192, 4096, 0, "l")(x).T - x @ x.T).abs().mean()
    assert e4096 < err.mean()


def test_projected_extraction(resnet20_random):
    f = extract(resnet20_random, _images(4), ["layer1.0", "logits"], project_dim=256)
    assert f["layer1.0"].shape == (4, 256)
    assert f["logits"].shape == (4, 10)  # narrower than D: left exact


def test_unknown_layer_names_the_fix(resnet20_random):
    with pytest.raises(CachevizError) as err:
        resolve_layers(resnet20_random, ["layer3.0.relu"])
    assert err.value.param == "layers" and err.value.value == ["layer3.0.relu"]
    assert str(err.value).startswith("layers=['layer3.0.relu']: resnet20 has no layer 'layer3.0.relu'")
    assert "choose from input, relu, layer1.0.relu1" in str(err.value)
    with pytest.raises(CachevizError, match="closest: layer3.0.relu1"):
        resolve_layers(resnet20_random, "layer3.0.rel1")
    assert resolve_layers(resnet20_random, None) == ["layer3.0.relu1", "layer3.1.relu1", "layer3.2.relu1"]
    assert resolve_layers(resnet20_random, "layer3.0, layer3.1") == ["layer3.0", "layer3.1"]


def test_probs_are_the_softmax_of_the_logits_and_never_projected(resnet20_random):
    from cacheviz.features import forward_layers

    x = torch.randn(4, 3, 32, 32)
    only = forward_layers(resnet20_random, x, ["probs"])
    both = forward_layers(resnet20_random, x, ["logits", "probs"])
    assert set(only) == {"probs"} and set(both) == {"logits", "probs"}
    torch.testing.assert_close(only["probs"], torch.softmax(both["logits"], dim=1))
    torch.testing.assert_close(only["probs"].sum(1), torch.ones(4))
    feats = extract(resnet20_random, _images(6), ["layer3.0", "probs"], project_dim=8)
    assert feats["layer3.0"].shape == (6, 8) and feats["probs"].shape == (6, 10)


def test_tapped_forward_passes_of_one_net_from_two_threads_do_not_mix(digits_spec):
    """Two sessions of the app query one shared net: their taps must not collect each other's
    activations (hooks live on the module) nor stop each other's pass."""
    import threading

    from cacheviz.features import forward_layers

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2048, 1, 8, 8, generator=g) for _ in range(2)]
    asks = [["relu2", "relu3", "logits"], ["relu2"]]  # the second stops its pass after relu2
    want = [forward_layers(digits_spec, x, ask) for x, ask in zip(xs, asks)]
    errors = []

    def work(i):
        for _ in range(10):
            try:
                got = forward_layers(digits_spec, xs[i], asks[i])
            except Exception as exc:  # noqa: BLE001 - the other pass's stop signal, say
                errors.append((i, type(exc).__name__))
                continue
            for name in asks[i]:
                if got.get(name) is None or not torch.equal(got[name], want[i][name]):
                    errors.append((i, name))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
