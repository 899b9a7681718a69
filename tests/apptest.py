"""What the AppTest page tests share: no exceptions or error boxes, re-running until a job is done,
opening one page of the real app."""
from __future__ import annotations

import io
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

PAGES = Path(__file__).resolve().parents[1] / "pages"
TIMEOUT = 300


def no_problems(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def until(at: AppTest, done, timeout: float = TIMEOUT, errors_ok: bool = False) -> AppTest:
    """Run the app again until `done(at)`: jobs go on in the background meanwhile."""
    end = time.time() + timeout
    while not done(at):
        assert not at.exception, [e.value for e in at.exception]
        assert errors_ok or not at.error, [e.value for e in at.error]
        assert time.time() < end, "the job did not finish in time"
        time.sleep(0.2)
        at.run()
    return at


def open_page(entry: str, page: str) -> AppTest:
    """The app from `entry`, switched to pages/`page`, with nothing wrong on it."""
    at = AppTest.from_file(entry, default_timeout=TIMEOUT)
    at.run()
    at.switch_page(str(PAGES / page)).run()
    no_problems(at)
    return at


def one_png() -> bytes:
    """A light '1' on black, as the digits data set draws them: an upload the pages accept."""
    import numpy as np
    from PIL import Image

    a = np.zeros((32, 32, 3), np.uint8)
    a[4:28, 14:19] = 230
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()
