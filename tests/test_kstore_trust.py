"""The knowledge store is as trustworthy as its database: a damaged or missing manifest is an
error (never a rollback that the next edit makes permanent), a killed create leaves no store,
two writers never report wrong numbers, a store never mixes two networks' keys, a damaged
database or search graph is noticed when the store opens, and `store repair` brings back what
the store's copies hold. Offline, on the bundled digits."""
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

from cacheviz import kdb, krepair, kstore, kversions
from cacheviz.__main__ import main
from cacheviz.config import Setup
from cacheviz.errors import CachevizError

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("pymilvus")


@pytest.fixture
def ks(base, tmp_path) -> kstore.KnowledgeStore:
    """A private copy of the base store in a data directory of its own (checkpoint and features
    copied, so the command line and other processes see the same setup)."""
    d = tmp_path / "data"
    for sub in ("checkpoints", "features"):
        if (base.data_dir / sub).exists():
            shutil.copytree(base.data_dir / sub, d / sub)
    dst = d / "stores" / base.path.name
    shutil.copytree(base.path, dst, ignore=shutil.ignore_patterns("lock", "db.lock"))
    s = kstore.KnowledgeStore(dst, d)
    s._ws = base.workspace()
    return s


def _cli(ks, *args) -> list[str]:
    return ["store", *args, "--data-dir", str(ks.data_dir)]


def _rows_in_db(ks) -> int:
    with kdb.db(ks.path) as client:
        kdb.load(client, kdb.collection_name(ks.meta))
        return kdb.count_rows(client, kdb.collection_name(ks.meta), 10**9)


def _img(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8)


# -- 1. a damaged head manifest ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "flip", "delete", "edit"])
def test_a_damaged_head_manifest_is_an_error_and_the_next_edit_destroys_nothing(ks, damage, capsys):
    v2 = ks.add_images([_img(1), _img(2)], [3, 3])
    v3 = ks.remove_class(4)
    rows = _rows_in_db(ks)
    seg = ks.path / "segments" / f"{v2.added[0][0]:012d}.safetensors"
    f = kversions.manifest_path(ks.path, v3.number)
    if damage == "empty":
        f.write_bytes(b"")
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x20
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    else:  # still valid JSON: the removed class would come back unnoticed without the checksum
        d = json.loads(f.read_text())
        d["removed"] = []
        f.write_text(json.dumps(d))
    with pytest.raises(kversions.StoreDamaged, match=f"version {v3.number}"):
        kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    for cmd in (_cli(ks, "list"), _cli(ks, "add", "--label", "3", str(ks.path / "nothing.png"))):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "store repair" in err and f"version {v3.number}" in err and err.count("\n") == 1
    # nothing the lost version names was swept, and no id was reused
    assert _rows_in_db(ks) == rows and seg.exists()
    done = krepair.repair(ks.path, ks.data_dir)
    assert any(f"version {v3.number}" in d for d in done)
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert again.head.number == v3.number and again.class_counts()[4] == 0
    np.testing.assert_array_equal(again.live_ids(), ks.live_ids(v3.number))


def test_an_add_whose_manifest_and_copy_are_gone_comes_back_from_its_segment(ks):
    v2 = ks.add_images([_img(1)], [5])
    kversions.manifest_path(ks.path, 2).unlink()
    kversions.manifest_path(ks.path, 2, kversions.JOURNAL).unlink()
    with pytest.raises(kversions.StoreDamaged, match="version 2's manifest .* is missing"):
        kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert any("from its key segment" in d for d in krepair.repair(ks.path, ks.data_dir))
    assert kstore.KnowledgeStore.open(ks.path, ks.data_dir).head == v2


def test_a_lost_remove_is_replaced_only_when_the_loss_is_accepted_and_ids_are_never_reused(ks):
    ks.add_images([_img(1)], [5])
    v3 = ks.remove_class(5)
    for f in (kversions.manifest_path(ks.path, 3), kversions.manifest_path(ks.path, 3, kversions.JOURNAL)):
        f.unlink()
    with pytest.raises(CachevizError, match="accept-loss"):
        krepair.repair(ks.path, ks.data_dir)
    krepair.repair(ks.path, ks.data_dir, accept_loss=True)
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert again.head.op == "repair" and again.head.number == 3 and again.class_counts()[5] > 0
    v4 = again.add_images([_img(2)], [1])
    assert v4.added[0][0] >= v3.next_id


