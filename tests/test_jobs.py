"""The app's job board with real threads: one job per request, stages, failures in one sentence."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("streamlit")  # cacheviz.ui is the app's package (the jobs module itself is pure Python)

from cacheviz.errors import CachevizError  # noqa: E402
from cacheviz.progress import Stage  # noqa: E402
from cacheviz.ui.jobs import JobBoard  # noqa: E402
from cacheviz.ui.messages import message  # noqa: E402


def _wait(job, timeout=5.0):
    end = time.time() + timeout
    while job.active and time.time() < end:
        time.sleep(0.02)
    return job


def test_one_job_however_many_sessions_ask():
    board = JobBoard()
    calls, gate = [], threading.Event()

    def work(job):
        calls.append(1)
        job.stage("grid search")
        job.step(1, 2, "half way")
        gate.wait(5)

    lock = threading.Lock()
    starters = []
    threads = [threading.Thread(target=lambda: starters.append(board.start(("evaluate", "same"), "t", work, lock)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(starters) == 8 and all(j is starters[0] for j in starters)
    time.sleep(0.2)
    snap = starters[0].snapshot()
    assert snap["state"] == "running" and snap["stage"] == "grid search" and snap["detail"] == "half way"
    assert (snap["done"], snap["total"]) == (1, 2) and board.running() == [starters[0]]
    gate.set()
    assert _wait(starters[0]).state == "done" and len(calls) == 1
    assert [name for name, _ in starters[0].snapshot()["finished"]] == ["grid search"]
    # once done, asking again starts a new job
    again = board.start(("evaluate", "same"), "t", lambda job: None, lock)
    assert again is not starters[0] and _wait(again).state == "done"


def test_jobs_sharing_a_lock_run_one_after_another():
    board, lock = JobBoard(), threading.Lock()
    order, gate = [], threading.Event()

    def first(job):
        order.append("first")
        gate.wait(5)

    def second(job):
        order.append("second")

    a = board.start(("a",), "a", first, lock)
    time.sleep(0.1)
    b = board.start(("b",), "b", second, lock)
    time.sleep(0.2)
    assert b.snapshot()["stage"] == Stage.WAITING and order == ["first"]
    gate.set()
    assert _wait(a).state == "done" and _wait(b).state == "done" and order == ["first", "second"]


def test_a_failing_job_reports_one_sentence_in_the_apps_words():
    board = JobBoard(render=message)

    def work(job):
        raise CachevizError("Could not download resnet20 weights (no network?)", "put it into /x/",
                            "pass {checkpoint}")

    job = _wait(board.start(("evaluate", "bad"), "t", work, threading.Lock()))
    assert job.state == "failed" and job.error == "Could not download resnet20 weights (no network?); put it into /x/."

    def crash(job):
        raise RuntimeError("boom\nwith a second line")

    job = _wait(board.start(("evaluate", "crash"), "t", crash, threading.Lock()))
    assert job.state == "failed" and "RuntimeError" in job.error and "\n" not in job.error


def test_finished_jobs_are_forgotten_beyond_the_limit():
    board = JobBoard(keep=3)
    done = [_wait(board.start((i,), str(i), lambda job: None, threading.Lock())) for i in range(6)]
    assert all(j.state == "done" for j in done)
    board.start(("last",), "last", lambda job: None, threading.Lock())
    assert board.get((0,)) is None and board.get((5,)) is not None


# ---------------------------------------------------------------------------------------------
# Worker processes: picklable module-level tasks, run by spawned workers


def _sleepy(seconds, job):
    job.stage("sleeping")
    time.sleep(seconds)


def _killed(job):
    import os
    import signal

    job.stage("about to die")
    os.kill(os.getpid(), signal.SIGKILL)


def _bad_layer(data_dir, job):
    from cacheviz.config import Setup
    from cacheviz.experiment import Evaluate

    Evaluate(Setup(layers=("layer9",))).run(data_dir, "cpu", job)


def test_worker_processes_serve_one_line_first_come_first_served(tmp_path):
    import functools

    board = JobBoard(render=message, workers=1)
    jobs = [board.start((f"j{i}",), f"j{i}", functools.partial(_sleepy, 1.0)) for i in range(3)]
    deadline = time.time() + 60
    while jobs[0].state != "running" and time.time() < deadline:
        time.sleep(0.05)
    assert [j.state for j in jobs] == ["running", "queued", "queued"]
    assert [j.snapshot()["ahead"] for j in jobs[1:]] == [1, 2]
    # asking again for a queued job follows it
    assert board.start(("j2",), "j2", functools.partial(_sleepy, 1.0)) is jobs[2]
    for j in jobs:
        assert _wait(j, 60).state == "done", j.error
    assert jobs[0].seconds < jobs[1].seconds < jobs[2].seconds
    assert [n for n, _ in jobs[1].snapshot()["finished"]] == ["sleeping"]


def test_a_worker_that_dies_fails_its_job_and_is_replaced(tmp_path, data_dir):
    import functools

    board = JobBoard(render=message, workers=1)
    dead = _wait(board.start(("dead",), "dead", _killed), 60)
    assert dead.state == "failed" and "stopped unexpectedly" in dead.error
    bad = _wait(board.start(("bad",), "bad", functools.partial(_bad_layer, str(data_dir))), 120)
    assert bad.state == "failed"
    assert bad.error.startswith("Key layers (layer9): digits-cnn has no layer 'layer9'")  # rendered for the app
    ok = _wait(board.start(("ok",), "ok", functools.partial(_sleepy, 0.1)), 60)
    assert ok.state == "done"


def test_workers_never_rerun_the_page_script_that_is_main(tmp_path, monkeypatch):
    """Inside Streamlit `__main__` is the last page script; multiprocessing would run it again in
    every worker it starts (drawing a page there, or killing the worker if it fails)."""
    import functools
    import sys
    import types

    marker = tmp_path / "ran"
    script = tmp_path / "page.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(3)\n")
    page = types.ModuleType("__main__")
    page.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", page)
    board = JobBoard(render=message, workers=1)
    job = _wait(board.start(("p",), "p", functools.partial(_sleepy, 0.1)), 60)
    assert job.state == "done", job.error
    assert not marker.exists()
    assert sys.modules["__main__"] is page


def test_a_job_counts_its_watchers_and_never_below_zero():
    board = JobBoard(render=message)
    job = board.start(("w",), "w", lambda job: time.sleep(0.05))
    job.watch(+1)
    job.watch(+1)
    assert job.watchers == 2
    for _ in range(3):
        job.watch(-1)
    assert job.watchers == 0
    assert _wait(job).state == "done"
