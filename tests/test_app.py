"""The Streamlit app through AppTest: every page, the offline build, uploads good and bad.

AppTest in Streamlit >= 1.56 drives st.file_uploader and st.camera_input, so uploads go through
the real widgets here. One data directory serves the whole module, so digits-cnn trains once.

Streamlit has a compatibility mode for a pages/ folder beside the entry script: a run asked for
a page runs that page file alone, without app.py (a real server leaves the mode at the first
st.navigation; AppTest re-enters it on every run). The pages detect that and run app.py
themselves (ui.ensure_entrypoint); `test_pages_reached_directly_still_get_the_sidebar` covers
it. The other tests start the app through a one-line entry script in a folder without pages/,
which runs app.py unchanged, i.e. the way a browser session normally goes.
"""
from __future__ import annotations

import io
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from cacheviz import ui  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAGES = REPO / "pages"
TIMEOUT = 180
APP = ""  # the entry script, written by the `entry` fixture


@pytest.fixture(scope="module", autouse=True)
def entry(app_entry):
    global APP
    APP = app_entry
    return APP


def _png(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _digit_on_paper() -> bytes:
    """A dark '1' on white paper, 120x90, as a phone photo of a handwritten digit would be."""
    a = np.full((120, 90, 3), 245, np.uint8)
    a[15:105, 40:52] = 20
    return _png(a)


def _no_problems(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def _until(at: AppTest, done, timeout: float = TIMEOUT) -> AppTest:
    """Run the app again until `done(at)`: builds go on in a background thread meanwhile."""
    end = time.time() + timeout
    while not done(at):
        assert not at.exception, [e.value for e in at.exception]
        assert time.time() < end, "the build did not finish in time"
        time.sleep(0.3)
        at.run()
    return at


def _built_app(env) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if not at.metric:
        at.button(key="home_build").click().run()
        _until(at, lambda a: a.metric)
    return at


def _gallery_shown(at: AppTest) -> bool:
    return "of the similarity mass" in _texts(at)


def _neighbours(env) -> AppTest:
    at = _built_app(env)
    at.switch_page(str(PAGES / "neighbours.py")).run()
    _until(at, _gallery_shown)
    _no_problems(at)
    return at


def test_home_page_builds_the_offline_preset(env):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    _no_problems(at)
    assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.OFFLINE
    assert len(at.latex) == 3  # the method's three equations
    assert at.button(key="home_build").label == "Build cache"
    t0 = time.perf_counter()
    at.button(key="home_build").click().run()  # the run follows the build to its end
    _no_problems(at)
    assert not at.button, "the button is gone: the results took its place"
    labels = {m.label: m.value for m in at.metric}
    for name in ("Network alone", "Cache model", "Cache only (λ = 1)", "θ (tuned)", "λ (tuned)",
                 "Fixed by the cache", "Broken by the cache"):
        assert name in labels, labels
    assert labels["Network alone"].endswith("%")
    grids = [e for e in at.get("html") if "cv-grid" in str(e.proto)]
    assert len(grids) == 1 and "★" in str(grids[0].proto.body), "the θ × λ grid, the chosen pair starred"
    print(f"offline preset built through the app in {time.perf_counter() - t0:.1f} s")
    # A second session gets the stored result at once, without a build.
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)
    again.run()
    assert {m.label for m in again.metric} >= {"Network alone", "Cache model"}


def test_neighbours_of_a_test_image_and_the_sliders(env):
    at = _neighbours(env)
    assert at.get("image"), "the query and gallery images are shown"
    assert "of the similarity mass" in _texts(at)
    summary = at.markdown[0].value
    assert "Network" in summary and "cache vote" in summary
    # theta and lam move the prediction from the stored similarities
    theta = next(s for s in at.slider if s.label.startswith("θ"))
    lam = next(s for s in at.slider if s.label.startswith("λ"))
    theta.set_value(1.0).run()
    lam.set_value(0.0).run()
    _no_problems(at)
    assert "θ = 1" in _texts(at)
    at.button(key="nb_reset").click().run()
    _no_problems(at)
    tuned = next(s for s in at.slider if s.label.startswith("θ")).value
    assert tuned > 1.0 and f"θ = {tuned:g}" in _texts(at)
    # the other ways of picking a test image
    for how in ("by class", "wrong for the network, right with the cache", "right for the network, wrong with the cache"):
        at.radio(key="nb_pick").set_value(how).run()
        _no_problems(at)


def test_an_uploaded_image_yields_a_gallery(env):
    at = _neighbours(env)
    at.radio(key="nb_source").set_value("Upload").run()
    at.file_uploader(key="nb_files").set_value(("digit.png", _digit_on_paper(), "image/png")).run()
    _no_problems(at)
    assert "of the similarity mass" in _texts(at)
    assert at.checkbox[0].value is True  # dark ink on paper: inverted for the digits model
    assert len(at.get("image")) >= 3  # the upload, as the model sees it, and the gallery


BAD_UPLOADS = {
    "zero.png": (b"", "empty"),
    "notes.png": (b"just some text, renamed\n" * 30, "not an image"),
    "cut.png": (_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:300], "truncated"),
}


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    w = h = 20000
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + w // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(
        b"IDAT", idat) + chunk(b"IEND", b"")


