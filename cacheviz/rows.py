"""Study rows as files: JSON (a list) or CSV (lists joined with '+'), for the CLI and the app."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from .errors import CachevizError
from .store import atomic_write_bytes

SUFFIXES = (".json", ".csv")


def csv_bytes(rows: list[dict]) -> bytes:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: "+".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue().encode()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2).encode() + b"\n"


def check_out_path(out: str, param: str = "out", suffixes: tuple[str, ...] = SUFFIXES) -> None:
    """Refuse, before any work, a file the rows could not be written to ('-' is standard output)."""
    if out == "-":
        return
    path = Path(out)
    if suffixes and path.suffix.lower() not in suffixes:
        raise CachevizError(f"the file name must end in {' or '.join(suffixes)}", param=param, value=out)
    if path.is_dir():
        raise CachevizError("that is a folder", "give a file name inside it", param=param, value=out)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CachevizError(f"the folder {parent} does not exist", "create it first", "give another file",
                            param=param, value=out)
    if not os.access(parent, os.W_OK):
        raise CachevizError(f"the folder {parent} is not writable", "give a file in a writable folder",
                            param=param, value=out)
    # os.access answers yes to root everywhere, /proc and read-only mounts included: only
    # creating a file there (as the atomic write will, beside the target) tells for sure; named as
    # the writer names its temps, so one left by a killed process is swept like theirs
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise CachevizError(f"the folder {parent} does not take new files ({exc.strerror or type(exc).__name__})",
                            "give a file in a folder you can write to", param=param, value=out) from None
    os.close(fd)
    os.unlink(probe)


def write_rows(rows: list[dict], out: str) -> None:
    """Rows as JSON or CSV by the file's suffix, atomically; '-' prints JSON."""
    check_out_path(out)
    if out == "-":
        print(json.dumps(rows, indent=2))
    elif out.lower().endswith(".csv"):
        atomic_write_bytes(out, csv_bytes(rows))
    else:
        atomic_write_bytes(out, json_bytes(rows))
