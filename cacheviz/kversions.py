"""A knowledge store's history on disk: sealed manifests, their copies, and the head record.

Every version is a manifest (`versions/<n>.json`) sealed with the SHA-256 of its contents, so an
emptied, flipped or edited manifest is an error that names it, never a silently different live
set. Each manifest is written twice — first its copy in `journal/`, then `versions/` (the commit
point of an edit) — and then `head.json` records the newest committed number and its manifest's
hash. So a manifest that goes missing is noticed (`head.json` names a number that has no
manifest), a damaged one can be restored from its copy (`store repair`), and a crash between the
steps is told apart from damage: a journal copy or a key segment newer than every committed
manifest belongs to an edit that never committed and may be swept; anything a committed or
unreadable manifest might name never is.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from . import store
from .errors import CachevizError

MANIFESTS, JOURNAL, HEAD = "versions", "journal", "head.json"
MAIN = "main"
BRANCH_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StoreDamaged(CachevizError):
    """A store's files disagree with what it committed: nothing is changed until it is repaired."""


@dataclass(frozen=True)
class Version:
    number: int
    parent: int | None  # the version whose live set this one starts from
    undo_target: int | None  # the version an undo of this one returns to
    op: str  # create | add | remove | undo | publish | reset | repair
    detail: str
    added: list[list[int]]  # [first id, end id) ranges
    removed: list[int]
    next_id: int  # ids below this were allocated when this version committed
    n_live: int
    created: float = field(default_factory=time.time)
    branch: str = MAIN  # "main": everyone's store; other names: one session's own line

    @classmethod
    def from_json(cls, d: dict) -> "Version":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        missing = [k for k in ("number", "parent", "undo_target", "op", "detail", "added", "removed", "next_id", "n_live")
                   if k not in known]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        return cls(**known)

    def to_json(self) -> dict:
        return asdict(self)


def digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(body: dict) -> dict:
    body = {k: v for k, v in body.items() if k != "sha256"}
    return body | {"sha256": digest(body)}


def unseal(path: Path) -> dict:
    """The sealed JSON at `path`; ValueError saying why it cannot be trusted."""
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"it is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(d, dict) or "sha256" not in d:
        raise ValueError("it carries no checksum")
    body = {k: v for k, v in d.items() if k != "sha256"}
    if digest(body) != d["sha256"]:
        raise ValueError("its checksum does not match its contents")
    return body


def manifest_path(root: Path, number: int, where: str = MANIFESTS) -> Path:
    return root / where / f"{number:08d}.json"


def _number(f: Path) -> int | None:
    return int(f.stem) if f.stem.isdigit() else None


@dataclass
class Reading:
    """What a store's history folder holds, and everything wrong with it."""

    versions: dict[int, Version]
    head: dict | None  # {"number", "manifest"} from head.json; None when missing or damaged
    problems: list[str]  # each a clause naming a file and what is wrong with it
    damaged: list[int]  # manifest numbers that are missing or cannot be trusted
    journal_only: list[int]  # numbers with a journal copy but no manifest

    @property
    def latest(self) -> Version | None:
        return self.versions[max(self.versions)] if self.versions else None


def read(root: Path, legacy: bool = False, known: dict[int, Version] | None = None) -> Reading:
    """Read and check every manifest and head.json. `legacy`: a store made before manifests were
    sealed (its manifests are taken as they are, once, and sealed by `upgrade`). `known`: versions
    already read and checked by this process, taken as they are (only new manifests are read;
    a missing one is still noticed), so following others' commits costs what they added."""
    versions: dict[int, Version] = {}
    problems, damaged = [], []
    files = {n: f for f in (root / MANIFESTS).glob("*.json") if (n := _number(f)) is not None}
    for n, f in sorted(files.items()):
        if known and n in known:
            versions[n] = known[n]
            continue
        try:
            body = json.loads(f.read_bytes()) if legacy else unseal(f)
            if legacy:
                body.pop("sha256", None)
            v = Version.from_json(body)
            if v.number != n:
                raise ValueError(f"it calls itself version {v.number}")
            versions[n] = v
        except (OSError, ValueError, TypeError) as exc:
            problems.append(f"version {n}'s manifest ({MANIFESTS}/{f.name}) cannot be trusted: {exc}")
            damaged.append(n)
    head = None
    hp = root / HEAD
    if legacy:
        pass
    elif not hp.exists():
        problems.append(f"{HEAD}, the record of the newest version, is missing")
    else:
        try:
            head = unseal(hp)
            int(head["number"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{HEAD}, the record of the newest version, cannot be trusted: {exc}")
            head = None
    top = max([*files, int(head["number"]) if head else 0, 0])
    for n in range(1, top + 1):
        if n not in files:
            problems.append(f"version {n}'s manifest ({MANIFESTS}/{n:08d}.json) is missing")
            damaged.append(n)
    if head and int(head["number"]) in versions:
        n = int(head["number"])
        if digest(versions[n].to_json()) != head.get("manifest"):
            problems.append(f"version {n}'s manifest is not the one {HEAD} recorded")
            damaged.append(n)
    journal = {n for f in (root / JOURNAL).glob("*.json") if (n := _number(f)) is not None}
    return Reading(versions, head, problems, sorted(set(damaged)), sorted(journal - set(files)))


def write(root: Path, v: Version) -> None:
    """Commit `v`: its journal copy, its manifest (the commit point), then head.json."""
    body = seal(v.to_json())
    store.atomic_write_json(manifest_path(root, v.number, JOURNAL), body)
    store.atomic_write_json(manifest_path(root, v.number), body)
    write_head(root, v)


def write_head(root: Path, v: Version) -> None:
    store.atomic_write_json(root / HEAD, seal({"number": v.number, "manifest": digest(v.to_json())}))


def restore(root: Path, number: int) -> bool:
    """Put version `number`'s manifest back from its journal copy; False when that is no good either."""
    return restore_file(manifest_path(root, number, JOURNAL), manifest_path(root, number))


def restore_file(src: Path, dst: Path, check_only: bool = False) -> bool:
    """Copy the sealed file `src` over `dst` if its checksum holds; False when it does not."""
    try:
        kept = unseal(src)
    except (OSError, ValueError):
        return False
    if not check_only:
        store.atomic_write_json(dst, seal(kept))
    return True


@contextlib.contextmanager
def dir_lock(path: Path) -> Iterator[None]:
    """A store's edit lock (its `lock` file), across threads' file handles and processes."""
    with open(path / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_branch(name: str) -> str:
    if not isinstance(name, str) or not BRANCH_RE.fullmatch(name):
        raise CachevizError("a branch's name uses 1 to 64 letters, digits, '_' and '-'", param="branch", value=name)
    return name


__all__ = ["Version", "StoreDamaged", "Reading", "read", "write", "write_head", "restore", "restore_file", "seal", "unseal", "digest",
           "manifest_path", "check_branch", "dir_lock", "MAIN", "MANIFESTS", "JOURNAL", "HEAD"]
