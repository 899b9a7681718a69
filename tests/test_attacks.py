"""The robustness lab's engine: attacks, their searches, the studies and their bad input."""
from __future__ import annotations

import math

import pytest
import torch

from cacheviz import attacks as A
from cacheviz.cache import CacheMemory
from cacheviz.config import Setup
from cacheviz.errors import CachevizError
from cacheviz.models import ModelSpec
from cacheviz.robustness import Attack, Curve, attack_study, load_victims
from cacheviz.study import Run
from cacheviz.progress import Silent

N = 12


@pytest.fixture(scope="module")
def victims(data_dir):
    run = Run(data_dir, "cpu", 256, Silent())
    ws, v, result = load_victims(Setup(), run)
    x = ws.spec.preprocess(ws.ds.test_x[ws.split.test_idx[:N]])
    return v, x, ws


@pytest.mark.parametrize("attack", A.MINIMAL_ATTACKS)
def test_each_minimal_attack_end_to_end(data_dir, attack):
    rows = Attack(Setup(), attack, "network", n=N, seed=1).run(data_dir, device="cpu")
    assert [r["model"] for r in rows] == list(A.MODELS)
    net = rows[0]
    assert 0 < net["success_rate"] <= 1 and net["n"] == N
    assert net["n_failed"] == round(N * (1 - net["success_rate"]))
    # the network's own adversarials: every success flipped its answer, so it is right on fewer
    assert net["accuracy"] <= net["clean_accuracy"] - net["success_rate"] + 1e-6 + (1 - net["clean_accuracy"])
    assert net["rho_adv"] > 0
    for r in rows:
        assert r["attack"] == attack and r["against"] == "network" and r["seed"] == 1
    assert rows[1]["theta"] is not None and rows[2]["lam"] == 1.0


@pytest.mark.parametrize("attack", A.CURVE_ATTACKS)
def test_each_curve_end_to_end(data_dir, attack):
    strengths = {"blur": (0.0, 1.0, 3.0), "l2": (0.0, 2.0, 8.0)}.get(attack, (0.0, 0.1, 0.4))
    if attack in ("brightness", "contrast", "gamma"):
        strengths = (0.25, 1.0, 2.0)
    rows = Curve(Setup(), attack, "cache", strengths, n=N).run(data_dir, device="cpu")
    assert len(rows) == 3 * len(strengths)
    by = {(r["model"], r["epsilon"]): r for r in rows}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1
        assert r["sem"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / N), abs=1e-6)
    if attack in A.CORRUPTIONS:
        assert all(r["against"] is None for r in rows)
    else:
        clean = by[("cache", 0.0)]["accuracy"]
        assert by[("cache", max(strengths))]["accuracy"] < clean  # white-box: its own adversarials hurt it


def test_identity_strengths_change_nothing(victims):
    v, x, ws = victims
    for kind, f in (("blur", 0.0), ("brightness", 1.0), ("contrast", 1.0), ("gamma", 1.0)):
        assert torch.allclose(A.corrupt(ws.spec, x, kind, f), x, atol=1e-5), kind


def test_blur_per_image_sigma_and_constant_image():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    sig = torch.tensor([0.0, 1.0, 2.5])
    both = A.gaussian_blur(x, sig)
    for i in range(3):
        assert torch.allclose(both[i], A.gaussian_blur(x[i:i + 1], float(sig[i]))[0], atol=1e-5)
    assert torch.equal(both[0], x[0])
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(A.gaussian_blur(flat, 5.0), flat, atol=1e-5)  # weights sum to one
    assert both[2].std() < x[2].std()


def test_fgsm_and_ifgsm_match_foolbox(victims):
    fb = pytest.importorskip("foolbox")
    v, x, _ = victims
    for which in A.MODELS:
        model = v.log_probs(which)
        labels = v.predict(which, x)
        fmodel = A.foolbox_model(v, which)
        crit = fb.criteria.Misclassification(labels)
        eps = 0.15
        ours = v.clip(x + eps * A.fgsm_direction(model, x, labels))
        _, theirs, _ = fb.attacks.FGSM()(fmodel, x, crit, epsilons=eps)
        assert torch.allclose(ours, v.clip(theirs), atol=1e-5), which
        ours = A.ifgsm(model, x, labels, eps, v.clip)
        _, theirs, _ = fb.attacks.LinfBasicIterativeAttack(steps=A.IFGSM_STEPS, rel_stepsize=A.IFGSM_REL_STEP)(
            fmodel, x, crit, epsilons=eps)
        # digits has one channel, so Foolbox's scalar bounds are exactly the per-channel range
        assert torch.allclose(ours, v.clip(theirs), atol=1e-4), which


