"""Neighbours, shares of the similarity mass, and p_mem recomputed from stored similarities."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cacheviz import retrieval, workspace
from cacheviz.experiment import Evaluate
from cacheviz.cache import combine
from cacheviz.config import Setup
from cacheviz.errors import CachevizError

# Unit-norm keys: float32 rounding across batch shapes stays far below this.
QUERY_TOL = 1e-4


@pytest.fixture(scope="module")
def ws(data_dir):
    return workspace.prepare(Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3")), data_dir, "cpu")


@pytest.fixture(scope="module")
def index(ws):
    return retrieval.build_index(ws)


def test_index_rows_match_their_training_items(ws, index):
    assert len(index) == len(ws.split.cache_test_idx)
    assert torch.equal(index.labels.cpu(), ws.ds.train_y[index.train_idx])
    assert not index.flipped.any()


@pytest.mark.parametrize("item", [0, 17, 500])
def test_a_training_image_is_its_own_nearest_neighbour(ws, index, item):
    q = retrieval.make_query(ws, index, ws.ds.train_x[item].numpy())
    ex = retrieval.explain(index, q, theta=30.0, lam=0.5, k=5)
    assert ex.train_idx[0] == item and not ex.flipped[0]
    assert ex.sims[0] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(ex.sims) <= 1e-7)  # most similar first
    assert ex.labels[0] == int(ws.ds.train_y[item])


@pytest.mark.parametrize("threads", [1, 16])
def test_query_key_equals_the_stored_key(ws, index, threads):
    """A training image as a query finds its own stored key, equal up to float32 rounding.

    The stored keys come from batches of 256, the query from a batch of one: convolution
    libraries pick other algorithms (and summation orders) for other batch shapes and thread
    counts, so equality holds to float32 precision, not bit for bit.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for item in (0, 42, 777):
            q = retrieval.make_query(ws, index, ws.ds.train_x[item].numpy())
            row = int(np.nonzero(index.train_idx.numpy() == item)[0][0])
            stored = index.memory.keys[row].cpu()
            assert float(q.q @ stored) == pytest.approx(1.0, abs=QUERY_TOL)
            assert float((q.q - stored).abs().max()) <= QUERY_TOL
            assert int(q.sims.argmax()) == row
    finally:
        torch.set_num_threads(before)


def test_shares_sum_to_at_most_one(ws, index):
    q = retrieval.make_query(ws, index, ws.ds.test_x[3].numpy())
    for theta in (1.0, 30.0, 90.0):
        ex = retrieval.explain(index, q, theta, 0.5, k=12)
        assert np.all(ex.shares >= 0) and ex.shares.sum() <= 1.0 + 1e-6
        assert np.all(np.diff(ex.shares) <= 1e-7)  # more similar, larger share
        whole = retrieval.explain(index, q, theta, 0.5, k=len(index))
        assert whole.shares.sum() == pytest.approx(1.0, abs=1e-5)
        # p_mem is the shares summed per class
        per_class = np.bincount(whole.labels, weights=whole.shares, minlength=len(ws.ds.classes))
        assert np.allclose(per_class, whole.p_mem, atol=1e-5)


@pytest.mark.parametrize("theta", [5.0, 30.0, 90.0])
def test_p_mem_from_stored_similarities_equals_cache_memory(ws, index, theta):
    q = retrieval.make_query(ws, index, ws.ds.test_x[7].numpy())
    expect = index.memory.p_mem(q.q[None], theta)[0].cpu()
    got = retrieval.p_mem_from_similarities(q.sims, index.memory.values, theta).cpu()
    assert torch.allclose(got, expect, atol=1e-6)
    ex = retrieval.explain(index, q, theta, 0.3, k=4)
    assert np.allclose(ex.p_mem, expect.numpy(), atol=1e-6)
    assert np.allclose(ex.p, combine(torch.as_tensor(q.p_net), expect, 0.3).numpy(), atol=1e-6)


def test_lam_zero_is_the_network_and_one_is_the_cache(ws, index):
    q = retrieval.make_query(ws, index, ws.ds.test_x[11].numpy())
    assert np.allclose(retrieval.explain(index, q, 30, 0.0).p, q.p_net)
    ex = retrieval.explain(index, q, 30, 1.0)
    assert np.allclose(ex.p, ex.p_mem)
    with pytest.raises(CachevizError):
        retrieval.explain(index, q, 30, 1.5)
    with pytest.raises(CachevizError):
        retrieval.explain(index, q, 0.0, 0.5)


def test_flipped_cache_rows_map_to_flipped_images(data_dir):
    setup = Setup(dataset="digits", model="digits-cnn", layers=("relu3",), flip=True, train_limit=200)
    w = workspace.prepare(setup, data_dir, "cpu")
    idx = retrieval.build_index(w)
    assert len(idx) == 400 and int(idx.flipped.sum()) == 200
    item = int(w.split.cache_test_idx[5])
    mirrored = w.ds.train_x[item].flip(1).numpy()  # (H, W, C): flip the width axis
    ex = retrieval.explain(idx, retrieval.make_query(w, idx, mirrored), 30, 0.5, k=3)
    assert ex.train_idx[0] == item and ex.flipped[0] and ex.sims[0] == pytest.approx(1.0, abs=1e-4)
    shown = retrieval.neighbour_images(w.ds, ex)
    assert np.array_equal(shown[0], mirrored)


def test_any_size_rgb_upload_is_a_valid_query(ws, index):
    rgb = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    q = retrieval.make_query(ws, index, rgb)
    assert q.sims.shape == (len(index),) and q.p_net.shape == (10,)
    assert q.p_net.sum() == pytest.approx(1.0, abs=1e-5)
    view = retrieval.model_view(ws.spec, rgb)
    assert view.shape == (8, 8, 3) and view.dtype == np.uint8
    assert np.array_equal(view[..., 0], view[..., 1])  # a 1-channel model sees gray


def test_as_batch_checks_shapes():
    assert retrieval.as_batch(np.zeros((4, 5, 3), np.uint8)).shape == (1, 4, 5, 3)
    assert retrieval.as_batch(np.zeros((4, 5), np.uint8)).shape == (1, 4, 5, 1)
    with pytest.raises(CachevizError):
        retrieval.as_batch(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(CachevizError):
        retrieval.as_batch(np.zeros((4, 5, 3), np.float32))


def test_dark_on_light_uploads_are_recognised_for_inverting(ws):
    paper = np.full((40, 40, 3), 250, np.uint8)
    paper[10:30, 18:22] = 0
    assert retrieval.background_differs(ws.ds, paper)
    assert not retrieval.background_differs(ws.ds, retrieval.invert(paper))


def test_picks_agree_with_the_result(data_dir):
    setup = Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3"))
    result = Evaluate(setup).run(data_dir, device="cpu")
    pk = Evaluate(setup).picks(data_dir)
    assert len(pk.test_idx) == result["n_test"]
    assert len(pk.fixed()) == result["n_fixed"] and len(pk.broken()) == result["n_broken"]
    assert sum(len(pk.of_class(c)) for c in range(10)) == result["n_test"]
    with pytest.raises(CachevizError, match="build"):
        Evaluate(setup.replace(seed=12345)).picks(data_dir)
