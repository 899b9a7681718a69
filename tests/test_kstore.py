"""The knowledge store (issue 11): versions in a real database, edits that never overwrite,
crash safety, top-k p_mem, and the `store` command line. Offline, on the bundled digits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cacheviz import kstore
from cacheviz.__main__ import main
from cacheviz.errors import CachevizError

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("pymilvus")


@pytest.fixture
def ks(base, tmp_path) -> kstore.KnowledgeStore:
    """A private copy of the base store (creating one per test would retune theta each time)."""
    dst = tmp_path / "stores" / base.path.name
    shutil.copytree(base.path, dst, ignore=shutil.ignore_patterns("lock", "db.lock"))
    s = kstore.KnowledgeStore(dst, base.data_dir)
    s._ws = base.workspace()  # the same setup's data and model, loaded once
    return s


def test_created_store_holds_the_training_items_and_tuned_theta(base):
    ws = base.workspace()
    assert base.head.number == 1 and base.head.op == "create"
    assert base.head.n_live == len(ws.split.cache_test_idx) == len(base.live_ids())
    assert base.dim == base.test_items()["q"].shape[1]
    assert base.theta > 0 and 0 < base.lam < 1
    # a stored training image's own key is its nearest neighbour, at similarity 1
    i = 17
    src = base.item(i)["source"]
    assert src.startswith("train:")
    q = base.keys_of(ws.ds.train_x[int(src.split(":")[1])].numpy())[0]
    d, ids = base.search(q.numpy(), 3)
    assert ids[0, 0] == i and d[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_store_round_trips_through_a_reopen(ks):
    q = ks.test_items()["q"][:20].numpy()
    before = ks.search(q, 10)
    v = ks.remove(range(5))
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert [x.number for x in again.versions] == [1, v.number]
    np.testing.assert_array_equal(again.live_ids(), ks.live_ids())
    np.testing.assert_array_equal(again.search(q, 10, version=1)[1], before[1])
    np.testing.assert_allclose(again.search(q, 10, version=1)[0], before[0], atol=1e-6)
    np.testing.assert_array_equal(again.search(q, 10)[1], ks.search(q, 10)[1])


def test_faiss_and_the_database_find_the_same_items(ks):
    q = ks.test_items()["q"][:8].numpy()
    ks.remove_class(4)
    for version in (1, 2):
        d1, i1 = ks.search(q, 10, version)
        d2, i2 = ks.search(q, 10, version, engine="db")
        np.testing.assert_allclose(d1, d2, atol=1e-5)
        # equal similarities may come in either order; the sets of ids agree
        assert all(set(a) == set(b) for a, b in zip(i1.tolist(), i2.tolist()))


def test_a_removed_item_never_comes_back(ks):
    live = ks.live_ids()
    gone = live[ks._labels[live] == 2][:40]
    ks.remove(gone)
    q = ks.test_items()["q"].numpy()
    everything = len(ks.live_ids())
    for engine in ("faiss", "db"):
        ids = ks.search(q[:5], everything, engine=engine)[1]
        assert not np.isin(ids, gone).any()
    img = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    ks.add_images([img], [2])  # a later edit must not bring them back either
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert not np.isin(again.live_ids(), gone).any()
    assert not np.isin(again.search(q[:5], len(again.live_ids()))[1], gone).any()
    with pytest.raises(CachevizError, match="not in the store"):
        again.remove(gone[:1])


def test_undo_returns_to_the_version_before_and_nothing_is_overwritten(ks):
    v1 = ks.live_ids().copy()
    files = {f: f.read_bytes() for f in (ks.path / "versions").glob("*.json")}
    ks.remove_class(0)
    assert ks.class_counts()[0] == 0
    u = ks.undo()
    np.testing.assert_array_equal(ks.live_ids(), v1)
    assert u.op == "undo" and u.number == 3 and u.parent == 1
    with pytest.raises(CachevizError, match="no edit to undo"):
        ks.undo()
    for f, data in files.items():  # earlier versions are never rewritten
        assert f.read_bytes() == data
    np.testing.assert_array_equal(ks.live_ids(2), v1[ks._labels[v1] != 0])


def test_forgetting_a_class_the_network_still_knows(ks):
    before = ks.evaluate()
    ks.remove_class(3)
    after = ks.evaluate()
    pc_b, pc_a = before.per_class(10), after.per_class(10)
    assert pc_a["cache_only"][3] == 0.0  # nothing of class 3 left to retrieve
    assert pc_a["network"][3] == pc_b["network"][3] > 0.9  # the weights still know it
    ch = kstore.changed(before, after, "cache_only")
    assert ch and all(r["before"] == 3 and r["after"] != 3 for r in ch if r["label"] == 3)


def test_teaching_a_correction_with_added_examples(ks):
    """The test images the cache-only model misreads, one edit each (then undone): adding the
    image with its true label corrects most of them and breaks no other answer; no weight moves."""
    t = ks.test_items()
    ev = ks.evaluate()
    wrong = np.flatnonzero(ev.pred_cache_only != ev.y)[:5]
    assert len(wrong) >= 3, "too few misread test images to judge corrections"
    w0 = [p.detach().clone() for p in ks.workspace().spec.net.parameters()]
    fixed = 0
    for i in wrong:
        img = ks.workspace().ds.test_x[int(t["test_idx"][i])].numpy()
        ks.add_images([img], [int(ev.y[i])])
        after = ks.evaluate()
        fixed += int(after.pred_cache_only[i] == ev.y[i])
        assert not ((ev.pred_cache_only == ev.y) & (after.pred_cache_only != ev.y)).any()
        ks.undo()
        np.testing.assert_array_equal(ks.evaluate().pred_cache_only, ev.pred_cache_only)
    assert fixed >= (len(wrong) + 1) // 2
    assert all(torch.equal(a, b) for a, b in zip(w0, ks.workspace().spec.net.parameters()))


def test_an_edit_that_raises_leaves_the_last_version_intact(ks, monkeypatch):
    q = ks.test_items()["q"][:10].numpy()
    before = ks.search(q, 10)
    head = ks.head
    monkeypatch.setenv("CACHEVIZ_TEST_CRASH", "insert")
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(RuntimeError, match="test crash"):
        ks.add_images([img] * 3, [1] * 3)
    monkeypatch.delenv("CACHEVIZ_TEST_CRASH")
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert again.head == head
    np.testing.assert_array_equal(again.search(q, 10)[1], before[1])
    assert not list((ks.path / "segments").glob(f"{head.next_id:012d}.*"))  # the orphan was swept
    v = again.add_images([img], [1])  # and its ids are reused cleanly
    assert v.added == [[head.next_id, head.next_id + 1]]
    assert np.isin(again.search(q, len(again.live_ids()), engine="db")[1], [head.next_id]).any()


def test_an_edit_killed_mid_insert_leaves_the_last_version_readable(ks, tmp_path):
    head = ks.head
    q = ks.test_items()["q"][:10].numpy()
    before = ks.search(q, 10)
    script = tmp_path / "edit.py"
    script.write_text(
        "import numpy as np, sys\n"
        "from cacheviz import kstore\n"
        f"ks = kstore.KnowledgeStore({str(ks.path)!r}, {str(ks.data_dir)!r})\n"
        "ks.add_images([np.zeros((8, 8, 3), np.uint8)] * 2500, [1] * 2500)\n"
    )
    env = dict(os.environ, CACHEVIZ_TEST_CRASH="insert:60", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seg = ks.path / "segments" / f"{head.next_id:012d}.safetensors"
    t0 = time.time()
    while not seg.exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # inside the first batch's insert, or sleeping right after it
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = kstore.KnowledgeStore(ks.path, ks.data_dir)
    assert again.head == head
    np.testing.assert_array_equal(again.search(q, 10)[1], before[1])
    np.testing.assert_array_equal(again.search(q, 10, engine="db")[1][:, :1], before[1][:, :1])
    assert not seg.exists()


def test_top_k_p_mem_with_k_equal_to_the_store_is_the_exact_p_mem(ks):
    q = ks.test_items()["q"].numpy()
    ks.remove_class(5)
    K = len(ks.live_ids())
    for theta in (1.0, ks.theta, 80.0):
        exact = ks.p_mem_exact(q, theta)
        top = ks.p_mem(q, theta, k=K)
        torch.testing.assert_close(top, exact, atol=1e-5, rtol=1e-4)
    # and a small k is close where theta is large (the similarity mass sits on the nearest items)
    assert (ks.p_mem(q, 80.0, k=50) - ks.p_mem_exact(q, 80.0)).abs().max() < 0.05


def test_hnsw_path_excludes_removed_items_and_finds_the_exact_neighbours(ks, monkeypatch):
    monkeypatch.setattr(kstore, "EXACT_MAX_FLOATS", 0)
    s = kstore.KnowledgeStore(ks.path, ks.data_dir)
    assert s.index_kind == "hnsw"
    s.remove_class(1)
    q = s.test_items()["q"].numpy()
    d, ids = s.search(q, 10)
    assert not np.isin(ids, s.live_ids(1)[s._labels[s.live_ids(1)] == 1]).any()
    exact = s.search(q, 10, engine="db")[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist())])
    assert recall >= 0.95


def test_bad_edits_are_one_sentence(ks):
    with pytest.raises(CachevizError, match="not a class"):
        ks.remove_class(10)
    with pytest.raises(CachevizError, match="not a class"):
        ks.add_images([np.zeros((8, 8, 3), np.uint8)], [42])
    with pytest.raises(CachevizError, match="width"):
        ks.search(np.zeros((1, ks.dim + 1), np.float32))
    with pytest.raises(CachevizError, match="no folder"):
        ks.add_folder(ks.path / "nope", 1)
    with pytest.raises(CachevizError, match="no knowledge store"):
        kstore.KnowledgeStore.open("nothing-here", ks.data_dir)
    assert ks.head.number == 1  # none of them made a version


def test_store_command_line(base, tmp_path, capsys):
    d = tmp_path / "data"
    for sub in ("checkpoints", "features"):
        if (base.data_dir / sub).exists():
            shutil.copytree(base.data_dir / sub, d / sub)
    shutil.copytree(base.path, d / "stores" / base.path.name, ignore=shutil.ignore_patterns("lock", "db.lock"))
    common = ["--data-dir", str(d)]
    assert main(["store", "list", *common]) == 0
    assert "create" in capsys.readouterr().out
    assert main(["store", "remove", "--class", "3", *common]) == 0
    out = capsys.readouterr().out
    assert "version 2: remove class 3" in out and "cache-only" in out
    folder = tmp_path / "threes"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert main(["store", "add", "--label", "3", "--folder", str(folder), *common]) == 0
    assert "version 3: add 3 images of 3" in capsys.readouterr().out
    assert main(["store", "undo", *common]) == 0
    assert "version 4: undo back to version 2" in capsys.readouterr().out
    out_json = tmp_path / "items.json"
    assert main(["store", "list", "--items", "--out", str(out_json), *common]) == 0
    rows = json.loads(out_json.read_text())
    assert rows and not any(r["label"] == 3 for r in rows)
    capsys.readouterr()
    assert main(["store", "query", str(folder / "0.png"), "--k", "3", *common]) == 0
    assert "cache-only" in capsys.readouterr().out
    for bad, said in ((["store", "remove", *common], "--ids"), (["store", "add", "--label", "cat", *common], "--label"),
                      (["store", "remove", "--ids", "999999", *common], "not in the store"),
                      (["store", "list", "--dataset", "digits", "--train-limit", "50", "--data-dir", str(d)], "store create")):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and err.count("\n") == 1


def test_the_hnsw_graph_is_saved_and_reused_by_the_next_process(ks, monkeypatch):
    monkeypatch.setattr(kstore, "EXACT_MAX_FLOATS", 0)
    a = kstore.KnowledgeStore(ks.path, ks.data_dir)
    q = a.test_items()["q"][:20].numpy()
    first = a.search(q, 10)
    assert (ks.path / "hnsw.faiss").exists()
    a.add_images([np.zeros((8, 8, 3), np.uint8)], [1])
    b = kstore.KnowledgeStore(ks.path, ks.data_dir)
    b._faiss_index()
    assert b._index_rows == len(b._keys) == a.head.next_id  # the saved graph plus the row added since
    np.testing.assert_array_equal(b.search(q, 10, version=1)[1], first[1])


def test_an_emptied_store_votes_for_no_class(ks):
    ks.remove(ks.live_ids())
    ev = ks.evaluate()
    assert (ev.pred_cache_only == -1).all()  # nothing to retrieve, no answer
    np.testing.assert_array_equal(ev.pred_cache, ev.pred_net)  # a uniform p_mem leaves p_net's order
    p = ks.p_mem(ks.test_items()["q"][:3].numpy())
    torch.testing.assert_close(p, torch.full_like(p, 0.1))
