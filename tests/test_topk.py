"""p_mem from the top-k retrieved items (issue 11): exact at k = K, the nearest label at k = 1."""
import torch

from cacheviz.cache import CacheMemory, p_mem_from_topk


def _memory(n=300, d=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(40, d, generator=g), dim=1)
    return CacheMemory(keys, labels, n_classes=c), q, keys, labels


def test_topk_p_mem_with_every_item_is_the_exact_p_mem():
    mem, q, _, _ = _memory()
    for theta in (1.0, 30.0, 90.0):
        assert torch.allclose(mem.p_mem_topk(q, theta, k=len(mem)), mem.p_mem(q, theta), atol=1e-6)


def test_topk_p_mem_with_one_item_is_the_nearest_label():
    mem, q, keys, labels = _memory()
    p = mem.p_mem_topk(q, 50.0, k=1)
    nearest = labels[(q @ keys.T).argmax(1)]
    assert torch.equal(p.argmax(1), nearest) and torch.allclose(p.max(1).values, torch.ones(len(q)))


def test_topk_p_mem_converges_as_k_grows_and_rows_sum_to_one():
    mem, q, _, _ = _memory()
    exact = mem.p_mem(q, 30.0)
    gaps = [float((mem.p_mem_topk(q, 30.0, k) - exact).abs().max()) for k in (5, 50, 300)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6
    assert torch.allclose(mem.p_mem_topk(q, 30.0, 7).sum(1), torch.ones(len(q)), atol=1e-6)


def test_any_backends_results_give_the_same_p_mem():
    """A backend returns (similarities, labels) in its own order: the answer must not depend on it."""
    sims = torch.tensor([[0.9, 0.5, 0.7]])
    labels = torch.tensor([[2, 0, 2]])
    a = p_mem_from_topk(sims, labels, 10.0, 3)
    b = p_mem_from_topk(sims[:, [2, 0, 1]], labels[:, [2, 0, 1]], 10.0, 3)
    w = torch.softmax(10.0 * sims[0], 0)
    assert torch.allclose(a, b) and torch.allclose(a[0], torch.tensor([w[1], 0.0, w[0] + w[2]]))


def test_topk_study_on_digits_reaches_the_exact_accuracy_at_k_equal_K(data_dir):
    import pytest

    pytest.importorskip("faiss", reason="faiss-cpu is missing (pip install faiss-cpu)")
    from cacheviz.config import Setup
    from cacheviz.topk import TopK

    rows = TopK(Setup(), ks=(1, 10, 10**6), index="exact").run(data_dir, "cpu")
    assert [r["k"] for r in rows][:2] == [1, 10] and rows[-1]["k"] == rows[-1]["n_cache"]
    last = rows[-1]
    assert last["accuracy"] == pytest.approx(last["exact_accuracy"])
    assert last["cache_only_accuracy"] == pytest.approx(last["exact_cache_only_accuracy"])
    hnsw = TopK(Setup(), ks=(10,), index="hnsw").run(data_dir, "cpu")
    assert 0.9 <= hnsw[0]["recall_at_10"] <= 1.0 and hnsw[0]["ms_per_query"] > 0


def test_topk_command_line_rows_and_bad_input(data_dir, tmp_path, capsys):
    import json

    from cacheviz.__main__ import main

    out = tmp_path / "topk.json"
    assert main(["topk", "--data-dir", str(data_dir), "--k", "1,10,100000", "--index", "hnsw", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    for r in rows:
        assert {"k", "index", "accuracy", "cache_only_accuracy", "exact_accuracy", "recall_at_10", "ms_per_query"} <= set(r)
    assert [r["index"] for r in rows] == ["hnsw"] * len(rows)
    assert rows[-1]["k"] == rows[-1]["n_cache"]  # a k past the store is the whole store
    assert 0.9 <= rows[0]["recall_at_10"] <= 1.0
    capsys.readouterr()
    assert main(["topk", "--data-dir", str(data_dir), "--index", "lsh"]) == 2
    err = capsys.readouterr().err
    assert "--index" in err and "exact, ivf, hnsw" in err and err.count("\n") == 1
    assert main(["topk", "--data-dir", str(data_dir), "--k", "0"]) == 2
