"""Learned key networks (seed 003): the losses by hand, and a key network trained on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cacheviz.config import Setup
from cacheviz.keynet import KeyNet, KeyNetStudy, load_keynet, npair_loss, triplet_loss
from cacheviz.progress import Silent
from cacheviz.study import Run


def test_triplet_loss_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a = torch.stack([e1, e1])
    p = torch.stack([e1, e2])
    n = torch.stack([e2, e1])
    # first: d(a, p) = 0, d(a, n) = 1 -> max(0, 0 - 1 + 0.2) = 0; second: 1 - 0 + 0.2 = 1.2
    assert float(triplet_loss(a, p, n, margin=0.2)) == pytest.approx(0.6)


def test_npair_loss_by_hand():
    s = 1 / math.sqrt(2)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [s, s]])
    # i = 0: log(1 + exp(a0.p1 - a0.p0)) = log(1 + exp(s - 1)); i = 1: log(1 + exp(0 - s))
    want = (math.log(1 + math.exp(s - 1)) + math.log(1 + math.exp(-s))) / 2
    assert float(npair_loss(a, p)) == pytest.approx(want, rel=1e-6)


def test_key_network_reaches_the_teachers_layer_shape():
    net = KeyNet(3, 32, (64, 8, 8))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 64 * 8 * 8) and torch.allclose(out.norm(dim=1), torch.ones(2))
    assert KeyNet(1, 8, (128,))(torch.randn(3, 1, 8, 8)).shape == (3, 128)
    with pytest.raises(Exception, match="cannot reach"):
        KeyNet(3, 32, (64, 6, 6))


@pytest.mark.parametrize("loss", ["triplet", "npair"])
def test_key_network_trains_on_digits_and_beats_chance(data_dir, loss):
    study = KeyNetStudy(Setup(), layer="pool", loss=loss, fraction=0.5, epochs_regress=3, epochs_metric=1,
                        timing_images=100, reps=1)
    rows = study.run(data_dir, "cpu")
    main = {r["model"]: r for r in rows if r["condition"] is None}
    assert set(main) == {"network", "keynet", "truncated"}
    assert main["keynet"]["accuracy"] > 0.5, "chance is 0.1"
    assert main["keynet"]["params"] < main["network"]["params"]
    assert all(r["ms_per_image"] > 0 for r in main.values())
    conds = {(r["model"], r["condition"]) for r in rows if r["condition"]}
    assert ("keynet", "fgsm 0.05") in conds and ("network", "gamma 1.5") in conds and len(conds) == 18
    assert ("network", "clean") in conds  # the robustness images unchanged, the baseline of each condition
    spec = Run(data_dir, "cpu", 256, Silent()).prepare(Setup()).spec
    net = load_keynet(study, data_dir, spec)
    assert isinstance(net, KeyNet), "the trained weights are stored with the result"
    assert study.run(data_dir, "cpu") == rows, "and reused"


def test_cli_keynet_rows_and_bad_input(data_dir, tmp_path):
    from cacheviz.__main__ import main

    out = tmp_path / "k.json"
    assert main(["keynet", "--data-dir", str(data_dir), "--epochs", "2,1", "--fraction", "0.5",
                 "--timing-images", "50", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {"model", "accuracy", "ms_per_image", "params"} <= set(rows[0])
    assert any(r["condition"] == "brightness 0.5" for r in rows)
    assert main(["keynet", "--data-dir", str(data_dir), "--epochs", "2"]) == 2
    assert main(["keynet", "--data-dir", str(data_dir), "--layer", "conv7"]) == 2
