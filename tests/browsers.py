"""What every real-browser test needs: Debian's Chromium, Playwright, and benchmarks/load.py,
which starts and stops real servers for the load test too."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def load_harness():
    spec = importlib.util.spec_from_file_location("load", REPO / "benchmarks" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def browser_harness():
    """benchmarks/load.py, or a skip saying what is missing (Chromium or Playwright)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the Python package playwright is missing (pip install playwright)")
    return load_harness()