# A CIFAR-shaped victim whose normalisation gives every channel its own range: equal std, so
# Foolbox 3 can take the exact same attack on pixels in [0, 1] with its own `preprocessing`
# (an L-inf ball of eps in the normalised space is eps * std on the pixels); different means,
# so the normalised bounds are [-1, 3], [-2, 2] and [-3, 1], while one scalar range holding
# them all is [-3, 3]. (With unequal stds, as the real CIFAR checkpoints have, no Foolbox 3
# model takes the engine's attack: its bounds are scalars, and on pixels the ball is not a cube.)
RGB_MEAN, RGB_STD = (0.25, 0.5, 0.75), 0.25


@pytest.fixture(scope="module")
def victims_rgb(resnet20_random):
    import copy
    import dataclasses

    from cacheviz.features import forward_layers, make_keys

    spec = dataclasses.replace(resnet20_random, net=copy.deepcopy(resnet20_random.net), mean=RGB_MEAN,
                               std=(RGB_STD,) * 3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        acts = forward_layers(spec, spec.normalize(torch.rand(40, 3, 32, 32, generator=g)), ["layer3.0"])
    mem = CacheMemory(make_keys({"layer3.0": acts["layer3.0"].flatten(1)}, ["layer3.0"]), torch.arange(40) % 10, 10)
    v = A.Victims(spec, mem, ["layer3.0"], 30.0, 0.5, 30.0)
    assert v.lo.flatten().tolist() == [-1.0, -2.0, -3.0] and v.hi.flatten().tolist() == [3.0, 2.0, 1.0]
    x01 = torch.rand(4, 3, 32, 32, generator=g)
    return v, x01, spec.normalize(x01)


def _foolbox_rgb(fb, v, which):
    """`which` as Foolbox sees a normalised 3-channel model: pixels in [0, 1] and its preprocessing."""
    return fb.PyTorchModel(v.log_probs(which).eval(), bounds=(0.0, 1.0),
                           preprocessing=dict(mean=list(RGB_MEAN), std=[RGB_STD] * 3, axis=-3))


def test_fgsm_and_ifgsm_match_foolbox_with_per_channel_bounds(victims_rgb):
    """The 1-channel check above on three channels, each with its own bounds: Foolbox clips its
    pixels to [0, 1], the engine clips the normalised input per channel; same adversarials."""
    fb = pytest.importorskip("foolbox")
    v, x01, x = victims_rgb
    spec = v.spec
    for which in A.MODELS:
        model = v.log_probs(which)
        labels = v.predict(which, x)
        fmodel = _foolbox_rgb(fb, v, which)
        crit = fb.criteria.Misclassification(labels)
        eps = 0.15
        ours = v.clip(x + eps * A.fgsm_direction(model, x, labels))
        _, theirs, _ = fb.attacks.FGSM()(fmodel, x01, crit, epsilons=eps * RGB_STD)
        # float32 rounding of the pixel <-> normalised round trip only (measured: 2.4e-7)
        assert torch.allclose(ours, spec.normalize(theirs), atol=1e-5), which
        # not vacuous: some values sit on a channel's own upper bound, below the scalar one (3)
        assert bool(((ours == v.hi) & (v.hi < v.bounds[1])).any()), which
        ours = A.ifgsm(model, x, labels, eps, v.clip)
        _, theirs, _ = fb.attacks.LinfBasicIterativeAttack(steps=A.IFGSM_STEPS, rel_stepsize=A.IFGSM_REL_STEP)(
            fmodel, x01, crit, epsilons=eps * RGB_STD)
        # Ten steps: that 1-ulp rounding can, late on, flip the sign of a gradient entry near
        # zero, which moves that value by a step or two (0.2 eps each). Measured: none for the
        # network and the cache; for the cache-only model 10 of the 12,288 values (0.08%), all
        # in one image, from the 7th step on. So: all values within 1e-4 as on one channel, but
        # for at most 1% of them. Clipping to the scalar range [-3, 3] instead of each channel's
        # own moves about 4% (measured on 8 images against Foolbox with the scalar bounds).
        off = (ours - spec.normalize(theirs)).abs() > 1e-4
        assert float(off.float().mean()) <= 1e-2, which


@pytest.mark.parametrize("attack", A.GRADIENT_ATTACKS)
def test_minimal_epsilon_and_rho_match_foolbox_with_per_channel_bounds(victims_rgb, attack):
    """The minimal search (grid, then bisection) against Foolbox 3 on three channels with their
    own bounds: at the engine's epsilon Foolbox's attack flips the label and gives the same
    adversarial and rho_adv; at the bracket's lower end, (grid step) / 2**BISECT below, it does
    not. So the engine's minimal epsilon is Foolbox's flip point within the search's resolution."""
    fb = pytest.importorskip("foolbox")
    v, x01, x = victims_rgb
    grid32 = torch.tensor(A._grid(attack, 32, 32), dtype=torch.float32)
    grid = [0.0, *A._grid(attack, 32, 32)]
    fb_attack = fb.attacks.FGSM() if attack == "fgsm" else \
        fb.attacks.LinfBasicIterativeAttack(steps=A.IFGSM_STEPS, rel_stepsize=A.IFGSM_REL_STEP)
    for which in A.MODELS:
        res = A.minimal(v, which, attack, x, seed=0)
        assert bool(res.success.all()), which  # random weights: every image flips well inside 0.5
        labels = v.predict(which, x)
        fmodel = _foolbox_rgb(fb, v, which)
        for i in range(len(x)):
            e = float(res.strength[i])
            k = int(torch.searchsorted(grid32, res.strength[i]))  # the first grid epsilon that flipped
            lo = e - (grid[k + 1] - grid[k]) / 2 ** A.BISECT
            crit = fb.criteria.Misclassification(labels[i:i + 1])
            _, advs, success = fb_attack(fmodel, x01[i:i + 1], crit, epsilons=[e * RGB_STD, lo * RGB_STD])
            assert success[:, 0].tolist() == [True, False], (which, i, e)
            adv = v.spec.normalize(advs[0])
            assert torch.allclose(adv, res.x_adv[i:i + 1], atol=1e-5), (which, i)
            # rho: the same rounding, against perturbations down to 1e-3 |x| (measured: 4e-5 at most)
            assert float(A.rho(adv, x[i:i + 1])) == pytest.approx(float(res.rho[i]), rel=1e-3), (which, i)


def _one_pixel_spec(h=6, w=7, c=3, row=3, col=5):
    """A 'network' whose answer flips only when pixel (row, col) is set high on every channel."""

    class Net(torch.nn.Module):
        def forward(self, x):
            s = x[:, :, row, col].mean(1)
            return torch.stack([torch.zeros_like(s), 20 * (s - 0.8)], dim=1)

    return ModelSpec(name="one-pixel", net=Net(), input_size=(h, w), in_channels=c, mean=(0.0,) * c,
                     std=(1.0,) * c, classes=["a", "b"], layers=[("input", 0.0), ("logits", 1.0)],
                     default_layers=["input"], weights_id="test")


def test_pixel_attack_finds_a_planted_one_pixel_flip():
    spec = _one_pixel_spec()
    mem = CacheMemory(torch.eye(2, 6 * 7 * 3), torch.tensor([0, 1]), 2)
    v = A.Victims(spec, mem, ["input"], 10.0, 0.5, 10.0)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 6, 7) * 0.5
    x[:, :, 0, 0] = 1.0  # the image's max
    assert bool((v.predict("network", x) == 0).all())
    res = A.minimal(v, "network", "pixel", x, batch=16, seed=3)
    assert bool(res.success.all())
    diff = (res.x_adv != x).any(1)  # (N, H, W): changed pixels
    assert diff.flatten(1).sum(1).tolist() == [1] * 4
    assert bool(diff[:, 3, 5].all())
    assert bool((res.x_adv[:, :, 3, 5] == 1.0).all())  # all three channels set to the max
    assert res.strength.tolist() == [3 * 7 + 5] * 4
    # an image where no pixel can flip it is a failure, left unchanged
    x2 = x.clone()
    x2[:, :, 0, 0] = 0.5
    res2 = A.minimal(v, "network", "pixel", x2[:1], batch=16)
    assert not bool(res2.success.any()) and torch.equal(res2.x_adv, x2[:1]) and math.isnan(float(res2.rho[0]))


