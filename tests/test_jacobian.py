"""Input-output Jacobians (Figure 4): against finite differences, a linear model, the mixture
identity, and known singular values."""
from __future__ import annotations

import pytest
import torch

from cacheviz.attacks import Victims
from cacheviz.cache import CacheMemory
from cacheviz.config import Setup
from cacheviz.jacobian import batch_jacobians, jacobian_stats
from cacheviz.models import ModelSpec
from cacheviz.progress import Silent
from cacheviz.robustness import load_victims
from cacheviz.study import Run


@pytest.fixture(scope="module")
def victims(data_dir):
    ws, v, _ = load_victims(Setup(), Run(data_dir, "cpu", 256, Silent()))
    g = torch.Generator().manual_seed(0)
    # a little noise: digits' flat background makes max-pool ties, where no derivative exists
    x = ws.spec.preprocess(ws.ds.test_x[ws.split.test_idx[:4]]) + 0.05 * torch.randn(4, 1, 8, 8, generator=g)
    return v, x, ws


def test_network_and_cache_jacobians_match_finite_differences(victims):
    v, x, ws = victims
    v64 = Victims(ws.spec, CacheMemory(v.memory.keys.double(), v.memory.labels, v.memory.n_classes,
                                       dtype=torch.float64), v.layers, v.theta, v.lam, v.theta_cache_only)
    ws.spec.net.double()
    try:
        xd = x[:2].double()
        js = batch_jacobians(v64, xd)
        g = torch.Generator().manual_seed(1)
        for m in ("network", "cache", "cache-only"):
            for _ in range(3):
                d = torch.randn(xd.shape, generator=g, dtype=torch.float64)
                h = 1e-5
                fd = (v64.probs(m, xd + h * d) - v64.probs(m, xd - h * d)) / (2 * h)  # (B, C)
                jd = torch.einsum("bcd,bd->bc", js[m], d.flatten(1))
                assert torch.allclose(jd, fd, rtol=1e-4, atol=1e-8), m
    finally:
        ws.spec.net.float()


def test_cache_jacobian_is_the_mixture_of_the_networks_and_p_mems(victims):
    """Checked against the cache model's own Jacobian, computed through CacheClassifier."""
    v, x, _ = victims
    js = batch_jacobians(v, x[:2])
    for i in range(2):
        own = torch.autograd.functional.jacobian(lambda z: v.probs("cache", z[None])[0], x[i])  # (C, 1, 8, 8)
        assert torch.allclose(js["cache"][i], own.flatten(1), atol=1e-5)
        only = torch.autograd.functional.jacobian(lambda z: v.probs("cache-only", z[None])[0], x[i])
        assert torch.allclose(js["cache-only"][i], only.flatten(1), atol=1e-5)


def test_linear_models_jacobian_is_its_weights_times_the_softmax_jacobian():
    torch.manual_seed(0)
    w = torch.randn(3, 12)

    class Net(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1) @ w.T

    spec = ModelSpec(name="linear", net=Net(), input_size=(2, 2), in_channels=3, mean=(0.0,) * 3, std=(1.0,) * 3,
                     classes=["a", "b", "c"], layers=[("input", 0.0), ("logits", 1.0)], default_layers=["input"],
                     weights_id="test")
    mem = CacheMemory(torch.nn.functional.normalize(torch.randn(5, 12), dim=1), torch.tensor([0, 1, 2, 0, 1]), 3)
    v = Victims(spec, mem, ["input"], 10.0, 0.3, 20.0)
    x = torch.randn(4, 3, 2, 2)
    j = batch_jacobians(v, x)["network"]
    p = torch.softmax(x.flatten(1) @ w.T, dim=1)
    for i in range(4):
        softmax_j = torch.diag(p[i]) - torch.outer(p[i], p[i])
        assert torch.allclose(j[i], softmax_j @ w, atol=1e-6)


def test_singular_values_and_norms_of_a_known_matrix(victims):
    v, x, _ = victims
    stats, kept = jacobian_stats(v, x, batch=3, keep=True)
    for m in ("network", "cache", "cache-only"):
        j = kept[m]
        assert stats.singular_values[m].shape == (len(x), v.memory.n_classes)
        assert torch.allclose(stats.norms[m], j.flatten(1).norm(dim=1), rtol=1e-4)
        assert bool((stats.singular_values[m][:, :-1] >= stats.singular_values[m][:, 1:] - 1e-7).all())
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ torch.linalg.qr(torch.randn(3, 3))[0]
    assert torch.allclose(torch.linalg.svdvals(a), torch.tensor([3.0, 2.0, 1.0]), atol=1e-5)


def test_cache_only_norm_against_theta_on_digits_rises_then_falls(victims):
    """The direction of theta, on a fixed setup: the digits default cache (1,348 training items,
    relu3 keys) and the first 40 images of the test part (with the fixture's kind of noise).
    d p_mem / d x carries a factor theta times the spread of softmax(theta sims), so the mean |J|
    first grows about in proportion to theta, then falls as the softmax saturates (measured:
    0.040, 0.122, 0.306, 0.118, 0.027, 0.0005 at theta 1, 3, 10, 30, 90, 200). On CIFAR-10 it
    rises instead over the whole tuned range (README, "Jacobians"): not "a large theta flattens"."""
    from itertools import pairwise

    from cacheviz.jacobian import cache_only_norms, spectrum_at_theta

    v, _, ws = victims
    g = torch.Generator().manual_seed(0)
    x = ws.spec.preprocess(ws.ds.test_x[ws.split.test_idx[:40]])
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    thetas = (1.0, 3.0, 10.0, 30.0, 90.0, 200.0)
    norms = cache_only_norms(v, x, thetas)
    mean = {t: float(norms[t].mean()) for t in thetas}
    assert 2.5 < mean[3.0] / mean[1.0] < 3.5, mean  # soft softmax: J about proportional to theta
    rising, falling = (1.0, 3.0, 10.0), (10.0, 30.0, 90.0, 200.0)
    for lo, hi in pairwise(rising):
        assert mean[hi] > 1.5 * mean[lo], (lo, hi, mean)
    for lo, hi in pairwise(falling):
        assert mean[lo] > 1.5 * mean[hi], (lo, hi, mean)
    # the explorer's spectrum is the same Jacobian: its norm is the image's |J| at that theta
    sv = spectrum_at_theta(v, x[:1], 30.0)
    assert float((sv ** 2).sum() ** 0.5) == pytest.approx(float(norms[30.0][0]), rel=1e-4)


