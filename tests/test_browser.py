"""The app in a real browser: `streamlit run app.py`, headless Chromium through Playwright.

Builds the offline preset on a fresh data directory, uploads a PNG on the neighbours page,
waits for the gallery and saves a screenshot (its path is printed). Needs Debian's chromium at
/usr/bin/chromium and the Python `playwright` package; no browser is downloaded.

    python -m pytest -m browser tests/test_browser.py -s
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    url = f"http://127.0.0.1:{port}/_stcore/health"
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"streamlit did not answer on port {port} within {timeout} s")


@pytest.fixture
def server(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the Python package playwright is missing (pip install playwright)")
    port = _free_port()
    data = tmp_path / "data"
    env = dict(os.environ, CACHEVIZ_DATA_DIR=str(data), PYTHONUNBUFFERED="1", CACHEVIZ_WORKERS="1")
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_healthy(port, proc)
        yield f"http://127.0.0.1:{port}/", tmp_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        text = (tmp_path / "streamlit.log").read_text()
        assert "Traceback" not in text, text[-3000:]


def _digit_png(path: Path) -> Path:
    """A dark '7' drawn on white paper, as a photo of a handwritten digit would be."""
    a = np.full((200, 160, 3), 250, np.uint8)
    a[30:50, 30:130] = 15  # the bar
    for i in range(120):  # the stem
        x = 125 - i * 60 // 120
        a[50 + i, x - 10 : x + 10] = 15
    Image.fromarray(a).save(path)
    return path


def test_build_upload_and_gallery_in_chromium(server):
    from playwright.sync_api import sync_playwright

    url, tmp = server
    png = _digit_png(tmp / "seven.png")
    shots = Path(os.environ.get("CACHEVIZ_SHOTS_DIR") or tmp)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            t0 = time.perf_counter()
            page.goto(url)
            page.get_by_role("button", name="Build cache").click(timeout=60_000)
            page.get_by_text("Network alone").wait_for(timeout=180_000)
            built = time.perf_counter() - t0
            assert page.get_by_text("Cache model", exact=True).count() >= 1
            page.screenshot(path=str(shots / "browser-home.png"))

            page.get_by_role("link", name="Neighbours").first.click()
            page.get_by_text("nearest stored images").wait_for(timeout=60_000)
            page.get_by_text("Upload", exact=True).click()
            page.locator('input[type="file"]').set_input_files(str(png))
            page.get_by_text("seven.png (160×200)").wait_for(timeout=60_000)
            page.get_by_text("of the similarity mass").first.wait_for(timeout=60_000)
            gallery = time.perf_counter() - t0
            assert page.locator("[data-testid=stMain] img").count() >= 14  # upload, model view, 12 neighbours
            # the θ slider shows the value the prediction uses
            import re

            caption = page.get_by_text("of the similarity mass").first.inner_text()
            theta = float(re.search(r"θ = ([0-9.]+)", caption).group(1))
            thumb = page.locator('[data-testid="stSlider"]', has_text="sharpness").locator('input[type="range"]')
            assert float(thumb.input_value()) == theta
            time.sleep(1.0)  # let the images paint
            shot = shots / "browser-neighbours-upload.png"
            page.screenshot(path=str(shot))
            assert page.get_by_text("Traceback").count() == 0
        finally:
            browser.close()
    print(f"\nbuilt in {built:.1f} s, gallery of the upload after {gallery:.1f} s; screenshot: {shot}")
    assert shot.stat().st_size > 10_000
