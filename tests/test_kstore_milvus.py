"""The knowledge store on a real Milvus server (`-m milvus`): the same behavioural tests as on
Milvus Lite (the test bodies of tests/test_kstore.py, re-run here against a server), then what
only a server can do to a store: be down, be killed in the middle of an edit, restart between
two edits. The server is PyPI's `milvus` package (Milvus 2.3 standalone, tests/milvus_server.py),
started once per session on loopback; without it these tests skip, saying why."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_kstore as lite
from PIL import Image

from cacheviz import kdb, kstore
from cacheviz.__main__ import main
from cacheviz.config import Setup
from cacheviz.errors import CachevizError

pytestmark = pytest.mark.milvus
REPO = Path(__file__).resolve().parents[1]

# Tests of tests/test_kstore.py about Milvus Lite's own files; a server has none to damage.
LITE_ONLY: set[str] = set()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    from milvus_server import start_server

    server = start_server(tmp_path_factory.mktemp("milvus-server"))
    yield server
    server.stop()
    shutil.rmtree(server.base / "bin", ignore_errors=True)  # 300 MB of binaries; logs and data stay


@pytest.fixture(scope="module", autouse=True)
def on_server(milvus_server):
    """Every store of this module keeps its rows on the server (and its subprocesses too)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CACHEVIZ_MILVUS_URI", milvus_server.uri)
    mp.delenv("CACHEVIZ_MILVUS_TOKEN", raising=False)
    yield milvus_server
    mp.undo()
    kdb._drop_client(milvus_server.uri)


@pytest.fixture(scope="module")
def mdata(data_dir, digits_spec, tmp_path_factory) -> Path:
    """The session's data directory (its trained digits model) without its stores: those keep
    their rows in Milvus Lite files, which a server-backed store cannot read."""
    d = tmp_path_factory.mktemp("mdata")
    for sub in data_dir.iterdir():
        if sub.is_dir() and sub.name != "stores":
            shutil.copytree(sub, d / sub.name)
    return d


@pytest.fixture(scope="module")
def base(mdata) -> kstore.KnowledgeStore:
    return kstore.open_or_create(Setup(), mdata)


def private_copy(src: kstore.KnowledgeStore, folder: Path) -> kstore.KnowledgeStore:
    """`src` copied to `folder`, rows included: on a server the folder holds the versions and
    segments but not the rows, so the copy gets a collection of its own, filled from src's,
    and its meta.json names it (re-sealed where the store seals its meta)."""
    shutil.copytree(src.path, folder, ignore=shutil.ignore_patterns("lock", "db.lock"))
    uid = secrets.token_hex(8)
    coll = kdb.new_collection_name(src.path.name, uid)
    with kdb.db(folder) as client:
        kdb.make_collection(client, coll, src.dim)
        kdb.load(client, kdb.collection_name(src.meta))
        kdb.load(client, coll)
        # unflushed: durable once inserted (the server's write-ahead log), and 3 s a test saved
        n = kdb.copy_rows(client, kdb.collection_name(src.meta), coll, src.head.next_id, then_flush=False)
        assert n == src.head.next_id
    metas = [p for p in (folder / "meta.json", *folder.glob("*/meta.json")) if p.exists()]
    for p in metas:  # meta.json and the journal's copy of it
        meta = {k: v for k, v in json.loads(p.read_text()).items() if k != "sha256"}
        meta.update(uid=uid, collection=coll)
        seal = getattr(getattr(kstore, "kversions", None), "seal", None)
        p.write_text(json.dumps(seal(meta) if seal and "sha256" in json.loads(p.read_text()) else meta))
    return kstore.KnowledgeStore(folder, src.data_dir)


@pytest.fixture
def ks(base, tmp_path) -> kstore.KnowledgeStore:
    s = private_copy(base, tmp_path / "stores" / base.path.name)
    s._ws = base.workspace()
    return s


# The store's behavioural tests, the same bodies as on Milvus Lite.
for _name, _obj in vars(lite).items():
    if _name.startswith("test_") and callable(_obj) and _name not in LITE_ONLY and _name not in globals():
        globals()[_name] = _obj
    elif type(_obj).__name__ == "FixtureFunctionDefinition" and _name not in globals():
        globals()[_name] = _obj  # fixtures a shared body asks for


def test_store_command_line(ks, tmp_path, capsys):
    """The command-line body, given a private copy: the body copies its store's folder and
    edits the copy, and on a server a copied folder still names its source's collection."""
    lite.test_store_command_line(ks, tmp_path, capsys)


def test_the_store_names_its_collection_and_the_server_holds_every_committed_row(base):
    coll = kdb.collection_name(base.meta)
    assert coll != kdb.COLLECTION and coll == base.meta["collection"]
    with kdb.db(base.path) as client:
        assert client.has_collection(coll)
        kdb.load(client, coll)
        assert kdb.count_rows(client, coll) == kdb.count_rows(client, coll, base.head.next_id) == base.head.next_id
        np.testing.assert_array_equal(kdb.ids_below(client, coll, base.head.next_id), np.arange(base.head.next_id))
    assert not (base.path / "items.db").exists()  # nothing in a Lite file by mistake


# -- what only a server does ------------------------------------------------------------------


def cli_data_dir(ks: kstore.KnowledgeStore, root: Path) -> Path:
    """A data directory for the command line holding `ks` as the setup's default store."""
    d = root / "cli-data"
    for sub in ks.data_dir.iterdir():
        if sub.is_dir() and sub.name != "stores":
            shutil.copytree(sub, d / sub.name)
    (d / "stores").mkdir(parents=True)
    os.rename(ks.path, d / "stores" / ks.path.name)
    return d


