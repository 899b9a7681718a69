"""Figure 2, Figure 3 and Table 1 sweeps, end to end on digits."""
import pytest

from cacheviz.config import Setup
from cacheviz.errors import CachevizError
from cacheviz.sweeps import MIDDLE_LAM, MIDDLE_THETA, sweep_layers, sweep_size, table1

LAYER_KEYS = {"model", "dataset", "layer", "depth", "dim", "acc", "baseline_acc", "theta", "lam", "cache_only_acc"}
SIZE_KEYS = {"fraction", "seed", "baseline_acc", "cache_acc", "cache_only_acc", "theta", "lam", "n_cache", "gain"}
TABLE_KEYS = {"model", "dataset", "variant", "error", "theta", "lam", "layers"}


def test_layer_sweep_covers_input_to_logits(data_dir):
    rows = sweep_layers(Setup(), data_dir)
    assert [r["layer"] for r in rows] == ["input", "relu1", "relu2", "pool", "relu3", "logits"]
    assert rows[0]["depth"] == 0 and rows[-1]["depth"] == 1
    for r in rows:
        assert LAYER_KEYS <= set(r)
        assert (r["theta"], r["lam"]) == (MIDDLE_THETA, MIDDLE_LAM) == (50, 0.5)
        assert 0.5 < r["acc"] <= 1 and r["n_cache"] == 1348 and r["n_test"] == 225
    assert len({r["baseline_acc"] for r in rows}) == 1
    assert {r["layer"]: r["dim"] for r in rows}["relu2"] == 4096


def test_layer_sweep_projection_and_retune(data_dir):
    rows = sweep_layers(Setup(project_dim=256), data_dir, layers=["relu2", "relu3"], retune=True)
    dims = {r["layer"]: (r["dim"], r["full_dim"]) for r in rows}
    assert dims == {"relu2": (256, 4096), "relu3": (128, 128)}
    assert all(r["retuned"] and 10 <= r["theta"] <= 90 for r in rows)
    with pytest.raises(CachevizError, match="layers --model"):
        sweep_layers(Setup(), data_dir, layers=["nope"])


def test_size_sweep_rows(data_dir):
    rows = sweep_size(Setup(), data_dir, fractions=[0, 0.1, 1.0], seeds=[0, 1])
    assert [(r["fraction"], r["seed"]) for r in rows] == [(0, 0), (0, 1), (0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    for r in rows:
        assert SIZE_KEYS <= set(r)
    base = rows[0]
    assert base["n_cache"] == 0 and base["cache_acc"] == base["baseline_acc"] and base["theta"] is None
    assert [r["n_cache"] for r in rows[2:]] == [135, 135, 1348, 1348]
    # different seeds draw different caches at 10%, the same (whole) cache at 100%
    assert rows[4]["cache_acc"] == rows[5]["cache_acc"]
    with pytest.raises(CachevizError):
        sweep_size(Setup(), data_dir, fractions=[1.5])


def test_table1_rows(data_dir):
    rows = table1([Setup()], data_dir, combine_top=3)
    assert [r["variant"] for r in rows] == ["baseline", "cache", "cache-only", "cache3"]
    for r in rows:
        assert TABLE_KEYS <= set(r) and 0 <= r["error"] <= 1
    assert rows[1]["layers"] == ["relu3"] and 1 <= len(rows[3]["layers"]) <= 3
    assert rows[2]["lam"] == 1.0


def test_sweeps_persist(data_dir, monkeypatch):
    sweep_layers(Setup(), data_dir, layers=["relu3"])
    import cacheviz.sweeps as sw

    monkeypatch.setattr(sw, "prepare", lambda *a, **k: pytest.fail("recomputed a stored sweep"))
    assert sweep_layers(Setup(), data_dir, layers=["relu3"])[0]["layer"] == "relu3"


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
    assert "comma-separated numbers" in capsys.readouterr().err
