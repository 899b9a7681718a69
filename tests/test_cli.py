"""The command line: the `evaluate` contract end to end on digits, and its bad-input answers."""
import json
import subprocess
import sys
import time

import pytest
import torch

from cacheviz.__main__ import main

REQUIRED = {
    "baseline_acc", "cache_acc", "cache_only_acc", "baseline_acc_val", "cache_acc_val", "theta", "lam",
    "theta_cache_only", "n_cache", "n_val", "n_test", "layers", "key_dim", "seconds",
}


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_digits_end_to_end(data_dir, capsys, tmp_path):
    t0 = time.perf_counter()
    out_json = tmp_path / "r.json"
    rc, out, err = _run(capsys, "evaluate", "--dataset", "digits", "--data-dir", str(data_dir), "--json", str(out_json))
    elapsed = time.perf_counter() - t0
    assert rc == 0, err
    assert elapsed < 60, f"evaluate on digits took {elapsed:.0f}s (training the CNN included)"
    r = json.loads(out_json.read_text())
    assert REQUIRED <= set(r)
    assert r["baseline_acc"] >= 0.95
    # theta, lam are the grid's best cell (first on ties), cache-only's theta the best of its column
    acc, thetas, lams = r["grid"]["acc"], r["grid"]["thetas"], r["grid"]["lams"]
    best = max(v for row in acc for v in row)
    t, l = next((t, l) for t in range(len(thetas)) for l in range(len(lams)) if acc[t][l] == best)
    assert (r["theta"], r["lam"], r["cache_acc_val"]) == (thetas[t], lams[l], best)
    co = r["grid"]["acc_cache_only"]
    assert r["theta_cache_only"] == thetas[co.index(max(co))] and r["cache_only_acc_val"] == max(co)
    assert r["n_cache"] == 1348 and r["n_val"] + r["n_test"] == 449 and r["layers"] == ["relu3"]
    assert r["key_dim"] == 128
    # the tuned cache model is at least as good as the network on the data it was tuned on
    assert r["cache_acc_val"] >= r["baseline_acc_val"] - 1e-9
    assert len(r["grid"]["acc"]) == 9 and len(r["grid"]["acc"][0]) == 9
    assert "cache model" in out and "baseline" in out
    # a second run reads the stored result instead of recomputing
    t0 = time.perf_counter()
    rc, out2, _ = _run(capsys, "evaluate", "--dataset", "digits", "--data-dir", str(data_dir))
    assert rc == 0 and time.perf_counter() - t0 < 2
    assert out2.splitlines()[-2:] == out.splitlines()[-2:]


def test_evaluate_options_change_the_experiment(data_dir, capsys):
    rc, out, err = _run(
        capsys, "evaluate", "--data-dir", str(data_dir), "--json", "-", "--layers", "relu2,relu3",
        "--flip", "--train-limit", "500", "--val-from-train", "100", "--project-dim", "256", "--grid", "3x2",
    )
    assert rc == 0, err
    r = json.loads(out)
    assert r["layers"] == ["relu2", "relu3"]
    assert r["key_dim"] == 256 + 128  # relu2 (4096-d) projected, relu3 (128-d) exact
    assert r["n_cache"] == 1000  # 500 items and their flips
    assert r["n_cache_val"] == 800  # the 100 validation items are not in the tuning cache
    assert r["n_val"] == 100 and r["n_test"] == 449 and r["val_part"] == "train"
    assert r["theta"] in (10, 50, 90) and r["lam"] in (0.1, 0.9)
    assert len(r["grid"]["acc"]) == 3 and len(r["grid"]["acc"][0]) == 2


def test_layers_command(data_dir, capsys):
    rc, out, _ = _run(capsys, "layers", "--model", "digits-cnn", "--data-dir", str(data_dir), "--json")
    assert rc == 0
    rows = json.loads(out)
    assert rows[0]["name"] == "input" and rows[0]["depth"] == 0 and rows[-1]["name"] == "probs"
    assert [r["name"] for r in rows if r["default"]] == ["relu3"]
    rc, out, _ = _run(capsys, "layers", "--model", "resnet20", "--data-dir", str(data_dir / "none"),
                      "--checkpoint", str(_resnet_ckpt(data_dir)))
    assert rc == 0 and "layer3.2.relu1" in out and "64x8x8" in out


def _resnet_ckpt(data_dir):
    from cacheviz.models import build_cifar_resnet

    p = data_dir / "rn20-random.th"
    if not p.exists():
        torch.save({"state_dict": {f"module.{k}": v for k, v in build_cifar_resnet(20).state_dict().items()}}, p)
    return p


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["evaluate", "--model", "resnet7"], "6n+2"),
        (["evaluate", "--model", "vgg99"], "torchvision:<name>"),
        (["evaluate", "--layers", "relu9"], "--layers relu9: digits-cnn has no layer 'relu9' (closest: relu3, relu2, relu1); choose from input, relu1"),
        (["evaluate", "--dataset", "imagenet-mini"], "folder:"),
        (["evaluate", "--dataset", "folder:/no/such/folder", "--model", "digits-cnn"], "train"),
        (["evaluate", "--train-limit", "3"], "--train-limit 3: too small"),
        (["evaluate", "--val-from-train", "5000"], "--val-from-train 5000: leaves no training items"),
        (["evaluate", "--dataset", "cifar10", "--model", "digits-cnn"], None),
        (["evaluate", "--device", "tpu"], "--device tpu"),
        (["evaluate", "--model", ""], "--model : an empty model name"),
        (["evaluate", "--grid", "1000x1000"], "--grid 1000x1000"),
        (["evaluate", "--json", "/no/such/folder/r.json"], "--json /no/such/folder/r.json: the folder"),
        (["layers", "--model", "torchvision:not_a_net"], "list_models"),
    ],
)
def test_bad_input_gets_one_sentence(data_dir, capsys, argv, fragment):
    rc, out, err = _run(capsys, *argv, "--data-dir", str(data_dir))
    assert rc != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if fragment:
        assert fragment in lines[0], lines[0]