def test_each_bad_upload_gets_its_message_and_the_session_goes_on(env):
    at = _neighbours(env)
    at.radio(key="nb_source").set_value("Upload").run()
    cases = dict(BAD_UPLOADS)
    cases["bomb.png"] = (_bomb(), "pixels")
    for name, (data, words) in cases.items():
        at.file_uploader(key="nb_files").set_value((name, data, "image/png")).run()
        assert not at.exception, name
        warnings = [w.value for w in at.warning]
        assert any(ui.upload_name(name) in w and words in w for w in warnings), (name, warnings)
    # all of them at once, plus one good image: the good one still gets its gallery
    files = [(n, d, "image/png") for n, (d, _) in cases.items()] + [("good.png", _digit_on_paper(), "image/png")]
    at.file_uploader(key="nb_files").set_value(files).run()
    assert not at.exception
    assert len(at.warning) == len(cases)
    assert "of the similarity mass" in _texts(at)


def test_awkward_but_valid_uploads_work(env):
    at = _neighbours(env)
    at.radio(key="nb_source").set_value("Upload").run()
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[5:25, 12:18] = (0, 0, 0, 255)
    gif = io.BytesIO()
    Image.new("L", (16, 16), 0).save(gif, "GIF", save_all=True, append_images=[Image.new("L", (16, 16), 255)])
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 0, 0, 200)).save(cmyk, "JPEG")
    deep = io.BytesIO()
    Image.fromarray((np.eye(12) * 60000).astype(np.uint16)).save(deep, "PNG")
    files = [("rgba.png", _png(rgba, "PNG"), "image/png"), ("anim.gif", gif.getvalue(), "image/gif"),
             ("cmyk.jpg", cmyk.getvalue(), "image/jpeg"), ("deep.png", deep.getvalue(), "image/png")]
    at.file_uploader(key="nb_files").set_value(files).run()
    _no_problems(at)
    assert not at.warning
    choose = at.radio(key="nb_which")
    assert len(choose.options) == 4
    for i in range(4):
        choose.set_value(i).run()
        _no_problems(at)
        assert "of the similarity mass" in _texts(at)


def test_camera_photo(env):
    at = _neighbours(env)
    at.radio(key="nb_source").set_value("Camera").run()
    photo = io.BytesIO()
    Image.open(io.BytesIO(_digit_on_paper())).convert("RGB").save(photo, "JPEG")
    at.camera_input(key="nb_camera").set_value(("photo.jpg", photo.getvalue(), "image/jpeg")).run()
    _no_problems(at)
    assert "of the similarity mass" in _texts(at)


def test_compare_two_key_layers(env):
    at = _neighbours(env)
    at.toggle(key="nb_compare").set_value(True).run()
    _until(at, lambda a: sum("keys · cache vote" in m.value for m in a.markdown) == 2)
    _no_problems(at)
    a = at.selectbox(key="nb_la_digits-cnn")
    b = at.selectbox(key="nb_lb_digits-cnn")
    assert a.value != b.value
    assert sum("keys · cache vote" in m.value for m in at.markdown) == 2
    b.set_value("input").run()
    _until(at, lambda a: any(m.value.startswith("**input**") for m in a.markdown))
    _no_problems(at)
    assert any(m.value.startswith("**input**") for m in at.markdown)


