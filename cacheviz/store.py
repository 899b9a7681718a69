"""Persistence under the data directory: tensors as safetensors, results as JSON.

Everything is keyed by a hash of the configuration that determines it, written atomically
(temp file in the same folder, fsync, rename) and checked on read: tensor files carry a CRC32
of their contents, result files a SHA-256 of their key and result. A crash mid-write or a
damaged file (truncated, ill-typed, edited) costs a rebuild with a warning, never a wrong answer.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import json
import os
import shutil
import socket
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CachevizError

# Bump when a change to the engine alters what a stored artefact means.
FORMAT_VERSION = 1


def check_data_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """The data directory, created if missing; one sentence if it cannot hold what is computed.

    `create=False`: only refuse a path that can never be a folder (a file, or a path below one),
    creating nothing and asking no write permission, for commands that may only read (a
    stored result, a read-only mount).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CachevizError("that is a file, not a folder", "give a folder (it is created when missing)",
                            param="data_dir", value=str(path))
    # "Not a directory" from mkdir alone leaves the user to find which part of the path is a file
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CachevizError(f"the folder cannot be created: {blocker} is a file, not a folder",
                            "give a folder outside it", param="data_dir", value=str(path))
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CachevizError(f"the folder cannot be created ({exc.strerror or type(exc).__name__})",
                            "give a folder you can write to", param="data_dir", value=str(path)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CachevizError("the folder is not writable", "give a folder you can write to",
                            param="data_dir", value=str(path))
    return path


def canonical_json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists, keys strings), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_hash(config: dict[str, Any]) -> str:
    """Stable 16-hex-digit key of a JSON-able configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Files in the data directory are readable by everyone who shares it (the app's users).
FILE_MODE = 0o644
_TMP_SUFFIX = ".tmp"
# A temp file's name carries its writer's host as well as its process id: a data directory shared
# by servers on several machines must not have one machine sweep another's write in progress
# (a process id means something only on the host that made it).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_SWEPT: set[str] = set()


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it replaces `path`, on any failure it goes.

    The temp file's name carries the writer's process id, so one left behind by a killed
    process is recognised and removed by the next writer in that folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{writer_tag()}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        yield tmp
        # after the writer: some (safetensors) replace the file, which resets mkstemp's mode
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def writer_tag() -> str:
    """This process as a writer, in names of files or folders it may leave behind: its id and
    its host (a process id means something only on the host that made it)."""
    return f"{os.getpid()}h{_HOST}"


def writer_gone(tag: str) -> bool:
    """True when the writer named by `tag` (see `writer_tag`; a bare process id is an older name
    of this host's) is known to be dead: never for this process or another machine's writer."""
    pid_text, _, host = tag.partition("h")
    if host and host != _HOST:
        return False  # only that machine can tell whether its writer is alive
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    return not _pid_alive(int(pid_text))


def sweep_stale_temps(folder: str | os.PathLike, force: bool = False) -> list[str]:
    """Remove temp files in `folder` whose writing process is gone (once per folder and process)."""
    folder = str(folder)
    if folder in _SWEPT and not force:
        return []
    _SWEPT.add(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(".") and e.name.endswith(_TMP_SUFFIX)):
            continue
        parts = e.name[: -len(_TMP_SUFFIX)].split(".")  # "", name..., pid, random
        if len(parts) >= 4 and writer_gone(parts[-2]):
            try:
                os.unlink(e.path)
                removed.append(e.name)
            except OSError:
                pass
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(temp path)` with any writer (FAISS's write_index, say); the result replaces `path` atomically."""
    with _atomic_target(path) as tmp:
        write(tmp)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        crc = zlib.crc32(name.encode(), crc)
        if t.numel():
            # memoryview: checksum in place, no copy of a multi-GB tensor
            crc = zlib.crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy()), crc)
    return f"{crc:08x}"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save tensors with `meta` (JSON-able) and a checksum in the safetensors header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "meta": json.dumps(meta, sort_keys=True, default=str),
        "format_version": str(FORMAT_VERSION),
        "code_version": __version__,
        "crc32": _checksum(tensors),
    }
    # save_file streams to disk; building the bytes in memory would double peak memory
    with _atomic_target(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def load_tensors(
    path: str | os.PathLike, expect_meta: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Load what `save_tensors` wrote; None (with a warning) if missing, corrupt or mismatched.

    `expect_meta`, when given, must equal the stored meta, so a hash collision or a stale file
    written by another configuration is never mistaken for the right one.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format_version") != str(FORMAT_VERSION):
            raise ValueError("stored by another format version")
        if header.get("crc32") != _checksum(tensors):
            raise ValueError("checksum mismatch")
        meta = json.loads(header["meta"])
        if expect_meta is not None and json.loads(json.dumps(expect_meta, sort_keys=True, default=str)) != meta:
            raise ValueError("stored for another configuration")
    except Exception as exc:  # any damage means: rebuild
        warnings.warn(f"{path.name} is unusable ({exc}); it will be rebuilt.", stacklevel=2)
        return None
    return tensors, meta


def touch(path: str | os.PathLike) -> None:
    """Mark a stored file as just used, so least-recently-used pruning keeps it."""
    try:
        os.utime(path)
    except OSError:  # read-only or already pruned by another process: nothing to keep
        pass


def prune_lru(folder: str | os.PathLike, budget_bytes: int, keep: set[str] | frozenset = frozenset(),
              pattern: str = "*.safetensors", free_share: float | None = None) -> list[str]:
    """Delete the least recently used files in `folder` until they fit `budget_bytes` and, with
    `free_share`, that share of what the disk would have free without them.

    A derived store (features) must not grow until it fills the disk. Files in `keep` (just
    written) stay even over budget. Deleting a file another process is reading is safe here:
    an open file stays readable, and a reader that finds it gone rebuilds it.
    """
    files = []
    for f in Path(folder).glob(pattern):
        try:
            st = f.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    if free_share is not None:
        budget_bytes = min(budget_bytes, int(free_share * (shutil.disk_usage(folder).free + total)))
    removed = []
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= budget_bytes:
            break
        if str(f) in keep:
            continue
        try:
            f.unlink()
        except OSError:
            continue
        total -= size
        removed.append(f.name)
    return removed


def _json_sha256(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def save_result(path: str | os.PathLike, key: dict[str, Any], result: Any, **extra: Any) -> None:
    """Write a study's `result` under `key` with a SHA-256 over both (and `extra` fields beside)."""
    body = canonical_json({"key": key, "result": result})
    atomic_write_json(path, {**canonical_json(extra), **body, "sha256": _json_sha256(body)})


def load_result(
    path: str | os.PathLike, key: dict[str, Any], valid: Callable[[Any], bool] = lambda r: True
) -> Any | None:
    """The result stored at `path` for `key`; None if there is none, and None with a warning if
    the file is damaged (unreadable, checksum mismatch, another key, or `valid(result)` false)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not {"key", "result", "sha256"} <= set(doc):
            raise ValueError("not a result file")
        if _json_sha256({"key": doc["key"], "result": doc["result"]}) != doc["sha256"]:
            raise ValueError("checksum mismatch")
        if doc["key"] != canonical_json(key):
            raise ValueError("stored for another configuration")
        if not valid(doc["result"]):
            raise ValueError("unexpected content")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        warnings.warn(f"{path.name} is unusable ({exc}); it will be recomputed.", stacklevel=2)
        return None
    return doc["result"]


_SHA_MEMO: dict[tuple, str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes; remembered while its size, times and inode stay the same."""
    path = Path(path)
    st = path.stat()
    sig = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _SHA_LOCK:
        hit = _SHA_MEMO.get(sig)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _SHA_LOCK:
        if len(_SHA_MEMO) > 256:
            _SHA_MEMO.clear()
        _SHA_MEMO[sig] = digest
    return digest


def load_json(path: str | os.PathLike) -> Any | None:
    """Read a JSON file; None (with a warning) if missing or corrupt."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path.name} is unusable ({exc}); it will be rebuilt.", stacklevel=2)
        return None


def cached_tensors(
    path: str | os.PathLike,
    meta: dict[str, Any],
    build: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Return the tensors stored at `path` for `meta`, building and saving them if needed."""
    hit = load_tensors(path, expect_meta=meta)
    if hit is not None:
        return hit[0]
    tensors = build()
    save_tensors(path, tensors, meta)
    return tensors
