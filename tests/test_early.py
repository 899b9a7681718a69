"""Answering early (seed 003): truncated and gated caches inside the network, on digits."""
from __future__ import annotations

import json
import time

import pytest
import torch

from cacheviz.cache import CacheMemory
from cacheviz.config import Setup
from cacheviz.early import (Early, Exit, check_layers, clock, default_exit_layers, frontier, full_answer,
                            gated_answer, gated_predictions, run_span, truncated_answer)
from cacheviz.features import extract, make_keys
from cacheviz.progress import Silent
from cacheviz.study import Run


@pytest.fixture(scope="module")
def digits(data_dir):
    ws = Run(data_dir, "cpu", 256, Silent()).prepare(Setup())
    spec = ws.spec
    train = ws.ds.train_x[ws.split.cache_test_idx]
    y_train = ws.ds.train_y[ws.split.cache_test_idx]
    test = ws.ds.test_x[ws.split.test_idx]
    return ws, spec, train, y_train, test


def _exit(spec, train, y_train, layer, theta=30.0, lam=0.5) -> Exit:
    keys = make_keys(extract(spec, train, [layer]), [layer])
    return Exit(layer, CacheMemory(keys, y_train, 10), theta, theta, lam)


def test_the_chain_is_the_network(digits):
    _, spec, _, _, test = digits
    x = spec.preprocess(test[:16])
    with torch.no_grad():
        assert torch.allclose(run_span(spec, x, None, None), spec.net(x), atol=1e-5)
        mid = run_span(spec, x, None, "pool")
        assert torch.allclose(run_span(spec, mid, "pool", None), spec.net(x), atol=1e-5)


def test_truncated_answer_is_the_cache_only_answer_of_the_full_extraction(digits):
    _, spec, train, y_train, test = digits
    for layer in ("pool", "relu3"):
        ex = _exit(spec, train, y_train, layer)
        want = ex.memory.p_mem(make_keys(extract(spec, test, [layer]), [layer]), ex.theta_cache_only)
        got = truncated_answer(spec, ex, spec.preprocess(test), batch=50)
        assert torch.allclose(got, want, atol=1e-5)


def test_gate_at_zero_always_exits_and_above_one_never(digits):
    _, spec, train, y_train, test = digits
    exits = [_exit(spec, train, y_train, "pool"), _exit(spec, train, y_train, "relu3")]
    x = spec.preprocess(test)
    preds, where = gated_answer(spec, exits, 0.0, x)
    assert (where == 0).all()
    assert torch.equal(preds, truncated_answer(spec, exits[0], x).argmax(1))
    preds, where = gated_answer(spec, exits, 1.01, x)
    assert (where == 2).all()
    assert torch.equal(preds, full_answer(spec, x).argmax(1))


def test_gated_answer_matches_the_decisions_from_stored_probabilities(digits):
    _, spec, train, y_train, test = digits
    exits = [_exit(spec, train, y_train, "pool"), _exit(spec, train, y_train, "relu3")]
    x = spec.preprocess(test)
    p_net = torch.softmax(full_answer(spec, x), 1)
    p_co = [truncated_answer(spec, e, x) for e in exits]
    p_mem_last = exits[1].memory.p_mem(make_keys(extract(spec, test, ["relu3"]), ["relu3"]), exits[1].theta)
    p_mix = (1 - exits[1].lam) * p_net + exits[1].lam * p_mem_last
    for tau in (0.6, 0.9, 0.99):
        for mix in (False, True):
            preds, where = gated_answer(spec, exits, tau, x, mix=mix, batch=64)
            want, want_where = gated_predictions(p_net, p_mix if mix else None, p_co, tau)
            assert torch.equal(where, want_where)
            assert (preds == want).float().mean() > 0.99  # float ties aside
        shares = [(where == k).float().mean() for k in range(3)]
        assert 0 < sum(shares[:2]) <= 1


