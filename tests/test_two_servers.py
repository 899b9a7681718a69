"""Two app servers on one data directory: a lecture hall behind a load balancer, or a restart mid-class.

The fast tests (default suite) hold the cross-process build lock (`cacheviz/locks.py`) in real
processes: one computes, the other waits and reads; a killed holder frees it; two CLI runs of
the same study build it once. The `-m load` test starts two real `streamlit run app.py` servers
on one data directory and drives them in headless Chromium: the same build asked of both at
once runs once and both show the same numbers; the knowledge store is created once; an edit
made through server 1 is what server 2 shows after a rerun; and every number the pages show
for the store is what `python -m cacheviz store list` prints.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from browsers import CHROMIUM, browser_harness, load_harness  # noqa: E402

from cacheviz.locks import WAITING_OTHER, build_lock, lock_path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# A build in miniature, as `Study.run` does it: under the lock, read the stored result if there
# is one, else compute it (counted in a file of its own) and store it atomically.
_BUILD = r"""
import json, os, sys, time
from pathlib import Path
from cacheviz.locks import build_lock

d, hold = Path(sys.argv[1]), float(sys.argv[2])

class Said:
    def stage(self, name): print("stage:", name, flush=True)
    def step(self, done, total, detail=""): pass

print("start", flush=True)
with build_lock(d, ("study", "demo"), Said()) as waited:
    res = d / "result.json"
    if res.exists():
        print("read", res.read_text(), "waited" if waited else "", flush=True)
    else:
        with open(d / "computed", "a") as f:
            f.write(f"{os.getpid()}\n")
        print("computing", flush=True)
        time.sleep(hold)
        tmp = d / f".result.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"answer": 42, "by": os.getpid()}))
        os.replace(tmp, res)
        print("stored", flush=True)
"""


def _build(d: Path, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BUILD, str(d), str(hold)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_line(proc: subprocess.Popen, text: str, timeout: float = 30) -> list[str]:
    """Lines of `proc` up to the first containing `text` (a reader thread, so a hang fails in time)."""
    lines, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"never printed {text!r}: {''.join(lines)}"
    return lines


def test_two_processes_build_once_the_second_waits_and_reads(tmp_path):
    a = _build(tmp_path, 2.0)
    _wait_line(a, "computing")  # a holds the lock now; b must wait for it, not compute
    b = _build(tmp_path, 2.0)
    out_a, _ = a.communicate(timeout=30)
    out_b, _ = b.communicate(timeout=30)
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b
    assert len((tmp_path / "computed").read_text().split()) == 1
    assert f"stage: {WAITING_OTHER}" in out_b and "computing" not in out_b
    stored = json.loads((tmp_path / "result.json").read_text())
    assert re.search(r"read (\{.*\}) waited", out_b).group(1) == json.dumps(stored)
    assert stored["by"] == a.pid
    assert lock_path(tmp_path, ("study", "demo")).exists()


def test_a_killed_holder_frees_the_lock_and_the_waiter_builds(tmp_path):
    a = _build(tmp_path, 60.0)
    _wait_line(a, "computing")
    b = _build(tmp_path, 0.2)
    _wait_line(b, WAITING_OTHER)
    t0 = time.time()
    a.send_signal(signal.SIGKILL)  # no finally runs in a: only the kernel can release its lock
    a.wait(10)
    out_b, _ = b.communicate(timeout=30)
    assert b.returncode == 0 and "computing" in out_b and "stored" in out_b, out_b
    assert time.time() - t0 < 10
    # a's count stands (it started computing) and b's follows: the result is b's, whole
    assert (tmp_path / "computed").read_text().split() == [str(a.pid), str(b.pid)]
    assert json.loads((tmp_path / "result.json").read_text())["by"] == b.pid


def test_threads_of_one_process_exclude_each_other_and_a_nested_take_passes(tmp_path):
    inside, overlap, said = [], [], []

    class Said:
        def stage(self, name):
            said.append(name)

        def step(self, *a):
            pass

    def work():
        with build_lock(tmp_path, "x", Said()):
            inside.append(1)
            overlap.append(len(inside))
            with build_lock(tmp_path, "x") as waited:  # a study inside a study: no self-deadlock
                assert waited is False
            time.sleep(0.3)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert overlap == [1, 1, 1] and said.count(WAITING_OTHER) >= 1


def test_a_data_directory_without_room_for_locks_is_one_sentence(tmp_path):
    from cacheviz.errors import CachevizError

    (tmp_path / "locks").write_text("a file where the lock folder goes")  # fails for root too, unlike chmod
    with pytest.raises(CachevizError, match="lock file .* cannot be written"):
        with build_lock(tmp_path, "x"):
            pass


def _evaluate(data: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cacheviz", "evaluate", "--data-dir", str(data), "--device", "cpu",
                             "--json", str(out)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_cli_runs_of_one_study_build_it_once(tmp_path):
    """`Study.run` itself takes the lock: the real engine, a fresh data directory, two processes."""
    data = tmp_path / "data"
    a = _evaluate(data, tmp_path / "a.json")
    _wait_line(a, "training digits-cnn", timeout=120)  # a holds the study's lock while it trains
    b = _evaluate(data, tmp_path / "b.json")
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b
    assert "grid search" in out_a and "grid search" not in out_b and "training" not in out_b, out_b
    assert WAITING_OTHER in out_b
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    assert len(list((data / "results").glob("evaluate-*.json"))) == 1
    assert not list(data.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Two real servers, two browsers (-m load)




@pytest.fixture
def two_servers(tmp_path):
    load = browser_harness()
    data = tmp_path / "data"
    ports, logs, procs, errors = [load.free_port(), load.free_port()], [tmp_path / "s1.log", tmp_path / "s2.log"], \
        [None, None], []

    def start(i):  # both at once, as a hall's servers come up
        try:
            procs[i] = load.start_server(data, ports[i], logs[i], workers=1)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        yield [f"http://127.0.0.1:{p}/" for p in ports], data, logs, tmp_path
    finally:
        for p in procs:
            if p is not None:
                load.stop_server(p)
        for log in logs:
            text = log.read_text() if log.exists() else ""
            assert "Traceback" not in text, text[-3000:]


class _Inodes(threading.Thread):
    """Every (file, inode) a folder's result files had: an atomic write is a new inode, so a
    result written twice shows two, however fast the second write was after the first."""

    def __init__(self, folder: Path, pattern: str):
        super().__init__(daemon=True)
        self.folder, self.pattern, self.seen, self.stop = folder, pattern, set(), threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            for f in self.folder.glob(self.pattern):
                try:
                    self.seen.add((f.name, f.stat().st_ino))
                except FileNotFoundError:
                    pass


def _stages(logs: list[Path], title: str, stage: str) -> list[int]:
    """How many times each server's job board logged `title` entering `stage`."""
    pat = re.compile(rf"cacheviz-job-stage \S+ {re.escape(title)}: {re.escape(stage)}$", re.MULTILINE)
    return [len(pat.findall(log.read_text())) for log in logs]