def test_cli_jacobian_rows(data_dir, tmp_path):
    import json

    from cacheviz.__main__ import main

    out = tmp_path / "j.json"
    assert main(["jacobian", "--data-dir", str(data_dir), "--n", "6", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 6 * 3
    for r in rows:
        assert {"index", "label", "model", "norm", "singular_values", "theta", "lam"} <= set(r)
        assert len(r["singular_values"]) == 10
        assert r["norm"] == pytest.approx(sum(s * s for s in r["singular_values"]) ** 0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# |J| against the robustness lab's minimal rho_adv


def test_rank_correlations_against_hand_computed_spearman():
    from cacheviz.jacobian import rank_correlations

    # network: |J| ranks 1..5, rho ranks 5..1: perfectly opposite orders
    rows = [{"index": i, "model": "network", "norm": n, "rho_adv_fgsm": r}
            for i, (n, r) in enumerate([(0.1, 5.0), (0.2, 4.0), (0.3, 3.0), (0.4, 2.0), (0.5, 1.0)])]
    # cache: ranks of |J| 1,2,3,4 against rho ranks 2,1,4,3: d = -1,1,-1,1, sum d^2 = 4,
    # Spearman = 1 - 6 * 4 / (4 * 15) = 0.6
    rows += [{"index": i, "model": "cache", "norm": n, "rho_adv_fgsm": r}
             for i, (n, r) in enumerate([(1.0, 0.2), (2.0, 0.1), (3.0, 0.4), (4.0, 0.3)])]
    # cache-only: an image without rho (the attack failed) is left out, leaving too few
    rows += [{"index": 0, "model": "cache-only", "norm": 1.0, "rho_adv_fgsm": 0.1},
             {"index": 1, "model": "cache-only", "norm": 2.0, "rho_adv_fgsm": None},
             {"index": 2, "model": "cache-only", "norm": 3.0, "rho_adv_fgsm": 0.3}]
    corr = {c["model"]: c for c in rank_correlations(rows, "fgsm")}
    assert corr["network"]["spearman"] == pytest.approx(-1.0)
    assert corr["network"]["n"] == 5 and corr["network"]["median_rho_adv"] == 3.0
    assert corr["cache"]["spearman"] == pytest.approx(0.6)
    assert "cache-only" not in corr


def test_stored_rho_joins_the_labs_per_image_results(data_dir):
    """Against real stored attack runs on digits: the joined rho is each image's own, for the
    images the attack flipped, and a Jacobian run on more images shares the attack's first ones."""
    from cacheviz.jacobian import Jacobians, stored_rho, with_rho
    from cacheviz.robustness import Attack, stored_attack_tensors

    setup = Setup()
    for m in ("network", "cache", "cache-only"):
        Attack(setup, "fgsm", m, 7, 0).run(data_dir, "cpu")
    assert stored_rho(setup, "blur", 0, data_dir, (7,)) == {}, "nothing stored for blur"
    # 13 images were never attacked here (other tests share this data directory: n = 7 is this one's)
    rho = stored_rho(setup, "fgsm", 0, data_dir, (13, 7))
    assert set(rho) == {"network", "cache", "cache-only"}
    t = stored_attack_tensors(Attack(setup, "fgsm", "cache", 7, 0), data_dir)
    ok = t["success"].bool()
    assert rho["cache"] == {int(i): pytest.approx(float(r), rel=1e-5) for i, r in zip(t["test_idx"][ok], t["rho"][ok])}
    assert len(rho["network"]) >= 5, "FGSM flips most digits for the network"

    rows = Jacobians(setup, 13, 0).run(data_dir, "cpu")
    joined = with_rho(rows, "fgsm", rho)
    have = [r for r in joined if r["rho_adv_fgsm"] is not None]
    assert {r["index"] for r in have} <= set(t["test_idx"].tolist()), "the attack's 7 images are the first of 13"
    assert len({r["index"] for r in joined}) == 13
    for r in have:
        assert r["rho_adv_fgsm"] == rho[r["model"]][r["index"]]


def test_cli_jacobian_rho_column_and_bad_attack(data_dir, tmp_path, capsys):
    import json

    from cacheviz.__main__ import main
    from cacheviz.robustness import Attack

    for m in ("network", "cache", "cache-only"):
        Attack(Setup(), "fgsm", m, 8, 0).run(data_dir, "cpu")
    out = tmp_path / "j.json"
    assert main(["jacobian", "--data-dir", str(data_dir), "--n", "8", "--rho", "fgsm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "spearman" in printed
    rows = json.loads(out.read_text())
    assert all("rho_adv_fgsm" in r for r in rows)
    assert sum(r["rho_adv_fgsm"] is not None for r in rows) >= 12
    assert main(["jacobian", "--data-dir", str(data_dir), "--n", "8", "--rho", "deepfool"]) == 2
    err = capsys.readouterr().err
    assert "--rho takes the robustness lab's minimal attacks" in err and "Traceback" not in err
