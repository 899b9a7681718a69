"""benchmarks/store_scale.py at a tiny size: it runs, exact search is exact, the JSON has its fields."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("store_scale", ROOT / "benchmarks" / "store_scale.py")
store_scale = importlib.util.module_from_spec(spec)
sys.modules["store_scale"] = store_scale
spec.loader.exec_module(store_scale)

TINY = ["--n", "5000", "--dim", "64", "--queries", "200", "--lat-queries", "50", "--bw-mb", "64",
        "--ef", "32,128", "--nprobe", "8,64"]
ROW_FIELDS = {"backend", "setting", "n", "dim", "build_s", "insert_per_s", "rss_growth_mb", "p50_ms", "p95_ms",
              "batch_q_per_s", "recall_at_10", "recall_at_10_single", "load_before", "load_after"}


def test_keys_are_deterministic_unit_norm_and_chunk_stable():
    a = store_scale.synthetic_keys(110_000, 32, seed=3, classes=50, latent=8)
    b = store_scale.synthetic_keys(60_000, 32, seed=3, classes=50, latent=8)
    q = store_scale.synthetic_keys(100, 32, seed=3, classes=50, latent=8, stream=1)
    assert a.dtype == np.float32 and a.shape == (110_000, 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(a[:50_000], b[:50_000], atol=1e-6)  # whole chunks come from their own streams
    assert (q @ a.T).max() < 1 - 1e-4                    # queries are held out: no query is a key


def test_faiss_backends_tiny(tmp_path):
    out = tmp_path / "s.json"
    t0 = time.perf_counter()
    assert store_scale.main(TINY + ["--backends", "flat,hnsw,ivf", "--out", str(out)]) == 0
    assert time.perf_counter() - t0 < 30
    res = json.loads(out.read_text())
    for key in ("machine", "versions", "params", "rows", "wall_s", "load_avg_before", "load_avg_after", "limits",
                "goal"):
        assert key in res, key
    assert res["params"]["keys"]["kind"] == "synthetic" and res["params"]["n"] == 5000
    assert {"cores", "ram_gb"} <= set(res["machine"])
    flat = [r for r in res["rows"] if r["backend"] == "faiss-flat"]
    assert len(flat) == 1 and flat[0]["recall_at_10"] == 1.0 and flat[0]["recall_at_10_single"] == 1.0
    assert {r["setting"] for r in res["rows"] if r["backend"] == "faiss-hnsw"} == {"efSearch 32", "efSearch 128"}
    assert {r["setting"] for r in res["rows"] if r["backend"] == "faiss-ivf"} == {"nprobe 8", "nprobe 64"}
    for r in res["rows"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert 0 <= r["recall_at_10"] <= 1 and r["p50_ms"] <= r["p95_ms"]
    lim = res["limits"]
    assert lim["bandwidth"]["read_gb_per_s_1thread"] > 0 and lim["exact_p50_vs_bandwidth_1thread"] > 0


def test_milvus_lite_tiny(tmp_path):
    pytest.importorskip("pymilvus")
    from pymilvus import MilvusClient

    t0 = time.perf_counter()
    try:
        MilvusClient(str(tmp_path / "probe.db")).close()
    except Exception as exc:  # the embedded server could not start here
        pytest.skip(f"Milvus Lite does not start: {exc}")
    if time.perf_counter() - t0 > 20:
        pytest.skip("Milvus Lite takes more than 20 s to start here")
    out = tmp_path / "m.json"
    assert store_scale.main(TINY + ["--n", "2000", "--backends", "milvus", "--milvus-nprobe", "1000",
                                    "--milvus-nlist", "16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert "error" not in row, row
    assert ROW_FIELDS <= set(row)
    assert row["backend"] == "milvus-lite" and row["n"] == 2000 and row["index_type"] == "IVF_FLAT"
    assert row["recall_at_10"] == 1.0          # nprobe >= nlist: every list is scanned, the search is exact
    assert row["disk_mb"] > 0 and row["insert_per_s"] > 0
