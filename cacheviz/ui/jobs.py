"""The job board: long work off the server's threads, one job per request, watched by any session.

Pure Python (no Streamlit), so it is unit-tested on its own with real threads and processes. A
`Job` is the study's progress reporter (`stage`, `step`); the app draws its snapshots. A second
session asking for the same work follows the job already queued or running instead of starting
another; a page switch does not stop it; finished jobs stay listed (the newest `keep`) so late
visitors see how they ended. With `workers` >= 1 jobs wait in one first-come-first-served line
for that many worker processes (`cacheviz/workers.py`) and each sees its place in the line; with 0 each
runs in a thread of this process (tests). Across processes (two servers on one data directory)
`shared(key)` names a job's lock file, held by whoever runs the task (`cacheviz/locks.py`); studies
take theirs in `Study.run` itself, so the CLI shares them too.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CachevizError
from ..locks import run_locked
from ..progress import Stage
from ..workers import ProcessRunner, next_id

log = logging.getLogger("cacheviz.app")

OUT_OF_MEMORY = "The machine ran out of memory; lower the cache size or pick a narrower key layer."


@dataclass
class Job:
    """One piece of work reporting per-stage progress (a `progress.Reporter`)."""

    key: tuple
    title: str
    state: str = "queued"  # queued | running | done | failed
    stage_name: str = ""
    detail: str = ""
    done: int = 0
    total: int = 1
    ahead: int = 0  # while queued: jobs before it in the line (running ones included)
    watchers: int = 0  # sessions drawing its progress now
    t0: float = field(default_factory=time.time)
    stage_t0: float = field(default_factory=time.time)
    finished_stages: list = field(default_factory=list)  # [(stage, seconds)]
    error: str | None = None
    seconds: float | None = None
    id: int = field(default_factory=next_id)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def watch(self, delta: int) -> None:
        with self._lock:
            self.watchers = max(0, self.watchers + delta)

    def queued(self, ahead: int) -> None:
        with self._lock:
            if self.state == "queued":
                self.ahead = int(ahead)

    def started(self) -> None:
        now = time.time()
        with self._lock:
            if self.state == "queued":
                self.state, self.ahead, self.stage_t0 = "running", 0, now
        log.info("cacheviz-job-started %.3f %s", now, self.title)

    def stage(self, name: str) -> None:
        now = time.time()
        with self._lock:
            if self.stage_name and self.stage_name != name:
                self.finished_stages.append((self.stage_name, now - self.stage_t0))
            changed = self.stage_name != name
            if changed:
                self.stage_name, self.stage_t0 = name, now
            self.detail, self.done, self.total = "", 0, 1
        if changed:
            log.info("cacheviz-job-stage %.3f %s: %s", now, self.title, name)

    def step(self, done: int, total: int, detail: str = "") -> None:
        with self._lock:
            self.detail, self.done, self.total = str(detail), int(done), max(int(total), 1)

    def finish(self, error: str | None = None) -> None:
        now = time.time()
        with self._lock:
            if not self.active:
                return
            if self.stage_name and error is None:
                self.finished_stages.append((self.stage_name, now - self.stage_t0))
                self.stage_name = ""
            self.error = error
            self.seconds = now - self.t0
            self.state = "failed" if error else "done"
        self.finished.set()
        log.info("cacheviz-job-%s %.3f %s after %.2f s%s", self.state, now, self.title, self.seconds,
                 f": {error}" if error else "")

    def snapshot(self) -> dict:
        with self._lock:
            now = time.time()
            return dict(
                state=self.state, stage=self.stage_name, detail=self.detail, done=self.done, total=self.total,
                ahead=self.ahead, elapsed=now - self.t0, stage_elapsed=now - self.stage_t0,
                finished=list(self.finished_stages), error=self.error, seconds=self.seconds, title=self.title,
            )


class JobBoard:
    """At most one queued or running job per key; the newest `keep` finished jobs stay listed.

    `render(exc)` words a `CachevizError` for the front end (the app names its widgets).
    `workers` >= 1: jobs run in that many worker processes, first come first served, and a
    task must be picklable (a study's bound `run`, a module-level function); 0: in threads here.
    `shared(key)`: (data directory, lock name) of a job that must run once across processes
    sharing that directory, or None; the task then runs under that lock, wherever it runs.
    """

    def __init__(self, render: Callable[[CachevizError], str] = str, keep: int = 64, workers: int = 0,
                 shared: Callable[[tuple], tuple[str, Any] | None] | None = None):
        self._jobs: dict[tuple, Job] = {}
        self._lock = threading.Lock()
        self.render = render
        self.keep = keep
        self.shared = shared
        self.runner = ProcessRunner(workers, render, OUT_OF_MEMORY) if workers > 0 else None

    def get(self, key: tuple) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.active]

    def start(self, key: tuple, title: str, task: Callable[[Job], Any], lock: threading.Lock | None = None) -> Job:
        """Start `task(job)` unless a job with `key` is queued or running (then that one is returned).

        In threads, `lock` keeps jobs that must not overlap apart; in worker processes the
        line does (one job per worker at a time).
        """
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.active:
                return job
            job = Job(key, title)
            self._jobs[key] = job
            finished = [k for k, j in self._jobs.items() if not j.active]
            for k in finished[: max(0, len(self._jobs) - self.keep)]:
                del self._jobs[k]
        where = self.shared(key) if self.shared is not None else None
        if where is not None:  # a module-level partial: still picklable for a worker process
            task = functools.partial(run_locked, str(where[0]), where[1], task)
        if self.runner is not None:
            self.runner.submit(job, task)
        else:
            threading.Thread(target=self._run, args=(job, task, lock or threading.Lock()),
                             name=f"cacheviz-{title}", daemon=True).start()
        return job

    def _run(self, job: Job, task: Callable[[Job], Any], lock: threading.Lock) -> None:
        try:
            if not lock.acquire(blocking=False):
                job.stage(Stage.WAITING)
                lock.acquire()
            job.started()
            try:
                task(job)
            finally:
                lock.release()
            job.finish()
        except CachevizError as exc:
            job.finish(self.render(exc))
        except MemoryError:
            job.finish(OUT_OF_MEMORY)
        except Exception as exc:
            log.error("job %s failed:\n%s", job.title, traceback.format_exc())
            job.finish(f"The work failed unexpectedly ({type(exc).__name__}); see the server log and try again.")


class Locks:
    """One lock per key, made on first use (process-wide)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[Any, threading.Lock] = {}

    def __call__(self, key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())