def test_missing_weights_say_so_and_offer_the_offline_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEVIZ_DATA_DIR", str(tmp_path))

    def offline(*_a, **_k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.sidebar.selectbox(key=ui.K_PRESET).set_value(ui.CIFAR).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and all("Traceback" not in e for e in errors)
    # where the file goes, said relative to the data directory: a browser never sees the server's paths
    assert any("resnet20-12fca82f.th" in e and "the data directory's checkpoints/" in e for e in errors), errors
    assert not any(str(tmp_path) in e for e in errors)
    assert not any("--checkpoint" in e for e in errors)
    offline_buttons = [b for b in at.button if "offline" in b.label.lower() or ui.OFFLINE in b.label]
    assert offline_buttons
    offline_buttons[0].click().run()
    assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.OFFLINE
    assert not at.error and not at.exception


def test_missing_dataset_is_announced_before_building(tmp_path, monkeypatch):
    """Weights present, CIFAR-10 absent: the page says where to put it before any download."""
    import torch

    from cacheviz.models import RESNET_FILES, build_cifar_resnet

    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": build_cifar_resnet(20).state_dict()}, tmp_path / "checkpoints" / RESNET_FILES[20])
    monkeypatch.setenv("CACHEVIZ_DATA_DIR", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.sidebar.selectbox(key=ui.K_PRESET).set_value(ui.CIFAR).run()
    _no_problems(at)
    notes = [i.value for i in at.info]
    assert any("the data directory's cifar10/" in n for n in notes), notes  # never the server's absolute path
    assert not any(str(tmp_path) in n for n in notes), notes

    # Building without a network: one sentence saying where to put the data, and the way out.
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *a, **k):
            time.sleep(0.5)  # fail while the page follows the build, as a real timeout would
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    at.button(key="home_build").click().run()
    _until(at, lambda a: a.error, timeout=30)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "CIFAR-10" in errors[0] and "the data directory's cifar10/" in errors[0], errors
    assert "--dataset" not in errors[0] and "switch Dataset to digits, which works offline" in errors[0]
    at.button(key="home_failed").click().run()
    assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.OFFLINE
    _no_problems(at)
    # the failed build is remembered: back on CIFAR-10 the page says what went wrong
    at.sidebar.selectbox(key=ui.K_PRESET).set_value(ui.CIFAR).run()
    assert any("Could not download CIFAR-10" in e.value for e in at.error)


def test_pages_reached_directly_still_get_the_sidebar(env):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.run()
    for _ in range(2):  # AppTest runs the page file alone from the second run on
        at.run()
        _no_problems(at)
        assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.OFFLINE
        assert at.title[0].value.startswith("Cache models")
    at.switch_page("pages/neighbours.py").run()
    _no_problems(at)
    assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.OFFLINE
    assert at.title[0].value.startswith("Neighbours")


def test_progress_shows_stages_place_in_line_and_eta():
    """What a watching session sees of a job (drawn from its snapshot)."""

    def page():
        import streamlit as st

        from cacheviz.ui.panels import _bar, _stage_lines

        stages = ("load data", "extract train features", "grid search")
        base = dict(detail="", done=0, total=1, elapsed=3.0, stage_elapsed=1.0, finished=[], error=None,
                    seconds=None, title="t")
        queued = {**base, "state": "queued", "stage": "", "ahead": 2}
        running = {**base, "state": "running", "stage": "extract train features", "ahead": 0,
                   "detail": "extracting features", "done": 256, "total": 1348, "stage_elapsed": 5.0,
                   "finished": [("load data", 2.5)]}
        st.markdown(_stage_lines(queued, stages))
        st.markdown(_stage_lines(running, stages))
        # a tick with nothing new in the stage list words it the same, so follow() does not resend it
        assert _stage_lines({**running, "elapsed": 9.0, "stage_elapsed": 7.0, "done": 300}, stages) == \
            _stage_lines(running, stages)
        st.progress(*_bar(running))

    at = AppTest.from_function(page)
    at.run()
    assert not at.exception
    text = "\n".join(m.value for m in at.markdown)
    assert "**In line** — 2 jobs ahead of this one" in text
    assert "load data — 2 s" in text and "**extract train features**" in text
    (bar,) = at.get("progress")
    assert "256/1348" in bar.proto.text and "ETA" in bar.proto.text and "elapsed 3 s" in bar.proto.text


def test_the_paper_protocol_is_one_choice_in_the_sidebar(env):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.sidebar.selectbox(key=ui.K_PRESET).select(ui.PAPER).run()
    assert at.sidebar.selectbox(key=ui.K_PROTOCOL).value == "paper"
    assert at.sidebar.checkbox(key=ui.K_FLIP).value is True and at.sidebar.checkbox(key=ui.K_FLIP).disabled
    # the same protocol on the offline digits: a tenth of the training set held out, with flips
    at.sidebar.selectbox(key=ui.K_PRESET).select(ui.OFFLINE).run()
    assert at.sidebar.selectbox(key=ui.K_PROTOCOL).value == "default"
    at.sidebar.selectbox(key=ui.K_PROTOCOL).select("paper").run()
    assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.CUSTOM
    at.button(key="home_build").click().run()
    _no_problems(at)
    caption = " ".join(c.value for c in at.caption)
    assert "tuned on 268 validation items from the train set" in caption, caption  # 134 held out + flips
    assert "cache of 2,696 items" in caption  # 1,348 and their flips