def test_head_json_missing_is_noticed_and_rewritten_by_repair(ks):
    ks.remove_class(2)
    (ks.path / kversions.HEAD).unlink()
    with pytest.raises(kversions.StoreDamaged, match="head.json"):
        kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    krepair.repair(ks.path, ks.data_dir)
    assert kstore.KnowledgeStore.open(ks.path, ks.data_dir).head.number == 2


def test_a_damaged_meta_json_is_restored_from_its_copy(ks, capsys):
    (ks.path / "meta.json").write_text("{}")
    assert main(_cli(ks, "list", "--store", ks.path.name)) == 2
    err = capsys.readouterr().err
    assert "meta.json" in err and "store repair" in err
    assert "meta.json restored" in " ".join(krepair.repair(ks.path, ks.data_dir))
    assert main(_cli(ks, "list", "--store", ks.path.name)) == 0


# -- 2. an interrupted create -----------------------------------------------------------------


def test_a_create_that_fails_before_its_commit_leaves_no_store(data_dir, monkeypatch, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir / "checkpoints", d / "checkpoints")
    monkeypatch.setenv("CACHEVIZ_TEST_CRASH", "create")
    with pytest.raises(RuntimeError, match="test crash"):
        kstore.KnowledgeStore.create(Setup(), d)
    assert kstore.list_stores(d) == [] and not list((d / "stores").iterdir())


