"""Figure 2, Figure 3 and Table 1 as studies, end to end on digits."""
import itertools

import pytest
import torch

from cacheviz.config import Setup
from cacheviz.errors import CachevizError
from cacheviz.experiment import Evaluate
from cacheviz.study import StudyGroup, score_key_sets, score_keys
from cacheviz.sweeps import MIDDLE_LAM, MIDDLE_THETA, LayerSweep, SizeSweep, Table1, table1_group
from cacheviz.tuning import default_grid
from cacheviz.workspace import ExperimentData, prepare

LAYER_KEYS = {"model", "dataset", "layer", "depth", "dim", "acc", "baseline_acc", "theta", "lam", "cache_only_acc",
              "device"}
SIZE_KEYS = {"fraction", "seed", "baseline_acc", "cache_acc", "cache_only_acc", "theta", "lam", "n_cache", "gain",
             "subset"}
TABLE_KEYS = {"model", "dataset", "variant", "error", "val_acc", "theta", "lam", "layers"}


def test_layer_sweep_covers_input_to_logits(data_dir):
    rows = LayerSweep(Setup()).run(data_dir)
    assert [r["layer"] for r in rows] == ["input", "relu1", "relu2", "pool", "relu3", "logits", "probs"]
    assert rows[0]["depth"] == 0 and rows[-1]["depth"] == 1
    for r in rows:
        assert LAYER_KEYS <= set(r)
        assert (r["theta"], r["lam"]) == (MIDDLE_THETA, MIDDLE_LAM) == (50, 0.5)
        assert 0.5 < r["acc"] <= 1 and r["n_cache"] == 1348 and r["n_test"] == 225
    assert len({r["baseline_acc"] for r in rows}) == 1
    assert {r["layer"]: r["dim"] for r in rows}["relu2"] == 4096


def test_layer_sweep_retuned_rows_agree_with_evaluate(data_dir):
    """Re-tuned per layer, a row is what `evaluate` gives with that layer alone as keys."""
    setup = Setup(project_dim=256)
    rows = LayerSweep(setup, layers=("relu2", "relu3"), retune=True).run(data_dir)
    dims = {r["layer"]: (r["dim"], r["full_dim"]) for r in rows}
    assert dims == {"relu2": (256, 4096), "relu3": (128, 128)}
    for r in rows:
        ev = Evaluate(setup.replace(layers=(r["layer"],))).run(data_dir)
        assert r["retuned"] and (r["theta"], r["lam"], r["theta_cache_only"]) == (
            ev["theta"], ev["lam"], ev["theta_cache_only"])
        assert (r["acc"], r["cache_only_acc"]) == (ev["cache_acc"], ev["cache_only_acc"])
    with pytest.raises(CachevizError, match="choose from"):
        LayerSweep(Setup(), layers=("nope",)).run(data_dir)


