"""Build locks across processes: one build of a thing per data directory, however many servers.

The job board dedupes requests within one server process. Two servers behind a load balancer,
a server restarted mid-build, or the CLI next to the app share only the data directory, so the
lock lives there: `<data_dir>/locks/<hash of the name>.lock`, an `flock` taken by whoever runs
the build (a worker process or a thread) around "look for the stored result; else compute and
store it". The one that waited then finds the stored result instead of computing it again.

Why flock on a file:
- The kernel drops it when its holder dies (kill -9, out of memory), so a crashed build never
  leaves a lock behind; the lock files themselves stay (empty) and are never removed, because
  removing one while another process waits on it would let a third process lock a fresh file
  and run alongside the waiter.
- Each `open` is its own lock owner, so threads of one process exclude each other too. On an
  NFS mount Linux emulates flock with POSIX byte-range locks, which the NFS server arbitrates
  across machines but which do not exclude threads of one process; a per-path thread lock here
  covers that case.
- The name is hashed without the data directory's path, so machines that mount the shared
  directory at different paths still agree on the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CachevizError

# One clear line in the job's progress while another process holds the build.
WAITING_OTHER = "waiting for another server's build of the same work; its result is used, not computed again"

_GUARD = threading.Lock()
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_HELD = threading.local()  # paths this thread holds: a nested take of the same lock passes


def lock_path(data_dir: str | os.PathLike, name: Any) -> Path:
    """The lock file of `name` (anything JSON-able) in `data_dir`."""
    blob = json.dumps(name, sort_keys=True, default=str).encode()
    return Path(data_dir) / "locks" / f"{hashlib.sha256(blob).hexdigest()[:24]}.lock"


@contextlib.contextmanager
def build_lock(data_dir: str | os.PathLike, name: Any, progress=None) -> Iterator[bool]:
    """Hold the cross-process lock of `name` in `data_dir`; yields True if it had to wait.

    `progress` (a `progress.Reporter`) gets the stage `WAITING_OTHER` while another holder runs.
    The same thread taking the same lock again (a study inside a study) passes straight through.
    """
    path = lock_path(data_dir, name)
    key = str(path)
    held = _HELD.__dict__.setdefault("paths", set())
    if key in held:
        yield False
        return
    with _GUARD:
        local = _THREAD_LOCKS.setdefault(key, threading.Lock())
    with _open(path) as fh:
        waited = False
        if not local.acquire(blocking=False):
            waited = True
            _say_waiting(progress)
            local.acquire()
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    _say_waiting(progress)
                waited = True
                fcntl.flock(fh, fcntl.LOCK_EX)  # interruptible: Python retries it after signal handlers
            held.add(key)
            try:
                _note_holder(fh)
                yield waited
            finally:
                held.discard(key)
                fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            local.release()


def _open(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as exc:  # a read-only data directory: one sentence, not a traceback
        raise CachevizError(f"the data directory's lock file {path} cannot be written "
                            f"({exc.strerror or type(exc).__name__})", "give a data directory you can write to",
                            param="data_dir", value=str(path.parent.parent)) from None


def _say_waiting(progress) -> None:
    if progress is not None:
        progress.stage(WAITING_OTHER)
        progress.step(0, 1)  # a terminal prints on steps only: without it the CLI would say nothing


def _note_holder(fh) -> None:
    # who holds it, for a person looking at a stuck build (never read by the code: the lock is the flock)
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
    except OSError:
        pass


def run_locked(data_dir: str, name: Any, task: Callable, progress) -> Any:
    """`task(progress)` under `build_lock(data_dir, name)`: module-level, so a job board can send
    it to a worker process, where the build runs and so where the lock must be held."""
    with build_lock(data_dir, name, progress):
        return task(progress)


__all__ = ["WAITING_OTHER", "build_lock", "lock_path", "run_locked"]