def _metrics(page) -> dict[str, str]:
    out = {}
    for text in page.locator('[data-testid="stMetric"]').all_inner_texts():
        label, _, value = text.partition("\n")
        out[label.strip()] = value.strip()
    return out


def _tables(page) -> dict[str, list[list[str]]]:
    """Every dataframe on the page, as its own "Download as CSV" gives it (what the grid shows;
    the grid itself is a canvas), by its header row."""
    out = {}
    frames = page.locator('[data-testid="stDataFrame"]')
    for i in range(frames.count()):
        frame = frames.nth(i)
        frame.scroll_into_view_if_needed()
        frame.hover()
        with page.expect_download(timeout=20_000) as dl:
            frame.get_by_role("button", name="Download as CSV").click()
        rows = list(csv.reader(io.StringIO(Path(dl.value.path()).read_text(encoding="utf-8-sig"))))
        out[",".join(rows[0])] = rows
    return out


def _by_header(tables: dict, first: str) -> list[dict]:
    for header, rows in tables.items():
        if header.startswith(first):
            return [dict(zip(rows[0], r)) for r in rows[1:]]
    raise AssertionError(f"no table starting {first!r}: {list(tables)}")


def _cli_rows(data: Path, *extra: str) -> list[dict]:
    """`python -m cacheviz store list` for the offline preset's setup, its printed table parsed."""
    cmd = [sys.executable, "-m", "cacheviz", "store", "list", "--dataset", "digits", "--model", "digits-cnn",
           "--layers", "pool,relu3", "--data-dir", str(data), *extra]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    cols = lines[0].split()
    return [dict(zip(cols, re.split(r"\s{2,}", ln.strip(), maxsplit=len(cols) - 1))) for ln in lines[1:]]


def _store_numbers(page) -> dict:
    """What the Knowledge store page says about the store: metrics and tables."""
    tables = _tables(page)
    return {"metrics": _metrics(page), "counts": _by_header(tables, "0,1,2")[0],
            "history": _by_header(tables, "version,"), "per_class": _by_header(tables, "class,items before")}