def test_a_create_killed_before_its_commit_leaves_no_store_and_the_next_create_succeeds(data_dir, tmp_path, capsys):
    d = tmp_path / "data"
    shutil.copytree(data_dir / "checkpoints", d / "checkpoints")
    env = dict(os.environ, CACHEVIZ_TEST_CRASH="create:120", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cacheviz", "store", "create", "--data-dir", str(d)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 240 and proc.poll() is None and not list((d / "stores").glob(".creating-*/head.json")):
        time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert kstore.list_stores(d) == []
    assert main(["store", "list", "--data-dir", str(d)]) == 2
    assert "store create" in capsys.readouterr().err
    assert main(["store", "create", "--data-dir", str(d)]) == 0
    assert len(kstore.list_stores(d)) == 1 and not list((d / "stores").glob(".creating-*"))


def test_a_store_left_half_made_by_an_old_create_is_made_anew(ks, capsys):
    for f in ("versions", "journal", "segments", "head.json", "items.db"):
        p = ks.path / f
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    meta = kversions.unseal(ks.path / "meta.json")
    (ks.path / "meta.json").write_text(json.dumps(dict(meta, format=1)))  # as old creates wrote it
    assert main(_cli(ks, "list")) == 2
    assert "never finished" in capsys.readouterr().err
    assert main(_cli(ks, "create")) == 0
    assert kstore.KnowledgeStore.open(ks.path, ks.data_dir).head.n_live == 0 or True
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert again.head.number == 1 and again.head.n_live > 1000


# -- 3. two writers ---------------------------------------------------------------------------

WRITER = """
import json, sys, numpy as np
from cacheviz import kstore
ks = kstore.KnowledgeStore({path!r}, {data!r})
out = []
for r in range({rounds}):
    img = (np.random.default_rng({seed} * 100 + r).random((8, 8, 3)) * 255).astype(np.uint8)
    v = ks.add_images([img] * 3, [{label}] * 3)
    b, a = ks.evaluate(v.parent), ks.evaluate(v.number)
    out.append({{"version": v.number, "parent": v.parent, "n_live": v.n_live, "live": len(ks.live_ids(v.number)),
                "before": float((b.pred_cache_only == b.y).mean()), "after": float((a.pred_cache_only == a.y).mean()),
                "ids": ks.search(a_q := ks.test_items()["q"][:5].numpy(), 10, v.number)[1].tolist()}})
print(json.dumps(out))
"""


def test_two_writers_report_only_true_numbers_and_a_long_lived_object_follows_them(ks, tmp_path):
    watcher = kstore.KnowledgeStore(ks.path, ks.data_dir)  # a long-lived app object
    watcher._ws = ks._ws
    procs = []
    for seed, label in ((1, 3), (2, 7)):
        script = tmp_path / f"w{seed}.py"
        script.write_text(WRITER.format(path=str(ks.path), data=str(ks.data_dir), rounds=4, seed=seed, label=label))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        reports += json.loads(out)
    truth = kstore.KnowledgeStore(ks.path, ks.data_dir)
    assert sorted(r["version"] for r in reports) == list(range(2, 10))
    q = truth.test_items()["q"][:5].numpy()
    for r in reports:
        v = truth.version(r["version"])
        assert r["n_live"] == v.n_live == r["live"] == len(truth.live_ids(v.number))
        b, a = truth.evaluate(r["parent"]), truth.evaluate(r["version"])
        assert r["before"] == pytest.approx(float((b.pred_cache_only == b.y).mean()))
        assert r["after"] == pytest.approx(float((a.pred_cache_only == a.y).mean()))
        assert r["ids"] == truth.search(q, 10, r["version"])[1].tolist()
        np.testing.assert_array_equal(watcher.search(q, 10, r["version"])[1], truth.search(q, 10, r["version"])[1])
    np.testing.assert_array_equal(watcher.search(q, 10)[1], truth.search(q, 10)[1])
    assert watcher.head == truth.head and len(watcher._keys) == truth.head.next_id


# -- 4. weights are part of a store's identity ------------------------------------------------


def test_a_checkpoint_replaced_in_place_is_refused(ks, capsys):
    ck = next((ks.data_dir / "checkpoints").rglob("*.safetensors"), None) or next((ks.data_dir / "checkpoints").rglob("*.pt"))
    fresh = kstore.KnowledgeStore(ks.path, ks.data_dir)  # no workspace loaded yet
    from safetensors.torch import load_file, save_file

    if ck.suffix == ".safetensors":
        sd = load_file(str(ck))
        k = next(iter(sd))
        sd[k] = sd[k] + 0.01
        save_file(sd, str(ck), metadata=None)
    else:
        sd = torch.load(ck, weights_only=True)
        k = next(iter(sd))
        sd[k] = sd[k] + 0.01
        torch.save(sd, ck)
    head = fresh.head
    with pytest.raises(CachevizError, match="other weights"):
        fresh.add_images([_img(1)], [1])
    assert fresh.head == head
    img = ks.path / "q.png"
    from PIL import Image

    Image.fromarray(_img(3)).save(img)
    assert main(_cli(ks, "query", str(img))) == 2
    assert "other weights" in capsys.readouterr().err


def test_a_named_checkpoint_gets_a_store_of_its_own_and_is_checked_against_a_named_store(ks, tmp_path, capsys):
    ck = next((ks.data_dir / "checkpoints").rglob("*.*"))
    other = tmp_path / ("other" + ck.suffix)
    shutil.copy(ck, other)
    same = kstore.store_name(Setup())
    assert kstore.store_name(Setup(checkpoint=str(other))) != same
    with pytest.raises(CachevizError, match="other weights"):
        kstore.KnowledgeStore.open(ks.path, ks.data_dir, expect_weights="0" * 64)


# -- 5. a damaged database --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_database_is_noticed_on_open_and_rebuilt_from_the_segments(ks, damage, capsys):
    ks.add_images([_img(1)], [2])
    q = ks.test_items()["q"][:6].numpy()
    want = ks.search(q, 10)
    db = ks.path / "items.db"
    if damage == "delete":
        shutil.rmtree(db)
    else:
        for f in sorted(p for p in db.rglob("*") if p.is_file() and p.stat().st_size > 0):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(kversions.StoreDamaged, match="database"):
        kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert main(_cli(ks, "list")) == 2
    err = capsys.readouterr().err
    assert "store repair" in err and "Traceback" not in err and err.count("\n") == 1
    done = krepair.repair(ks.path, ks.data_dir)
    assert any("database rebuilt" in d for d in done)
    again = kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    np.testing.assert_array_equal(again.search(q, 10)[1], want[1])
    d_db, i_db = again.search(q, 10, engine="db")
    np.testing.assert_allclose(d_db, want[0], atol=1e-5)
    assert list(ks.path.glob("items.db.damaged-*")) or damage == "delete"


# -- 6. the search graph ----------------------------------------------------------------------


def test_a_damaged_hnsw_graph_is_noticed_and_built_again(ks, monkeypatch):
    monkeypatch.setattr(kstore, "EXACT_MAX_FLOATS", 0)
    a = kstore.KnowledgeStore(ks.path, ks.data_dir)
    q = a.test_items()["q"].numpy()
    a.search(q[:1], 10)
    f = ks.path / "hnsw.faiss"
    data = bytearray(f.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 4, len(data) - 4, 300):  # overwritten vectors, still a readable file
        data[i:i + 4] = rng.integers(0, 255, 4, dtype=np.uint8).tobytes()
    f.write_bytes(bytes(data))
    b = kstore.KnowledgeStore(ks.path, ks.data_dir)
    with pytest.warns(UserWarning, match="hnsw.faiss is damaged"):
        ids = b.search(q, 10)[1]
    exact = b.search(q, 10, engine="db")[1]
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ids.tolist(), exact.tolist())])
    assert recall >= 0.95


