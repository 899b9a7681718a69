"""Persistence: atomic writes, corruption detection, rebuilds."""
import os
import warnings

import pytest
import torch

from cacheviz import store


def test_round_trip_with_meta(tmp_path):
    p = tmp_path / "a.safetensors"
    t = {"x": torch.randn(5, 3), "y": torch.arange(5)}
    store.save_tensors(p, t, {"layer": "layer3.0", "n": 5})
    got, meta = store.load_tensors(p, expect_meta={"n": 5, "layer": "layer3.0"})
    assert torch.equal(got["x"], t["x"]) and torch.equal(got["y"], t["y"])
    assert meta == {"layer": "layer3.0", "n": 5}


def test_mismatched_meta_is_not_returned(tmp_path):
    p = tmp_path / "a.safetensors"
    store.save_tensors(p, {"x": torch.ones(2)}, {"n": 2})
    with pytest.warns(UserWarning, match="rebuilt"):
        assert store.load_tensors(p, expect_meta={"n": 3}) is None


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_corruption_is_detected_and_rebuilt(tmp_path, damage):
    p = tmp_path / "a.safetensors"
    store.save_tensors(p, {"x": torch.arange(1000, dtype=torch.float32)}, {"n": 1})
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_byte":
        raw[-10] ^= 0xFF  # inside the tensor data: only the checksum can see it
    else:
        raw = bytearray(b"not a safetensors file")
    p.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="rebuilt"):
        assert store.load_tensors(p, expect_meta={"n": 1}) is None
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(1000, dtype=torch.float32)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = store.cached_tensors(p, {"n": 1}, build)["x"]
    assert built == [1] and torch.equal(x, torch.arange(1000, dtype=torch.float32))
    assert store.cached_tensors(p, {"n": 1}, build)["x"].shape == (1000,) and built == [1]


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    store.save_tensors(p, {"x": torch.zeros(10)}, {"v": 1})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(store, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save_tensors(p, {"x": torch.ones(10)}, {"v": 2})
    got, meta = store.load_tensors(p)
    assert torch.equal(got["x"], torch.zeros(10)) and meta == {"v": 1}
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temp file left behind


def test_crash_mid_json_write(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    store.atomic_write_json(p, {"a": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.atomic_write_json(p, {"a": 2})
    monkeypatch.undo()
    assert store.load_json(p) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_corrupt_json_is_reported(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{half")
    with pytest.warns(UserWarning):
        assert store.load_json(p) is None


def test_config_hash_is_order_independent():
    assert store.config_hash({"a": 1, "b": [1, 2]}) == store.config_hash({"b": [1, 2], "a": 1})
    assert store.config_hash({"a": 1}) != store.config_hash({"a": 2})


def test_prune_lru_removes_least_recently_used_first(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}.safetensors"
        store.save_tensors(p, {"x": torch.zeros(1000)}, {"i": i})
        os.utime(p, (1000 + i, 1000 + i))
        paths.append(p)
    size = paths[0].stat().st_size
    store.touch(paths[0])  # used just now: the newest
    removed = store.prune_lru(tmp_path, 2 * size, keep={str(paths[1])})
    assert removed == ["f2.safetensors", "f3.safetensors"]
    assert paths[0].exists() and paths[1].exists()
    assert not paths[2].exists() and not paths[3].exists()


def test_feature_store_stays_within_its_budget(tmp_path, monkeypatch):
    """Features are a cache: a long series of studies must not fill the disk."""
    from cacheviz import workspace
    from cacheviz.config import Setup

    ws = workspace.prepare(Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3")), tmp_path, "cpu")
    idx = torch.arange(200)
    ws.features("train", idx, ["pool"])
    old = next((tmp_path / "features").glob("*.safetensors"))
    os.utime(old, (1000, 1000))
    monkeypatch.setattr(workspace, "FEATURE_BUDGET_BYTES", 1)
    ws.features("train", idx, ["relu3"])
    left = list((tmp_path / "features").glob("*.safetensors"))
    assert old not in left and len(left) == 1 and "relu3" in left[0].name
    # a full disk: features are still served, just not stored
    monkeypatch.setattr(workspace, "DISK_RESERVE_BYTES", 2**62)
    with pytest.warns(UserWarning, match="nearly full"):
        got = ws.features("test", idx, ["pool"])
    assert got["pool"].shape[0] == 200
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 1


def test_stale_temps_are_swept_only_when_their_writer_is_known_dead(tmp_path):
    """A dead writer of this host: swept. Another host's writer (a data directory shared by two
    machines): kept, since its process id means nothing here. Old names (no host): this host's."""
    import subprocess
    import sys

    from cacheviz import store

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    mine = tmp_path / f".r.json.{dead}h{store._HOST}.abc123.tmp"
    other = tmp_path / f".r.json.{dead}h{'0' * 8 if store._HOST != '0' * 8 else '1' * 8}.abc123.tmp"
    old = tmp_path / f".r.json.{dead}.abc123.tmp"
    alive = tmp_path / f".r.json.{os.getppid()}h{store._HOST}.abc123.tmp"
    for f in (mine, other, old, alive):
        f.write_text("x")
    store.sweep_stale_temps(tmp_path, force=True)
    assert not mine.exists() and not old.exists()
    assert other.exists() and alive.exists()
