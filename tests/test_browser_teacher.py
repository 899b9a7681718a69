"""The teacher role in real browsers: one server (`streamlit run app.py` with
CACHEVIZ_TEACHER_PASSWORD set), headless Chromium through Playwright, three browser contexts
(two students and the teacher, each a profile and a session of its own).

Student A removes a class: student B and the teacher still have it, every item. The teacher
publishes A's copy: the teacher, and B after a reload, have it removed. Then B teaches an image
whose file name is a Markdown link: it shows as text, never as a link. Needs Debian's chromium at
/usr/bin/chromium and the Python `playwright` package; no browser is downloaded.

    python -m pytest -m browser tests/test_browser_teacher.py -s
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from browsers import CHROMIUM, browser_harness, load_harness  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
EVIL = "[x](https:evil.example).png"

pytestmark = pytest.mark.browser




@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEVIZ_TEACHER_PASSWORD", PASSWORD)  # the server's environment is this one's
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
        assert PASSWORD not in text


def _items(page) -> int:
    value = page.locator('[data-testid="stMetric"]', has_text="Items").locator('[data-testid="stMetricValue"]')
    return int(value.inner_text().replace(",", ""))


def _wait_items(page, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if _items(page) == n:
                return
        except Exception:  # the metric is being redrawn
            pass
        time.sleep(0.3)
    assert _items(page) == n


def _pick(page, label: str, option: str) -> None:
    box = page.locator('[data-testid="stSelectbox"]', has_text=label).first
    for _ in range(5):  # a rerun that redraws the box closes its list: open it again
        box.click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
            return
        except Exception:
            time.sleep(0.5)
    raise AssertionError(f"could not pick {option} in {label}")


def _branch(page) -> str:
    """The student's own copy, as the page names it to them."""
    text = page.locator('[data-testid="stMain"]').inner_text()
    return re.search(r"your own copy of the store \((s-[0-9a-f]+)\)", text).group(1)


def _knowledge(page) -> None:
    page.get_by_role("link", name="Knowledge store").first.click()


def test_students_edit_their_own_copy_until_the_teacher_publishes(server):
    from playwright.sync_api import sync_playwright

    url, tmp = server
    png = load_harness().digit_png(tmp / "seven.png")
    evil = tmp / EVIL
    evil.write_bytes(png.read_bytes())
    shots = Path(os.environ.get("CACHEVIZ_SHOTS_DIR") or tmp)
    shots.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=load_harness().CHROMIUM_ARGS, headless=True)
        pages = {}
        try:
            for who in ("teacher", "a", "b"):  # a browser profile each, as each person's is
                ctx = browser.new_context(viewport={"width": 1400, "height": 2600})
                pages[who] = ctx.new_page()
            teacher, a, b = pages["teacher"], pages["a"], pages["b"]

            # the teacher signs in and creates the store
            teacher.goto(url)
            teacher.get_by_text("Teacher sign-in").click(timeout=60_000)
            teacher.get_by_label("Teacher password").fill(PASSWORD)
            teacher.get_by_role("button", name="Sign in").click()
            teacher.get_by_text("Signed in as the teacher").first.wait_for(timeout=30_000)
            _knowledge(teacher)
            teacher.get_by_role("button", name="Create the knowledge store").click(timeout=60_000)
            teacher.get_by_text("How it answers").wait_for(timeout=240_000)
            total = _items(teacher)

            # the students: neither may create anything; each is on a copy of their own
            for page in (a, b):
                page.goto(url)
                _knowledge(page)
                page.get_by_text("your own copy").wait_for(timeout=60_000)
                assert page.get_by_role("button", name="Create the knowledge store").count() == 0
            branch_a, branch_b = (_branch(page) for page in (a, b))
            assert branch_a != branch_b

            # A removes class 3 from A's copy
            _pick(a, "Class", "3")
            a.get_by_role("button", name="Remove class").click()
            note = a.get_by_text(re.compile(r"Version \d+: remove class 3 \((\d+) items\)")).first
            note.wait_for(timeout=60_000)
            n3 = int(re.search(r"\((\d+) items\)", note.inner_text()).group(1))
            assert n3 > 0 and _items(a) == total - n3
            a.screenshot(path=str(shots / "browser-teacher-student-a.png"), full_page=True)

            # B (its page run again) and the teacher (a rerun, which lists A's copy) still have
            # class 3, every item of it
            b.reload()
            b.get_by_text("How it answers").wait_for(timeout=60_000)
            _wait_items(b, total, timeout=5)
            _pick(b, "Class", "3")  # still offered: B's store has class 3
            teacher.get_by_role("button", name="Another image").click()
            copy_a = teacher.locator('[data-testid="stExpander"]', has_text=branch_a)
            copy_a.wait_for(timeout=60_000)
            _wait_items(teacher, total, timeout=5)
            assert "remove class 3" in copy_a.inner_text()

            # the teacher publishes A's copy
            copy_a.get_by_text(branch_a).first.click()
            copy_a.get_by_role("button", name="Publish to the class store").click()
            teacher.get_by_text(re.compile(rf"Version \d+: publish {branch_a}: remove class 3")).wait_for(timeout=60_000)
            _wait_items(teacher, total - n3)
            teacher.screenshot(path=str(shots / "browser-teacher-published.png"), full_page=True)

            # B, after a reload, has it removed too
            b.reload()
            b.get_by_text("How it answers").wait_for(timeout=60_000)
            _wait_items(b, total - n3)

            # B teaches an image whose file name is a Markdown link: text everywhere, never a link
            b.locator('[data-testid="stFileUploader"]', has_text="Images").locator('input[type="file"]') \
                .set_input_files(str(evil))
            add = b.get_by_role("button", name="Add to the store")
            deadline = time.time() + 60
            while time.time() < deadline and not add.is_enabled():  # enabled once the upload decoded
                time.sleep(0.3)
            add.click()
            b.get_by_text(re.compile(r"Version \d+: add 1 image labelled")).wait_for(timeout=60_000)
            assert b.get_by_text(EVIL).count() >= 1  # the name, as typed
            assert b.locator("a[href*='evil']").count() == 0
            _wait_items(b, total - n3 + 1)
            _wait_items(teacher, total - n3, timeout=5)  # B's copy is B's
            b.screenshot(path=str(shots / "browser-teacher-student-b.png"), full_page=True)
            for page in pages.values():
                assert page.get_by_text("Traceback").count() == 0
                assert page.locator("a[href*='evil']").count() == 0
        except Exception:
            for who, page in pages.items():
                page.screenshot(path=str(shots / f"browser-teacher-failed-{who}.png"), full_page=True)
            raise
        finally:
            browser.close()
    print(f"\nteacher, two students, publish: {time.perf_counter() - t0:.1f} s; screenshots in {shots}")