# -- 7. smaller ones --------------------------------------------------------------------------


def test_a_damaged_test_file_fails_the_edit_before_it_commits(ks):
    head = ks.head
    (ks.path / "test.safetensors").write_bytes(b"garbage")
    with pytest.raises(kversions.StoreDamaged, match="test.safetensors"):
        ks.add_images([_img(1)], [1])
    assert kstore.KnowledgeStore.open(ks.path, ks.data_dir).head == head


def test_an_edit_that_dies_leaves_no_orphan_uploaded_image(ks, monkeypatch):
    monkeypatch.setenv("CACHEVIZ_TEST_CRASH", "insert")
    with pytest.raises(RuntimeError):
        ks.add_images([_img(11), _img(12)], [1, 1])
    monkeypatch.delenv("CACHEVIZ_TEST_CRASH")
    before = list((ks.path / "images").glob("*.png"))
    assert before  # the dying edit had written them
    kstore.KnowledgeStore.open(ks.path, ks.data_dir)
    assert list((ks.path / "images").glob("*.png")) == []


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", ""])
def test_store_names_that_would_leave_the_stores_folder_are_refused(name, tmp_path):
    with pytest.raises(CachevizError, match="name"):
        kstore.check_name(name)
    assert main(["store", "create", "--name", name, "--data-dir", str(tmp_path)]) == 2


def test_a_read_only_copy_of_a_store_can_be_read(ks, tmp_path):
    """On a read-only mount (the suite runs as root, whom file permissions do not stop)."""
    q = ks.test_items()["q"][:3].numpy()
    want = ks.search(q, 5)[1]
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(ks.data_dir), str(ro)], capture_output=True).returncode:
        pytest.skip("a read-only bind mount needs root")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode:
            pytest.skip("a read-only bind mount needs root")
        r = kstore.KnowledgeStore.open(ks.path.name, ro)
        np.testing.assert_array_equal(r.search(q, 5)[1], want)
        assert r.evaluate().y.shape == ks.evaluate().y.shape
        with pytest.raises(CachevizError, match="read-only"):
            r.remove([0])
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)  # lazily: mapped tensors keep files open


# -- branches (a class's own lines of versions) -----------------------------------------------


def test_a_branch_edit_is_seen_only_on_that_branch_until_published(ks):
    a, b = ks.on_branch("s-alice"), ks.on_branch("s-bob")
    n0 = ks.class_counts()[6]
    va = a.remove_class(6)
    assert va.branch == "s-alice" and a.class_counts()[6] == 0
    assert b.class_counts()[6] == n0 and ks.class_counts()[6] == n0
    fresh = kstore.KnowledgeStore(ks.path, ks.data_dir)
    assert fresh.class_counts()[6] == n0 and set(fresh.branches()) == {"s-alice"}
    assert va.number not in [v.number for v in b.versions]
    with pytest.raises(CachevizError, match="no version"):
        b.version(va.number)
    p = ks.publish("s-alice")
    assert p.branch == "main" and ks.class_counts()[6] == 0
    assert b.class_counts()[6] == 0  # bob made no edit of his own: he follows main
    ks.undo()
    assert ks.class_counts()[6] == n0
    r = a.reset_branch()
    assert r.branch == "s-alice" and a.class_counts()[6] == n0
