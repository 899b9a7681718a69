"""Compute outside the server: worker processes fed from one first-come-first-served line.

Pure Python (no Streamlit: the app's job board uses it, and a worker imports only the engine).
The server process only serves pages; a build, a sweep or a key extraction runs in a worker, so
its Python loops never hold the server's GIL, and a worker that dies (killed, out of memory)
fails its job with one sentence and is replaced, while the server goes on. Workers are forked
from a fork server that imported the engine once, so a new or replacement worker starts at
once rather than after seconds of imports. Progress comes back over a queue as
`(job id, kind, payload)`.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
import types
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable

from .errors import CachevizError

log = logging.getLogger("cacheviz.app")

# Progress steps from a worker are sent at most this often per job (stages always are).
STEP_INTERVAL_S = 0.2
DIED = ("The computation stopped unexpectedly (the machine may have run out of memory); "
        "try again, with a smaller cache or a narrower key layer if it happens again.")


class _QueueReporter:
    """A `progress.Reporter` inside the worker: events to the server, steps throttled."""

    def __init__(self, job_id: int, events):
        self.job_id, self.events, self.last = job_id, events, 0.0

    def stage(self, name: str) -> None:
        self.events.put((self.job_id, "stage", name))
        self.last = 0.0

    def step(self, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if now - self.last >= STEP_INTERVAL_S or done >= total:
            self.last = now
            self.events.put((self.job_id, "step", (int(done), int(total), str(detail))))


def _worker_main(tasks, events, parent: int) -> None:
    """The worker's loop: run tasks one by one until told to stop or the server is gone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the server's terminal is the server's
    events.put((None, "ready", os.getpid()))
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if not _alive(parent):  # the server died: nobody will read our results
                return
            continue
        if item is None:
            return
        job_id, task = item
        events.put((job_id, "started", os.getpid()))
        try:
            task(_QueueReporter(job_id, events))
            events.put((job_id, "done", None))
        except CachevizError as exc:
            events.put((job_id, "error", exc))
        except MemoryError:
            events.put((job_id, "memory", None))
        except Exception as exc:
            from .kdb import redact

            sys.stderr.write(redact(traceback.format_exc()))  # the server log: no credential in it
            events.put((job_id, "crash", type(exc).__name__))


def _alive(pid: int) -> bool:
    # not os.getppid(): a worker's parent is the fork server, not the app's server
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Slot:
    """One worker process and the job it is running."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.proc = None
        self.tasks = None
        self.job = None

    def ensure(self, events) -> None:
        if self.proc is None or not self.proc.is_alive():
            self.tasks = self.ctx.Queue()
            self.proc = self.ctx.Process(target=_worker_main, args=(self.tasks, events, os.getpid()),
                                         name="cacheviz-worker", daemon=True)
            with _plain_main():
                self.proc.start()


_MAIN_LOCK = threading.Lock()


@contextmanager
def _plain_main():
    """Start processes as if `__main__` had no file.

    multiprocessing re-runs the parent's `__main__` in every fork server and worker it starts;
    inside Streamlit `__main__` is the page script that ran last (in tests, an AppTest script),
    which must not run again in a worker: it would draw a page there, or fail and kill the
    worker. The workers need only `cacheviz`, which they import by name."""
    with _MAIN_LOCK:
        real = sys.modules.get("__main__")
        stub = types.ModuleType("__main__")
        sys.modules["__main__"] = stub
        try:
            yield
        finally:
            if sys.modules.get("__main__") is stub:  # a script run may have set its own meanwhile
                sys.modules["__main__"] = real


class ProcessRunner:
    """Jobs wait in one line (first come, first served) for `workers` worker processes.

    `job` objects need: `id`, `queued(ahead)`, `started()`, `stage(name)`, `step(...)`,
    `finish(error)` and `finished` (a threading.Event).
    """

    def __init__(self, workers: int, render: Callable[[CachevizError], str], memory_message: str):
        self.ctx = _context()
        self.events = self.ctx.Queue()
        self.render, self.memory_message = render, memory_message
        self.line: deque = deque()
        self.cv = threading.Condition()
        self.jobs: dict[int, Any] = {}
        self.slots = [_Slot(self.ctx) for _ in range(workers)]
        threading.Thread(target=self._listen, name="cacheviz-events", daemon=True).start()
        for slot in self.slots:
            threading.Thread(target=self._serve, args=(slot,), name="cacheviz-dispatch", daemon=True).start()
            slot.ensure(self.events)  # started now, so the first job does not wait for imports

    def submit(self, job, task: Callable) -> None:
        with self.cv:
            self.jobs[job.id] = job
            self.line.append((job, task))
            self._renumber()
            self.cv.notify()

    def waiting(self) -> int:
        with self.cv:
            return len(self.line)

    def _renumber(self) -> None:
        busy = sum(s.job is not None for s in self.slots)
        for ahead, (job, _) in enumerate(self.line):
            job.queued(ahead + busy)

    def _serve(self, slot: _Slot) -> None:
        while True:
            with self.cv:
                while not self.line:
                    self.cv.wait()
                job, task = self.line.popleft()
                slot.job = job
                self._renumber()
            slot.ensure(self.events)
            job.started()
            try:
                slot.tasks.put((job.id, task))
            except Exception as exc:  # the task cannot be sent (not picklable): a bug, said plainly
                log.error("job %s could not be sent to the worker: %s", job.title, exc)
                job.finish(f"The work could not start ({type(exc).__name__}); see the server log.")
            while not job.finished.wait(0.5):
                if not slot.proc.is_alive():
                    log.error("worker %s stopped (exit code %s) during %s", slot.proc.pid, slot.proc.exitcode,
                              job.title)
                    job.finish(DIED)
                    slot.proc = None
                    self.jobs.pop(job.id, None)
            with self.cv:
                slot.job = None
                self._renumber()

    def _listen(self) -> None:
        while True:
            try:
                job_id, kind, payload = self.events.get()
            except (EOFError, OSError):  # the queue is gone: the server is shutting down
                return
            job = self.jobs.get(job_id)
            if job is None:
                continue
            if kind == "stage":
                job.stage(payload)
            elif kind == "step":
                job.step(*payload)
            elif kind == "done":
                job.finish()
            elif kind == "error":
                job.finish(self.render(payload))
            elif kind == "memory":
                job.finish(self.memory_message)
            elif kind == "crash":
                job.finish(f"The work failed unexpectedly ({payload}); see the server log and try again.")
            if job.finished.is_set():
                self.jobs.pop(job_id, None)


# What a fork server imports once for all its workers (the engine, torch with it).
PRELOAD = ["cacheviz.workers", "cacheviz.experiment", "cacheviz.sweeps", "cacheviz.retrieval"]


def _context():
    """A fork server where there is one (Linux, macOS): workers fork from a clean process that has
    imported the engine and run nothing; elsewhere spawn, which imports it per worker."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


_IDS = itertools.count(1)


def next_id() -> int:
    return next(_IDS)