def test_checkpoint_for_another_architecture(data_dir, capsys, tmp_path):
    from cacheviz.models import build_cifar_resnet

    p = tmp_path / "rn32.th"
    torch.save({"state_dict": build_cifar_resnet(32).state_dict()}, p)
    rc, _, err = _run(capsys, "layers", "--model", "resnet20", "--checkpoint", str(p), "--data-dir", str(tmp_path))
    assert rc == 2 and "resnet20" in err and "Traceback" not in err


def test_no_network_and_no_local_copy(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torch.hub

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    from cacheviz.errors import CachevizError
    from cacheviz.models import load_model

    with pytest.raises(CachevizError, match="resnet56-4bfd9763.th into .*checkpoints"):
        load_model("resnet56", tmp_path)
    # listing layers needs no weights: it says why they were not loaded and goes on
    rc, out, _ = _run(capsys, "layers", "--model", "resnet56", "--data-dir", str(tmp_path))
    assert rc == 0 and "layer3.8" in out and "resnet56-4bfd9763.th" in out and "checkpoints" in out


def test_argparse_nonsense_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--train-limit", "-5"])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--grid", "nine"])
    assert "9x9" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "cacheviz", "evaluate", "--dataset", "folder:" + str(tmp_path / "nothing"),
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.strip().startswith("error:")


def test_theta_on_the_grid_edge_is_flagged_and_theta_max_widens_the_grid(data_dir, capsys, tmp_path):
    from cacheviz.config import Setup
    from cacheviz.errors import CachevizError
    from cacheviz.tuning import default_grid, on_edge

    assert default_grid(9, 9)[0] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert default_grid(5, 3, theta_max=170)[0] == [10, 50, 90, 130, 170]
    assert on_edge(90, [10, 50, 90]) and on_edge(10, [10, 50, 90]) and not on_edge(50, [10, 50, 90])
    assert not on_edge(50, [50])  # a one-value grid has no inside to leave
    for bad in (10, 5, -1, float("nan"), float("inf"), 1e9, True):
        with pytest.raises(CachevizError):
            Setup(theta_max=bad)
    # a narrow grid puts the best theta on its edge; the JSON and the table say so
    out = tmp_path / "r.json"
    assert main(["evaluate", "--data-dir", str(data_dir), "--layers", "pool", "--grid", "3x3", "--theta-max", "20",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["grid"]["thetas"] == [10, 15, 20]
    edges = {k: r[k] for k in ("theta_on_edge", "theta_cache_only_on_edge")}
    assert edges == {"theta_on_edge": on_edge(r["theta"], [10, 15, 20]),
                     "theta_cache_only_on_edge": on_edge(r["theta_cache_only"], [10, 15, 20])}
    printed = capsys.readouterr().out
    assert any(edges.values()), "on digits the best theta of 10..20 is an edge"
    assert "landed on the grid's edge (10..20)" in printed and "--theta-max 40" in printed
    # --theta-max is part of the key: another range is another result
    assert main(["evaluate", "--data-dir", str(data_dir), "--layers", "pool", "--grid", "3x3", "--theta-max", "30",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["grid"]["thetas"] == [10, 20, 30]
    assert main(["evaluate", "--data-dir", str(data_dir), "--theta-max", "5"]) == 2
    assert "--theta-max 5.0: give a largest theta above 10" in capsys.readouterr().err


def test_paper_protocol_in_one_choice(data_dir, tmp_path, capsys):
    from cacheviz.config import Setup
    from cacheviz.errors import CachevizError

    s = Setup.paper_protocol(dataset="cifar10", model="resnet20")
    assert (s.flip, s.val_from_train, s.val_flips, s.n_theta, s.n_lam) == (True, 5000, True, 33, 33)
    assert Setup().val_flips is False  # today's default stays as it was
    with pytest.raises(CachevizError, match="needs held-out training items and flips"):
        Setup(val_flips=True, flip=True)
    # digits holds 1,348 training items: the protocol with 120 held out (an explicit override)
    out = tmp_path / "p.json"
    assert main(["evaluate", "--data-dir", str(data_dir), "--protocol", "paper", "--val-from-train", "120",
                 "--grid", "5x5", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["val_part"] == "train" and r["n_val"] == 240  # the held-out items and their flips
    assert r["n_cache"] == 2 * 1348 and r["setup"]["val_flips"] and r["setup"]["flip"]
    assert len(r["grid"]["thetas"]) == 5
    # an explicit --grid wins even when it names the default resolution
    assert main(["evaluate", "--data-dir", str(data_dir), "--protocol", "paper", "--val-from-train", "120",
                 "--grid", "9x9", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["grid"]["thetas"]) == 9
    # without an override the protocol's 5,000 cannot be held out of 1,348: one sentence with the fix
    capsys.readouterr()
    assert main(["evaluate", "--data-dir", str(data_dir), "--protocol", "paper"]) == 2
    assert "--val-from-train 5000: leaves no training items for the cache" in capsys.readouterr().err
