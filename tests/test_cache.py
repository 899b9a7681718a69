"""The paper's math: Eq. 1-3, the tuning grid, and the differentiable cache classifier."""

import pytest
import torch
import torch.nn.functional as F

from cacheviz.cache import CacheClassifier, CacheMemory, SimilarityBlock, combine, p_mem_from_sims
from cacheviz.errors import CachevizError
from cacheviz.tuning import default_grid, grid_search, predict


def _memory(K=300, d=32, C=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(K, d, generator=g, dtype=dtype), dim=1)
    labels = torch.randint(0, C, (K,), generator=g)
    q = F.normalize(torch.randn(50, d, generator=g, dtype=dtype), dim=1)
    return CacheMemory(keys, labels, C, dtype=dtype), q


def _reference_p_mem(mem, q, theta):
    """Eq. 2 in float64 straight from the definition, via log-sum-exp."""
    s = theta * (q.double() @ mem.keys.double().T)
    w = torch.exp(s - torch.logsumexp(s, dim=1, keepdim=True))
    return w @ F.one_hot(mem.labels, mem.n_classes).double()


def test_p_mem_rows_sum_to_one_and_match_definition():
    mem, q = _memory()
    for theta in (1.0, 10.0, 50.0, 90.0):
        p = mem.p_mem(q, theta)
        assert torch.allclose(p.sum(1), torch.ones(len(q)), atol=1e-5)
        assert (p >= 0).all()
        assert torch.allclose(p.double(), _reference_p_mem(mem, q, theta), atol=1e-5)


def test_theta_90_does_not_overflow_even_for_identical_keys():
    mem, _ = _memory()
    q = mem.keys[:20].clone()  # similarity 1 with themselves: exp(90) alone overflows float32
    assert torch.isinf(torch.exp(torch.tensor([90.0], dtype=torch.float32))).all()
    p = mem.p_mem(q, 90.0)
    assert torch.isfinite(p).all()
    assert torch.allclose(p.double(), _reference_p_mem(mem, q, 90.0), atol=1e-5)


def test_large_theta_gives_the_nearest_neighbour_label():
    mem, q = _memory(K=500)
    nn_label = mem.labels[(q @ mem.keys.T).argmax(1)]
    p = mem.p_mem(q, 1e4)
    assert torch.equal(p.argmax(1), nn_label)
    assert (p.max(1).values > 0.99).all()


def test_memory_is_grouped_by_class_but_answers_in_callers_indices():
    g = torch.Generator().manual_seed(5)
    keys = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (200,), generator=g)
    mem = CacheMemory(keys, labels, 4)
    assert bool((mem.labels[1:] >= mem.labels[:-1]).all())
    assert torch.equal(mem.keys, keys[mem.order]) and torch.equal(mem.labels, labels[mem.order])
    q = keys[[3, 77, 150]]
    sims, idx = mem.topk(q, 1)
    assert idx[:, 0].tolist() == [3, 77, 150]  # each item's nearest neighbour is itself
    assert torch.allclose(sims[:, 0], torch.ones(3))
    ref = _reference_p_mem(mem, q, 30.0)
    assert torch.allclose(mem.p_mem(q, 30.0).double(), ref, atol=1e-5)


def test_lambda_zero_is_the_network_and_one_is_cache_only():
    mem, q = _memory()
    p_net = torch.softmax(torch.randn(len(q), mem.n_classes), dim=1)
    pm = mem.p_mem(q, 30.0)
    assert torch.equal(combine(p_net, pm, 0.0), p_net)
    assert torch.equal(combine(p_net, pm, 1.0), pm)
    p = combine(p_net, pm, 0.3)
    assert torch.allclose(p, 0.7 * p_net + 0.3 * pm)
    assert torch.allclose(p.sum(1), torch.ones(len(q)), atol=1e-5)


def test_chunked_equals_unchunked():
    mem, q = _memory(K=1000)
    whole = mem.p_mem(q, 40.0, chunk_size=len(q))
    for chunk in (1, 7, 13):
        assert torch.allclose(mem.p_mem(q, 40.0, chunk_size=chunk), whole, atol=1e-6)
    s1, i1 = mem.topk(q, 5, chunk_size=3)
    s2, i2 = mem.topk(q, 5, chunk_size=len(q))
    assert torch.equal(i1, i2) and torch.allclose(s1, s2)


def test_similarity_block_matches_softmax():
    mem, q = _memory()
    sims = q @ mem.keys.T
    for block in (SimilarityBlock(sims, mem.values), mem.block(sims)):  # GEMM and class-slice sums
        for theta in (10.0, 90.0):
            assert torch.allclose(block.p_mem(theta), p_mem_from_sims(sims, mem.values, theta), atol=1e-6)
        with pytest.raises(CachevizError):
            block.p_mem(0.0)


