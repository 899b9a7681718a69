"""The app in a real browser: `streamlit run app.py`, headless Chromium through Playwright.

Builds the offline preset on a fresh data directory, uploads a PNG on the neighbours page,
waits for the gallery and saves a screenshot (its path is printed). Needs Debian's chromium at
/usr/bin/chromium and the Python `playwright` package; no browser is downloaded.

    python -m pytest -m browser tests/test_browser.py -s
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from browsers import CHROMIUM, browser_harness, load_harness  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.browser




@pytest.fixture
def server(tmp_path):
    load = browser_harness()
    port = load.free_port()
    log = tmp_path / "streamlit.log"
    proc = load.start_server(tmp_path / "data", port, log)
    try:
        yield f"http://127.0.0.1:{port}/", tmp_path
    finally:
        load.stop_server(proc)
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]



@contextlib.contextmanager
def _built_app(server, height: int):
    """Headless Chromium on the app with the offline preset's cache built: (page, screenshot folder)."""
    from playwright.sync_api import sync_playwright

    url, tmp = server
    shots = Path(os.environ.get("CACHEVIZ_SHOTS_DIR") or tmp)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=load_harness().CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url)
            page.get_by_role("button", name="Build cache").click(timeout=60_000)
            page.get_by_text("Network alone").wait_for(timeout=180_000)
            yield page, shots
        finally:
            browser.close()

def test_build_upload_and_gallery_in_chromium(server):
    from playwright.sync_api import sync_playwright

    url, tmp = server
    png = load_harness().digit_png(tmp / "seven.png")
    shots = Path(os.environ.get("CACHEVIZ_SHOTS_DIR") or tmp)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=load_harness().CHROMIUM_ARGS, headless=True)
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


def test_robustness_lab_and_why_it_resists_in_chromium(server):
    """The robustness pages in a real browser: a small Table 2 row runs and draws, and on "Why it
    resists" moving the epsilon slider (keyboard, as a user would) redraws the adversarial."""
    import re

    with _built_app(server, 2200) as (page, shots):
        page.get_by_role("link", name="Robustness lab (Tables 2–4)").first.click()
        n_box = page.get_by_role("spinbutton", name="Images (N)")
        n_box.wait_for(timeout=60_000)
        n_box.fill("20")
        n_box.press("Enter")
        page.get_by_role("button", name="Run the attack").click(timeout=60_000)
        page.get_by_text("Mean ρ_adv (successes)").wait_for(timeout=180_000)
        page.locator("[data-testid=stMain] .js-plotly-plot").first.wait_for(timeout=60_000)
        time.sleep(1.0)
        page.screenshot(path=str(shots / "browser-robustness.png"))

        page.get_by_role("link", name="Why it resists").first.click()
        page.get_by_text("Does the adversarial still retrieve its true class?").wait_for(timeout=120_000)
        before = page.get_by_text(re.compile(r"^adversarial · ρ_adv")).first.inner_text()
        thumb = page.locator('[data-testid="stSlider"]', has_text="ε").get_by_role("slider")
        thumb.focus()
        for _ in range(40):
            thumb.press("ArrowRight")
        deadline = time.time() + 60
        after = before
        while time.time() < deadline and after == before:
            time.sleep(0.5)
            after = page.get_by_text(re.compile(r"^adversarial · ρ_adv")).first.inner_text()
        assert after != before, "moving epsilon did not redraw the adversarial"
        assert float(after.split()[-1]) > float(before.split()[-1])
        time.sleep(1.0)
        shot = shots / "browser-why-it-resists.png"
        page.screenshot(path=str(shot))
        assert page.get_by_text("Traceback").count() == 0
    print(f"\nscreenshots: {shots / 'browser-robustness.png'}, {shot}")


def test_jacobians_page_and_explorer_in_chromium(server):
    """Figure 4 in a real browser: a small run draws the spectrum and both scatters, and a click
    on a point of the network-against-cache scatter opens that image in the explorer, with its
    cache neighbours and its per-class heat-maps."""
    import re

    with _built_app(server, 2400) as (page, shots):
        page.get_by_role("link", name="Jacobians (Fig. 4)").first.click()
        n_box = page.get_by_role("spinbutton", name="Images (N)")
        n_box.wait_for(timeout=60_000)
        n_box.fill("20")
        n_box.press("Enter")
        page.get_by_role("button", name="Compute the Jacobians").click(timeout=60_000)
        page.get_by_text("One image's Jacobian").wait_for(timeout=180_000)
        picked = re.compile(r"^test #(\d+) · true ")
        page.get_by_text(picked).first.wait_for(timeout=120_000)
        first = int(picked.match(page.get_by_text(picked).first.inner_text()).group(1))

        # the scatter of the network against the cache model: click a point other than the
        # explorer's current image
        plot = page.locator(".js-plotly-plot", has_text="network against cache (").first
        plot.scroll_into_view_if_needed()
        points = plot.locator(".scatterlayer .trace").nth(1).locator("path.point")
        ids = plot.evaluate("gd => gd.data[1].customdata")
        k = next(i for i, v in enumerate(ids) if int(v) != first)
        points.nth(k).click(force=True)
        deadline = time.time() + 90
        now = first
        while time.time() < deadline and now != int(ids[k]):
            time.sleep(0.5)
            loc = page.get_by_text(picked)
            now = int(picked.match(loc.first.inner_text()).group(1)) if loc.count() else now
        assert now == int(ids[k]), f"clicking test #{ids[k]} left the explorer on #{now}"
        page.get_by_text("nearest stored images").first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot", has_text="per class c").first.wait_for(timeout=120_000)
        time.sleep(1.0)
        shot = shots / "browser-jacobians.png"
        page.screenshot(path=str(shot), full_page=True)
        assert page.get_by_text("Traceback").count() == 0
    print(f"\nscreenshot: {shot}")