def test_size_sweep_rows(data_dir):
    rows = SizeSweep(Setup(), fractions=(0, 0.1, 1.0), seeds=(0, 1)).run(data_dir)
    assert [(r["fraction"], r["seed"]) for r in rows] == [(0, 0), (0, 1), (0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    for r in rows:
        assert SIZE_KEYS <= set(r)
    base = rows[0]
    assert base["n_cache"] == 0 and base["cache_acc"] == base["baseline_acc"] and base["theta"] is None
    assert [r["n_cache"] for r in rows[2:]] == [135, 135, 1348, 1348]
    # different seeds draw different caches at 10%, the same (whole) cache at 100%
    assert rows[2]["subset"] != rows[3]["subset"]
    assert rows[4]["subset"] == rows[5]["subset"] and rows[4]["cache_acc"] == rows[5]["cache_acc"]
    with pytest.raises(CachevizError, match="fractions"):
        SizeSweep(Setup(), fractions=(1.5,))


def test_table1_cache3_is_the_best_combination_on_validation(data_dir):
    setup = Setup()
    rows = Table1(setup, combine_top=3).run(data_dir)
    assert [r["variant"] for r in rows] == ["baseline", "cache", "cache-only", "cache3"]
    for r in rows:
        assert TABLE_KEYS <= set(r) and 0 <= r["error"] <= 1
    assert rows[1]["layers"] == ["relu3"] and rows[2]["lam"] == 1.0
    cache3 = rows[3]
    # digits-cnn has no stages: every hidden layer is a candidate
    assert cache3["candidates"] == ["relu1", "relu2", "pool", "relu3"]
    # every candidate alone, then the combinations of up to 3 of the best 3, scored here again
    ws = prepare(setup, data_dir, "cpu")
    data = ExperimentData(ws, cache3["candidates"])
    thetas, lams = default_grid()
    val = {(n,): score_keys(data, [n], thetas, lams).val_acc for n in cache3["candidates"]}
    top = sorted(val, key=lambda k: -val[k])[:3]
    for size in (2, 3):
        for combo in itertools.combinations([t[0] for t in top], size):
            val[combo] = score_keys(data, list(combo), thetas, lams).val_acc
    assert cache3["n_combinations"] == len(val) == 4 + 3 + 1
    # the same best set, up to one validation item of float rounding between the two kernels
    one_item = 1 / len(data.y_val) + 1e-9
    assert cache3["val_acc"] == pytest.approx(max(val.values()), abs=one_item)
    assert val[tuple(cache3["layers"])] == pytest.approx(max(val.values()), abs=one_item)


def test_cache3_searches_the_whole_last_stage():
    from cacheviz.models import architecture_only
    from cacheviz.sweeps import _groups, cache3_candidates

    r20 = cache3_candidates(architecture_only("resnet20"))
    assert r20 == ["layer3.0.relu1", "layer3.0", "layer3.1.relu1", "layer3.1", "layer3.2.relu1", "layer3.2"]
    r56 = cache3_candidates(architecture_only("resnet56"))
    assert len(r56) == 18 and r56[0] == "layer3.0.relu1" and r56[-1] == "layer3.8"
    assert {"layer3.0", "layer3.4.relu1", "layer3.8"} <= set(r56)  # the author's ResNet56 keys
    # candidates are extracted in groups that fit the memory budget, in order, none left out
    sizes = dict.fromkeys(r56, 10)
    assert _groups(r56, sizes, 45) == [r56[i:i + 4] for i in range(0, 18, 4)]
    assert _groups(r56, sizes, 5) == [[n] for n in r56]  # a layer larger than the budget goes alone


def test_table1_in_one_layer_at_a_time_gives_the_same_rows(data_dir, monkeypatch):
    """A memory budget that holds one layer: every candidate extracted alone, then the default
    keys and the combinations in two batches; the same rows as with everything at once."""
    import cacheviz.sweeps as sw

    at_once = Table1(Setup(), combine_top=3).run(data_dir)
    monkeypatch.setattr(sw, "CANDIDATE_RAM_SHARE", 1e-12)
    assert Table1(Setup(), combine_top=3).run(data_dir, force=True) == at_once


def test_table1_group_stores_each_model_on_its_own(data_dir):
    group = table1_group([Setup()])
    assert isinstance(group, StudyGroup) and group.stages == Table1.stages
    rows = Table1(Setup()).run(data_dir)
    assert group.lookup(data_dir) == rows


def test_sweeps_persist(data_dir, monkeypatch):
    study = LayerSweep(Setup(), layers=("relu3",))
    rows = study.run(data_dir)
    import cacheviz.study as st

    monkeypatch.setattr(st, "prepare", lambda *a, **k: pytest.fail("recomputed a stored sweep"))
    assert study.lookup(data_dir) == rows == study.run(data_dir)


def test_sweep_commands_write_json_and_csv(data_dir, tmp_path, capsys):
    import csv
    import json

    from cacheviz.__main__ import main

    assert main(["sweep-layers", "--data-dir", str(data_dir), "--layers", "relu3,logits", "--out", str(tmp_path / "l.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "l.csv")))
    assert [r["layer"] for r in rows] == ["relu3", "logits"] and {"depth", "dim", "acc", "baseline_acc", "theta", "lam"} <= set(rows[0])
    assert main(["sweep-size", "--data-dir", str(data_dir), "--fractions", "0,1", "--seeds", "0", "--out", str(tmp_path / "s.json")]) == 0
    assert [r["fraction"] for r in json.loads((tmp_path / "s.json").read_text())] == [0, 1]
    assert main(["table1", "--data-dir", str(data_dir), "--out", str(tmp_path / "t.csv")]) == 0
    assert [r["variant"] for r in csv.DictReader(open(tmp_path / "t.csv"))] == ["baseline", "cache", "cache-only", "cache3"]
    assert main(["sweep-size", "--data-dir", str(data_dir), "--fractions", "half"]) == 2
    assert "--fractions half: give comma-separated numbers" in capsys.readouterr().err


@pytest.mark.parametrize("paper", [False, True], ids=["val-from-test", "val-from-train-with-flips"])
def test_many_key_sets_at_once_score_as_one_at_a_time(data_dir, paper):
    """The layered kernel (one product per layer for every set) gives score_keys' numbers."""
    setup = Setup(flip=True, val_from_train=300, val_flips=True) if paper else Setup()
    ws = prepare(setup, data_dir, "cpu")
    layers = ["relu1", "pool", "relu3"]
    data = ExperimentData(ws, layers)
    thetas, lams = default_grid()
    sets = [["relu3"], ["pool"], ["pool", "relu3"], ["relu1", "pool", "relu3"]]
    for fast, one in zip(score_key_sets(data, sets, thetas, lams), (score_keys(data, s, thetas, lams) for s in sets)):
        assert fast.layers == one.layers and fast.key_dim == one.key_dim
        assert (fast.n_cache, fast.n_cache_val) == (one.n_cache, one.n_cache_val)
        torch.testing.assert_close(fast.grid.acc, one.grid.acc, atol=1e-3, rtol=0)  # one item in 1,000 at most
        torch.testing.assert_close(fast.grid.acc_cache_only, one.grid.acc_cache_only, atol=1e-3, rtol=0)
        assert (fast.theta, fast.lam, fast.theta_cache_only) == (one.theta, one.lam, one.theta_cache_only)
        torch.testing.assert_close(fast.p, one.p, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.p_cache_only, one.p_cache_only, atol=1e-4, rtol=1e-4)