@pytest.mark.parametrize("thetas", [[10, 20, 30, 40, 50, 60, 70, 80, 90], [10, 50, 90], [5, 7, 90], [30.0]])
def test_theta_sweep_equals_one_theta_at_a_time(thetas):
    mem, q = _memory(K=700)
    sims = q @ mem.keys.T
    got = list(mem.block(sims).p_mem_sweep(thetas))
    assert [t for t, _ in got] == [float(t) for t in thetas]
    for theta, pm in got:
        assert torch.allclose(pm.double(), _reference_p_mem(mem, q, theta), atol=1e-5)


def test_knn_vote_predicts_the_majority_label_of_the_nearest_items():
    from collections import Counter

    mem, q = _memory()
    k = 5
    votes = mem.knn_predict(q, k=k)
    assert torch.allclose(votes.sum(1), torch.ones(len(q)))
    assert ((votes * k).round() == votes * k).all()
    # the reference: brute-force nearest stored items, majority label, ties to the smallest label
    sims = q.double() @ mem.keys.double().T
    nearest = sims.topk(k, dim=1).indices
    expect = []
    for row in mem.labels[nearest].tolist():
        counts = Counter(row)
        top = max(counts.values())
        expect.append(min(c for c, n in counts.items() if n == top))
    expect = torch.tensor(expect)
    assert torch.equal(votes.argmax(1), expect)
    # the test pass of every study (predict) votes the same way, in its one pass
    _, knn = predict(mem, q, torch.full((len(q), mem.n_classes), 1.0 / mem.n_classes), [(20.0, 0.5)],
                     chunk_size=7, knn_k=k)
    assert torch.equal(knn, expect)


def test_grid_search_equals_brute_force():
    mem, q = _memory(K=400, C=5, seed=3)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (len(q),), generator=g)
    p_net = torch.softmax(2 * torch.randn(len(q), 5, generator=g), dim=1)
    thetas, lams = default_grid(5, 4)
    res = grid_search(mem, q, p_net, labels, thetas, lams, chunk_size=9)
    for t, theta in enumerate(thetas):
        pm = _reference_p_mem(mem, q, theta).float()
        assert res.acc_cache_only[t] == pytest.approx(float((pm.argmax(1) == labels).float().mean()))
        for l, lam in enumerate(lams):
            acc = float((combine(p_net, pm, lam).argmax(1) == labels).float().mean())
            assert res.acc[t, l] == pytest.approx(acc)
    assert res.best_acc == pytest.approx(float(res.acc.max()))
    assert res.theta in thetas and res.lam in lams
    assert res.baseline_acc == pytest.approx(float((p_net.argmax(1) == labels).float().mean()))
    # predict() gives the same p as the definition
    (p,), knn = predict(mem, q, p_net, [(res.theta, res.lam)], chunk_size=11)
    assert knn is None
    assert torch.allclose(p, combine(p_net, _reference_p_mem(mem, q, res.theta).float(), res.lam), atol=1e-5)


def test_default_grid_is_the_papers_ranges():
    thetas, lams = default_grid()
    assert len(thetas) == 9 and len(lams) == 9
    assert thetas[0] == 10 and thetas[-1] == 90 and lams[0] == pytest.approx(0.1) and lams[-1] == pytest.approx(0.9)
    with pytest.raises(CachevizError):
        default_grid(0, 9)


def test_bad_memory_input():
    with pytest.raises(CachevizError):
        CacheMemory(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(CachevizError):
        CacheMemory(torch.zeros(5, 4), torch.zeros(4, dtype=torch.long), 3)


def test_cache_classifier_gradients_match_finite_differences(resnet20_random):
    """gradcheck in float64 on the whole images -> p map, through the net and the cache."""
    spec = resnet20_random
    spec.net.double()
    try:
        layers = ["layer3.0.relu1", "layer2.2"]
        torch.manual_seed(0)
        # small 8x8 inputs keep the numerical Jacobian cheap; the ResNet pools adaptively
        cache_x = torch.randn(40, 3, 8, 8, dtype=torch.float64)
        from cacheviz.features import forward_layers

        with torch.no_grad():
            acts = forward_layers(spec, cache_x, layers)
        keys = torch.cat([acts[n].flatten(1) for n in layers], 1)
        mem = CacheMemory(keys, torch.randint(0, 10, (40,)), 10, normalize=True, dtype=torch.float64)
        model = CacheClassifier(spec, mem, layers, theta=20.0, lam=0.5)
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        p = model(x)
        assert torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))
        assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
        # lam = 0: exactly the network's softmax
        model0 = CacheClassifier(spec, mem, layers, theta=20.0, lam=0.0)
        assert torch.allclose(model0(x), torch.softmax(spec.net(x), 1))
    finally:
        spec.net.float()