def test_answer_early_page_and_key_network_in_chromium(server):
    """Answer early in a real browser: measure a small frontier, move the tau slider, train a
    key network, then query it from the Neighbours page."""
    with _built_app(server, 2400) as (page, shots):
        page.get_by_role("link", name="Answer early").first.click()
        sizes = page.get_by_role("textbox", name="Cache sizes (fractions of the training set)")
        sizes.wait_for(timeout=60_000)
        sizes.fill("0.05, 0.5")
        sizes.press("Enter")
        timed = page.get_by_role("spinbutton", name="Timed images")
        timed.fill("200")
        timed.press("Enter")
        page.get_by_role("button", name="Measure the frontier").click(timeout=60_000)
        page.locator(".js-plotly-plot", has_text="Answering early").first.wait_for(timeout=240_000)
        verdict = page.get_by_text("than the network").first
        verdict.wait_for(timeout=60_000)
        assert page.locator(".js-plotly-plot", has_text="full network").count() >= 1

        epochs = page.get_by_role("textbox", name="Epochs (regression, metric)")
        epochs.fill("2, 1")
        epochs.press("Enter")
        page.get_by_role("button", name="Train the key network").click(timeout=60_000)
        page.get_by_text("Trained in").first.wait_for(timeout=240_000)
        # the seed's two tables (model rows, robustness rows); grids draw on a canvas
        assert page.locator('[data-testid="stDataFrame"]').count() >= 3
        assert page.get_by_text("after FGSM at ε", exact=False).count() >= 1
        time.sleep(1.0)
        shot = shots / "browser-early.png"
        page.screenshot(path=str(shot), full_page=True)

        page.get_by_role("link", name="Neighbours").first.click()
        page.get_by_text("nearest stored images").first.wait_for(timeout=60_000)
        page.get_by_text("Query with a trained key network").click()
        page.get_by_text("the network never runs").first.wait_for(timeout=120_000)
        shot2 = shots / "browser-early-neighbours.png"
        page.screenshot(path=str(shot2), full_page=True)
        assert page.get_by_text("Traceback").count() == 0
    print(f"\nscreenshots: {shot}, {shot2}")


def test_knowledge_store_remove_undo_teach_in_chromium(server):
    """The Knowledge store page in a real browser (its store created by the app's worker process):
    forget a class and see the test images it changed, undo, then teach a drawn 7 with its label
    and see a new version."""
    import re

    from playwright.sync_api import sync_playwright

    url, tmp = server
    png = load_harness().digit_png(tmp / "seven.png")
    shots = Path(os.environ.get("CACHEVIZ_SHOTS_DIR") or tmp)
    shots.mkdir(parents=True, exist_ok=True)

    def pick(label: str, option: str) -> None:
        box = page.locator('[data-testid="stSelectbox"]', has_text=label).first
        for _ in range(5):  # a rerun that redraws the box closes its list: open it again
            box.click()
            try:
                page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise AssertionError(f"could not pick {option} in {label}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=load_harness().CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 3800})
            page.goto(url)
            page.get_by_role("link", name="Knowledge store").first.click()
            page.get_by_role("button", name="Create the knowledge store").click(timeout=60_000)
            page.get_by_text("How it answers").wait_for(timeout=240_000)

            pick("Class", "3")
            page.get_by_role("button", name="Remove class").click()
            page.get_by_text("After removing 3: the network still gets").wait_for(timeout=60_000)
            page.get_by_text("changed their cache-only model answer").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "browser-knowledge-forget.png"), full_page=True)

            page.get_by_role("button", name="Undo the last edit").click()
            page.get_by_text("Version 3: undo back to version 1").wait_for(timeout=60_000)

            page.locator('[data-testid="stFileUploader"]', has_text="Images").locator('input[type="file"]') \
                .set_input_files(str(png))
            page.get_by_text("seven.png").first.wait_for(timeout=60_000)
            pick("Their label", "7")
            add = page.get_by_role("button", name="Add to the store")
            deadline = time.time() + 60
            while time.time() < deadline and not add.is_enabled():  # enabled once the upload decoded
                time.sleep(0.3)
            add.click()
            page.get_by_text("Version 4: add 1 image labelled 7").wait_for(timeout=60_000)
            # asked with the same drawing, the store answers from the item just taught
            page.locator('[data-testid="stRadio"]', has_text="Query image").get_by_text("Upload", exact=True).click()
            page.locator('[data-testid="stFileUploader"]', has_text="An image").locator('input[type="file"]') \
                .set_input_files(str(png))
            page.get_by_text(re.compile(r"^7 · sim 1\.000 · .* · added #")).first.wait_for(timeout=60_000)
            time.sleep(1.0)  # let the images paint
            shot = shots / "browser-knowledge.png"
            page.screenshot(path=str(shot), full_page=True)
            assert page.get_by_text("Traceback").count() == 0
        except Exception:
            page.screenshot(path=str(shots / "browser-knowledge-failed.png"), full_page=True)
            raise
        finally:
            browser.close()
    print(f"\nscreenshots: {shots / 'browser-knowledge-forget.png'}, {shot}")
    assert shot.stat().st_size > 10_000