@pytest.mark.load
def test_two_servers_one_data_directory(two_servers):
    from playwright.sync_api import sync_playwright

    urls, data, logs, _ = two_servers
    t0 = time.perf_counter()
    wait = 240_000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=load_harness().CHROMIUM_ARGS, headless=True)
        try:
            pages = []
            for url in urls:
                ctx = browser.new_context(viewport={"width": 1400, "height": 2400}, accept_downloads=True)
                # Chromium's save dialog (showSaveFilePicker) cannot be answered headless; without it
                # Streamlit downloads the CSV as a plain file
                ctx.add_init_script("delete window.showSaveFilePicker;")
                pages.append(ctx.new_page())
                pages[-1].goto(url)
            s1, s2 = pages

            # (a) both servers asked for the same build at once: it runs once
            for pg in pages:
                pg.get_by_role("button", name="Build cache").wait_for(timeout=wait)
            results = _Inodes(data / "results", "evaluate-*.json")
            results.start()
            clicks = []
            for pg in pages:
                pg.get_by_role("button", name="Build cache").click()
                clicks.append(time.perf_counter())
            for pg in pages:
                pg.get_by_text("Network alone").wait_for(timeout=wait)
            built = time.perf_counter() - t0
            results.stop.set()
            results.join(5)
            title = "digits/digits-cnn/pool,relu3"
            assert clicks[1] - clicks[0] < 2.0  # the second asked while the first one's build ran
            assert sorted(_stages(logs, title, "grid search")) == [0, 1], "the build ran twice (or never)"
            assert sorted(_stages(logs, title, WAITING_OTHER)) == [0, 1]
            assert len(results.seen) == 1, f"the result was written more than once: {results.seen}"
            assert _metrics(s1) == _metrics(s2) and "Network alone" in _metrics(s1)

            # the knowledge store, created from both servers at once: created once
            for pg in pages:
                pg.get_by_role("link", name="Knowledge store").first.click()
                pg.get_by_role("button", name="Create the knowledge store").wait_for(timeout=wait)
            for pg in pages:
                pg.get_by_role("button", name="Create the knowledge store").click()
            for pg in pages:
                pg.get_by_text("Edit the store").wait_for(timeout=wait)
            created = time.perf_counter() - t0
            assert sorted(_stages(logs, "knowledge store", "store")) == [0, 1], "the store was created twice"
            assert sorted(_stages(logs, "knowledge store", WAITING_OTHER)) == [0, 1]
            assert [r["version"] for r in _cli_rows(data)] == ["1"]

            # (b) an edit through server 1 is what server 2 shows after a rerun
            s1.get_by_role("button", name="Remove class").click()
            s1.get_by_text("Version 2: remove").wait_for(timeout=wait)
            s1.get_by_text("Test images whose cache-only model answer changed").wait_for(timeout=wait)
            s2.get_by_role("button", name="Another image").click()  # a rerun of the same session
            s2.get_by_text("Test images whose cache-only model answer changed").wait_for(timeout=wait)
            one, two = _store_numbers(s1), _store_numbers(s2)
            assert one == two
            assert one["metrics"]["Version"] == "2"

            # (c) every number the pages report for the store is what the CLI prints
            versions = _cli_rows(data)
            cols = ("version", "op", "items", "parent", "detail")
            # no parent: the CLI prints None, the CSV of the page's table leaves the cell empty
            assert [{k: "" if r[k] == "None" else r[k] for k in cols} for r in versions] == \
                   [{k: r[k] for k in cols} for r in sorted(one["history"], key=lambda r: int(r["version"]))]
            head = versions[-1]
            assert one["metrics"]["Version"] == head["version"]
            assert one["metrics"]["Items"].replace(",", "") == head["items"]
            per_version = {}
            for v in ("1", "2"):
                items = _cli_rows(data, "--items", "--version", v)
                per_version[v] = {c: sum(r["class"] == c for r in items) for c in one["counts"]}
            assert {c: int(n) for c, n in one["counts"].items()} == per_version["2"]
            for row in one["per_class"]:
                if row["class"] == "all":
                    assert (int(row["items before"]), int(row["items after"])) == \
                           (int(versions[0]["items"]), int(head["items"]))
                else:
                    assert (int(row["items before"]), int(row["items after"])) == \
                           (per_version["1"][row["class"]], per_version["2"][row["class"]])
            gone = [r["class"] for r in one["per_class"] if r["items after"] == "0"]
            assert len(gone) == 1 and f"class {gone[0]} (" in head["detail"]
        finally:
            browser.close()
    total = time.perf_counter() - t0
    print(f"\ntwo servers: both builds done {built:.1f} s, store created {created:.1f} s, all checks {total:.1f} s")
    assert not list(data.rglob("*.tmp")), "a temp file of a write was left behind"