def test_rho_adv_is_the_mean_over_successes_only(data_dir):
    study = Attack(Setup(), "pixel", "network", n=30, seed=0)
    rows = study.run(data_dir, device="cpu")
    from cacheviz.robustness import stored_attack_tensors

    t = stored_attack_tensors(study, data_dir)
    ok = t["success"]
    assert 0 < int(ok.sum()) < 30, "this check needs some failures"
    assert torch.isnan(t["rho"][~ok]).all()
    assert rows[0]["rho_adv"] == pytest.approx(float(t["rho"][ok].mean()), rel=1e-5)
    assert rows[0]["n_failed"] == int((~ok).sum())
    with_zeros = float(torch.nan_to_num(t["rho"]).mean())
    assert rows[0]["rho_adv"] > with_zeros


def test_cache_gradients_agree_with_finite_differences(victims):
    v, x, ws = victims
    v64 = A.Victims(ws.spec, CacheMemory(v.memory.keys.double(), v.memory.labels, v.memory.n_classes,
                                         dtype=torch.float64), v.layers, v.theta, v.lam, v.theta_cache_only)
    ws.spec.net.double()
    try:
        # a little noise: digits' flat background makes max-pool ties, where no derivative exists
        xd = x[:3].double() + 0.05 * torch.randn(x[:3].shape, generator=torch.Generator().manual_seed(0)).double()
        for which in ("cache", "cache-only"):
            f = lambda z: torch.log(v64.probs(which, z))[:, 3].sum()  # noqa: E731
            xg = xd.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(xg), xg)
            torch.manual_seed(1)
            for _ in range(3):
                d = torch.randn_like(xd)
                h = 1e-5
                fd = (f(xd + h * d) - f(xd - h * d)) / (2 * h)
                assert float((g * d).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-8), which
    finally:
        ws.spec.net.float()