def image_folder(root: Path, n: int) -> Path:
    folder = root / f"images-{n}"
    folder.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def rows_in(ks: kstore.KnowledgeStore) -> int:
    coll = kdb.collection_name(ks.meta)
    with kdb.db(ks.path) as client:
        kdb.load(client, coll)
        return kdb.count_rows(client, coll)


def assert_one_sentence(err: str, *said: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err and "report it" not in err, err
    for s in said:
        assert s in err, err


def test_every_store_command_says_one_sentence_while_the_server_is_down(ks, milvus_server, tmp_path, capfd):
    n0 = ks.head.number
    d = cli_data_dir(ks, tmp_path)
    folder = image_folder(tmp_path, 2)
    common = ["--data-dir", str(d)]
    commands = (["store", "list", *common], ["store", "list", "--items", *common],
                ["store", "add", "--label", "3", "--folder", str(folder), *common],
                ["store", "remove", "--class", "3", *common], ["store", "undo", *common],
                ["store", "query", str(folder / "0.png"), "--k", "3", *common])
    capfd.readouterr()
    milvus_server.kill9()
    try:
        for cmd in commands:
            t0 = time.monotonic()
            assert main(cmd) == 2, cmd
            assert time.monotonic() - t0 < 30, f"{cmd} took {time.monotonic() - t0:.0f} s to give up"
            out = capfd.readouterr()
            assert_one_sentence(out.err, "did not answer", milvus_server.uri, "CACHEVIZ_MILVUS_URI")
    finally:
        milvus_server.restart()
    after = kstore.KnowledgeStore.open(ks.path.name, d)
    assert after.head.number == n0  # none of them made a version
    assert main(["store", "remove", "--class", "3", *common]) == 0  # and the first one after works
    assert "version 2: remove class 3" in capfd.readouterr().out


def test_a_server_killed_mid_edit_loses_nothing_committed_and_keeps_nothing_half_added(ks, milvus_server, tmp_path):
    head = ks.head
    q = ks.test_items()["q"][:10].numpy()
    before = ks.search(q, 10)
    before_db = ks.search(q, 10, engine="db")
    d = cli_data_dir(ks, tmp_path)
    path = d / "stores" / ks.path.name
    folder = image_folder(tmp_path, 120)
    # the command line's `store add`, its rows in batches of 40 (three inserts, not 2,500 images'
    # keys on the CPU), sleeping after each batch: the server dies between two of its inserts
    script = tmp_path / "add.py"
    script.write_text("import sys\nfrom cacheviz import kstore\nkstore.INSERT_BATCH = 40\n"
                      "from cacheviz.__main__ import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, CACHEVIZ_TEST_CRASH="insert:10", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), "store", "add", "--label", "1", "--folder", str(folder),
                             "--data-dir", str(d)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0, seen = time.monotonic(), 0
        while time.monotonic() - t0 < 120 and proc.poll() is None:
            seen = rows_in(ks) if (path / "segments" / f"{head.next_id:012d}.safetensors").exists() else 0
            if seen > head.next_id:  # the first batch is in: the edit is asleep after it
                break
            time.sleep(0.3)
        assert proc.poll() is None and seen == head.next_id + 40, (seen, proc.poll() is None or proc.stderr.read())
        milvus_server.kill9()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        milvus_server.restart()
    assert proc.returncode == 2, err.decode()[-2000:]
    assert_one_sentence(err.decode(), "did not answer", milvus_server.uri)
    again = kstore.KnowledgeStore(path, d)  # the open sweeps the dead edit's rows
    assert again.head == head
    assert rows_in(again) == head.next_id  # no half-added row survives, every committed one does
    np.testing.assert_array_equal(again.search(q, 10)[1], before[1])
    np.testing.assert_array_equal(again.search(q, 10, engine="db")[1], before_db[1])
    np.testing.assert_allclose(again.search(q, 10, engine="db")[0], before_db[0], atol=1e-5)
    again._ws = ks.workspace()
    v = again.add_images([np.zeros((8, 8, 3), np.uint8)], [1])  # the next edit works, with the dead edit's ids
    assert v.added == [[head.next_id, head.next_id + 1]]
    assert rows_in(again) == head.next_id + 1
    assert np.isin(again.search(q, len(again.live_ids()), engine="db")[1], [head.next_id]).any()


def test_a_server_restarted_between_two_edits_of_one_store_object(ks, milvus_server):
    img = np.zeros((8, 8, 3), np.uint8)
    v1 = ks.add_images([img], [2])
    milvus_server.restart()
    v2 = ks.add_images([img + 1], [3])  # the same object, its client from before the restart
    assert v2.number == v1.number + 1 and v2.added == [[v1.next_id, v1.next_id + 1]]
    q = ks.test_items()["q"][:3].numpy()
    ids = ks.search(q, len(ks.live_ids()), engine="db")[1]
    assert np.isin([v1.added[0][0], v2.added[0][0]], ids).all()
    assert rows_in(ks) == v2.next_id
    np.testing.assert_array_equal(ks.search(q, 5, engine="db")[1], ks.search(q, 5)[1])


def test_a_wrong_server_address_is_one_sentence_without_credentials(base, monkeypatch):
    port = __import__("milvus_server")._free_ports(1)[0]
    monkeypatch.setenv("CACHEVIZ_MILVUS_URI", f"http://admin:hunter22@127.0.0.1:{port}")
    monkeypatch.setenv("CACHEVIZ_MILVUS_TOKEN", "admin:hunter22")
    with pytest.raises(CachevizError) as e:
        kstore.KnowledgeStore(base.path, base.data_dir)
    text = e.value.render()
    assert "hunter22" not in text and f"admin:***@127.0.0.1:{port}" in text and "did not answer" in text
    assert "\n" not in text
