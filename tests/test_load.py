"""A classroom on this machine: a real server and N headless-Chromium sessions (`-m load`).

All sessions click *Build cache* within a second of each other on the offline preset, then open
Neighbours, upload an image and move the θ slider (`benchmarks/load.py` does the driving). N is
8 here (`CACHEVIZ_LOAD_N` overrides); `python benchmarks/load.py --n 30` writes the README row.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.load


@pytest.fixture(scope="module")
def load():
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is missing; install Debian's chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.async_api", reason="the Python package playwright is missing")
    spec = importlib.util.spec_from_file_location("load", REPO / "benchmarks" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_class_of_sessions_gets_one_build_and_a_responsive_server(load):
    n = int(os.environ.get("CACHEVIZ_LOAD_N", "8"))
    res = load.measure(n, timeout_s=240)
    print("\n" + load.table(res))
    for run in res["runs"]:  # every run, not only the best: no errors, every session served
        crowd, alone = run["crowd"], run["alone"]
        assert not crowd["errors"] and not alone["errors"], crowd["errors"] + alone["errors"]
        assert crowd["with_results"] == n and crowd["galleries"] == n and crowd["sliders"] == n
        assert crowd["click_spread_s"] < 1.0
        health = crowd["health"]
        assert health["p95_s"] <= load.GOALS["health_p95_s"] and health["failed"] == 0, health
        assert health["peak_rss_mb"] < 4096  # the server and its worker, bounded
    assert res["slowdown"] <= load.GOALS["slowdown"], load.table(res)