def test_white_box_gradient_flows_through_the_cache_similarities(victims):
    v, x, _ = victims
    keys = v.memory.keys
    keys.requires_grad_(True)
    try:
        for which, theta in (("cache", v.theta), ("cache-only", v.theta_cache_only)):
            xg = x[:4].clone().requires_grad_(True)
            loss = -torch.log(v.probs(which, xg)).gather(1, v.predict(which, x[:4])[:, None]).sum()
            gk, gx = torch.autograd.grad(loss, [keys, xg])
            assert float(gk.abs().sum()) > 0, f"{which}: the similarities are not in the graph"
            g_net = A.input_gradient(v.log_probs("network"), x[:4], v.predict(which, x[:4]))
            assert not torch.allclose(gx, g_net), f"{which}: its gradient is the network's"
    finally:
        keys.requires_grad_(False)


def test_minimal_search_finds_a_flip_point_near_the_boundary(victims):
    v, x, _ = victims
    res = A.minimal(v, "network", "fgsm", x, seed=0)
    model = v.log_probs("network")
    labels = v.predict("network", x)
    d = A.fgsm_direction(model, x, labels)
    ok = res.success
    assert bool(ok.any())
    e = res.strength[ok]
    at = v.predict("network", v.clip(x[ok] + e.view(-1, 1, 1, 1) * d[ok]))
    assert bool((at != labels[ok]).all())  # flipped at the reported epsilon
    # and not at the bracket's lower end: within 2**-BISECT of the grid step below
    below = v.predict("network", v.clip(x[ok] + (e / A.GRID_RATIO ** (2 ** -A.BISECT)).view(-1, 1, 1, 1) * d[ok] * 0.999))
    assert float((below == labels[ok]).float().mean()) > 0.5


@pytest.mark.parametrize("kwargs, fix", [
    (dict(attack="nope"), "use one of"),
    (dict(attack="fgsm", against="everyone"), "use one of network"),
    (dict(attack="fgsm", epsilons=(-0.1, 0.2)), "cannot be negative"),
    (dict(attack="gamma", epsilons=(0.0, 1.0)), "must be positive"),
    (dict(attack="fgsm", n=0), "positive number"),
])
def test_bad_input_is_one_sentence(kwargs, fix):
    args = {"setup": Setup(), "attack": "fgsm", "against": "network", "n": 10, "seed": 0, "epsilons": None, **kwargs}
    with pytest.raises(CachevizError) as e:
        attack_study(**args)
    assert fix in str(e.value) and "\n" not in str(e.value)


def test_cli_attack_rows_and_bad_n(data_dir, tmp_path, capsys):
    from cacheviz.__main__ import main

    out = tmp_path / "rows.csv"
    assert main(["attack", "--data-dir", str(data_dir), "--attack", "blur", "--n", "8", "--out", str(out)]) == 0
    text = out.read_text().splitlines()
    assert text[0].startswith("accuracy") or "attack" in text[0]
    assert len(text) == 1 + 3
    capsys.readouterr()
    assert main(["attack", "--data-dir", str(data_dir), "--attack", "fgsm", "--n", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --n 100000: the test part holds only") and "Traceback" not in "".join(err)