def test_timing_measures_only_the_truncated_pass(digits):
    """A layer after the exit that sleeps: the full pass pays for it, the truncated one never."""
    _, spec, train, y_train, test = digits
    ex = _exit(spec, train, y_train, "pool")
    x = spec.preprocess(test[:64])
    fc2 = spec.net.fc2

    class Sleepy(torch.nn.Module):
        def forward(self, a):
            time.sleep(0.05)
            return fc2(a)

    spec.net.fc2 = Sleepy()
    try:
        full = clock(lambda: full_answer(spec, x, batch=16), torch.device("cpu"))  # 4 batches: >= 0.2 s
        cut = clock(lambda: truncated_answer(spec, ex, x, batch=16), torch.device("cpu"))
    finally:
        spec.net.fc2 = fc2
    assert full >= 0.2
    # the truncated pass skips the 0.2 s of sleep; compared with the full pass, not with a fixed
    # bound, so a loaded machine slowing both does not fail it
    assert full - cut > 0.15


def test_exit_layers_are_checked(digits):
    _, spec, *_ = digits
    assert default_exit_layers(spec) == ["pool", "relu3"]
    assert check_layers(spec, ["relu3", "pool"]) == ["pool", "relu3"]
    with pytest.raises(Exception, match="can stop and resume only after"):
        check_layers(spec, ["logits"])


def test_frontier_keeps_the_rows_nothing_beats():
    rows = [{"ms_per_image": 1.0, "accuracy": 0.8}, {"ms_per_image": 0.5, "accuracy": 0.7},
            {"ms_per_image": 0.7, "accuracy": 0.65}, {"ms_per_image": 2.0, "accuracy": 0.9}]
    assert [(r["ms_per_image"], r["accuracy"]) for r in frontier(rows)] == [(0.5, 0.7), (1.0, 0.8), (2.0, 0.9)]


def test_faster_counts_only_when_every_round_is_faster():
    from cacheviz.early import speedups
    from cacheviz.ui.early import faster_within

    s = speedups([1.0, 1.0, 1.0], [0.8, 1.1, 0.9])  # one round slower: noise, not a win
    assert s["speedup"] == pytest.approx(1 / 0.9) and s["speedup_low"] == pytest.approx(1 / 1.1)
    assert s["speedup_high"] == pytest.approx(1.25)
    full = {"mode": "full", "accuracy": 0.80, "speedup": 1.0, "speedup_low": 1.0}
    noisy = {"mode": "gated", "accuracy": 0.80, **s}
    steady = {"mode": "truncated", "accuracy": 0.795, **speedups([1.0, 1.0], [0.9, 0.95])}
    worse = {"mode": "truncated", "accuracy": 0.78, **speedups([1.0, 1.0], [0.5, 0.5])}
    assert faster_within([full, noisy, steady, worse]) == [steady]


def test_early_study_and_cli_rows(data_dir, tmp_path):
    from cacheviz.__main__ import main

    out = tmp_path / "e.json"
    assert main(["early", "--data-dir", str(data_dir), "--fractions", "0.1,1", "--taus", "0,0.9,1",
                 "--timing-images", "100", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    full = [r for r in rows if r["layer"] == "full"]
    assert len(full) == 1 and full[0]["exit_share"] == 0 and full[0]["tau"] is None
    trunc = [r for r in rows if r["mode"] == "truncated"]
    assert {(r["layer"], r["cache_fraction"]) for r in trunc} == {(a, f) for a in ("pool", "relu3") for f in (0.1, 1.0)}
    for r in rows:
        assert {"layer", "cache_fraction", "tau", "accuracy", "ms_per_image", "exit_share"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["ms_per_image"] > 0
        assert r["speedup_low"] <= r["speedup"] <= r["speedup_high"]
    gated = {(r["layer"], r["cache_fraction"], r["tau"]): r for r in rows if r["mode"] == "gated"}
    for (layer, frac, tau), r in gated.items():
        if tau == 0:
            t = [x for x in trunc if x["layer"] == layer and x["cache_fraction"] == frac][0]
            assert r["exit_share"] == 1.0 and r["accuracy"] == pytest.approx(t["accuracy"])
        if tau == 1:  # a stricter gate lets fewer images leave early
            assert r["exit_share"] <= gated[(layer, frac, 0.9)]["exit_share"]
    assert any(r["mode"] == "cascade" for r in rows)
    # bad input: one sentence, exit status 2
    assert main(["early", "--data-dir", str(data_dir), "--layers", "conv9"]) == 2
    assert main(["early", "--data-dir", str(data_dir), "--fractions", "0"]) == 2


def test_early_refuses_projected_keys():
    with pytest.raises(Exception, match="full keys"):
        Early(Setup(project_dim=64))
