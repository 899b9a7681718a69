"""The knowledge store's database of record: Milvus Lite on disk, or a Milvus server or cluster.

`kstore` asks this module for a client (`db`), for a store's collection name, and to create the
collection; every call into Milvus goes through here, so the two backends differ in one place.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import CachevizError

COLLECTION = "items"
SOURCE_LEN, NAME_LEN = 512, 128
QUERY_WINDOW = 16_384  # the most rows one server query returns (offset + limit)

# ---------------------------------------------------------------------------------------------
# The database


_SERVER_CLIENTS: dict[str, object] = {}
_PROCESS_LOCK = threading.RLock()
PROBE_TIMEOUT = 10.0  # seconds a cached server client gets to answer before it is replaced


def redact(text: str) -> str:
    """`text` without credentials: a URI's password (`http://user:***@host`), the value of
    CACHEVIZ_MILVUS_TOKEN (and its password half, for a `user:password` token) wherever it
    occurs, and `token=` / `password=` values. Every message this module builds passes here."""
    # the URI's own password first, so that its user name stays readable
    text = re.sub(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(@)", r"\1***\2", str(text))
    text = re.sub(r"(?i)\b((?:token|password|passwd|pwd)\s*[=:]\s*)[^&\s#,;)'\"]+", r"\1***", text)
    token = os.environ.get("CACHEVIZ_MILVUS_TOKEN", "")
    if token:
        text = text.replace(token, "***")
        pw = token.split(":", 1)[1] if ":" in token else ""
        if len(pw) >= 4:  # alone, as a word: "Milvus" (root's default) must not eat "MilvusException"
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(pw)}(?![A-Za-z0-9])", "***", text)
    return text


def describe_uri(path: Path | None = None) -> str:
    """Where stores' rows live, for people (the UI, messages): never a credential."""
    uri = os.environ.get("CACHEVIZ_MILVUS_URI")
    if uri:
        return f"the Milvus server at {redact(uri)}"
    if path is not None:
        return f"the Milvus Lite file {Path(path) / 'items.db'}"
    return "Milvus Lite files, one per store (<data>/stores/<name>/items.db)"


def _quiet_pymilvus() -> None:
    # pymilvus logs every failed RPC with its traceback on its own stderr handler; the failure
    # reaches the caller anyway, as one sentence from `_failure`
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


def is_connection_failure(exc: BaseException) -> bool:
    """The database did not answer (down, restarting, unreachable, timed out), as opposed to
    answering with a refusal. A cached server client is replaced after one of these."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    try:
        import grpc

        if isinstance(exc, grpc.FutureTimeoutError):
            return True
        if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
            return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    except ImportError:  # pragma: no cover - pymilvus needs grpc
        pass
    try:
        from pymilvus.exceptions import (
            ConnectError,
            MilvusException,
            MilvusUnavailableException,
        )
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, (ConnectError, MilvusUnavailableException)):
        return True
    if isinstance(exc, MilvusException):
        msg = str(exc.message).lower()
        return exc.code == 2 or any(w in msg for w in ("fail connecting", "unavailable", "deadline exceeded",
                                                       "timed out", "timeout", "connection refused"))
    return False


def is_db_error(exc: BaseException) -> bool:
    """An exception from Milvus or the channel to it (not a bug of ours, not a test's crash)."""
    if is_connection_failure(exc):
        return True
    try:
        import grpc
        from pymilvus.exceptions import MilvusException
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (MilvusException, grpc.RpcError))


def _reason(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or (exc.details() if callable(getattr(exc, "details", None)) else None) or str(exc)
    msg = str(msg)
    if ".go:" in msg:  # a server's Go stack trace: its last frame ends in what went wrong
        msg = re.split(r"\.go:\d+\s+\S+?:\s", msg.strip().splitlines()[-1])[-1]
    msg = " ".join(re.sub(r"attempt #\d+:\s*", "", msg).split())
    return redact(f"{type(exc).__name__}: {msg[:200]}{'...' if len(msg) > 200 else ''}")


def _failure(exc: BaseException, path: Path | None) -> CachevizError:
    """One sentence for a database failure, naming where the database is and what to do."""
    where = describe_uri(path)
    server = bool(os.environ.get("CACHEVIZ_MILVUS_URI"))
    if is_connection_failure(exc):
        problem = f"the store's database ({where}) did not answer ({_reason(exc)}), so no edit was committed"
        fix = ("start the server (or check CACHEVIZ_MILVUS_URI) and try again" if server
               else "close the other program using it and try again")
    else:
        problem = f"the store's database ({where}) refused the request ({_reason(exc)}), so no edit was committed"
        fix = ("try again (a server that has just restarted refuses writes for some seconds), and if it "
               "persists check the server's log and that it runs Milvus 2.3 or later" if server
               else "check the store with `store repair`")
    return CachevizError(problem, fix)


def _server_client(client_cls, uri: str, token: str, fresh: bool = False):
    """The process's client for the server at `uri`, checked to answer: a cached client that
    does not (the server restarted, or went away) is dropped and one new one tried, once."""
    with _PROCESS_LOCK:
        c = None if fresh else _SERVER_CLIENTS.get(uri)
        if c is not None:
            try:
                c.list_collections(timeout=PROBE_TIMEOUT)
                return c
            except Exception as exc:
                if not is_db_error(exc):
                    raise
                _drop_client(uri)
        c = connect(client_cls, uri, token)
        try:
            c.list_collections(timeout=PROBE_TIMEOUT)
        except Exception as exc:
            if not is_db_error(exc):
                raise
            _close_quietly(c)
            raise _failure(exc, None) from None
        _SERVER_CLIENTS[uri] = c
        return c


def _close_quietly(c) -> None:
    try:
        c.close()
    except Exception:  # noqa: BLE001, S110 - closing a dead channel may fail; it is being dropped anyway
        pass


def _drop_client(uri: str) -> None:
    with _PROCESS_LOCK:
        c = _SERVER_CLIENTS.pop(uri, None)
    if c is not None:
        _close_quietly(c)


@contextlib.contextmanager
def db(path: Path) -> Iterator[object]:
    """The store's database, held only while in use.

    Milvus Lite serves one process per file, and the app's sessions, its worker processes and
    the CLI all edit stores; so each use takes the store's file lock, opens the file, and closes
    it (stopping its embedded server) after. A Milvus server (`CACHEVIZ_MILVUS_URI`) handles
    concurrent clients itself: its client stays open, and is checked (and replaced once, if
    dead) each time it is handed out.

    A failure of the database itself, inside the block or opening it, leaves as one
    CachevizError naming the database (credentials removed); no version was written, because
    a store commits a version only after its rows are in (see kstore).
    """
    uri = os.environ.get("CACHEVIZ_MILVUS_URI")
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:  # pragma: no cover - in requirements
        raise CachevizError("the knowledge store needs pymilvus and milvus-lite",
                            "install the project's requirements.txt") from exc
    _quiet_pymilvus()
    if uri:
        c = _server_client(MilvusClient, uri, os.environ.get("CACHEVIZ_MILVUS_TOKEN", ""))
        try:
            yield c
        except Exception as exc:
            if not is_db_error(exc):
                raise
            if is_connection_failure(exc):  # the next use starts from a new channel
                _drop_client(uri)
            raise _failure(exc, path) from None
        return
    db = str(path / "items.db")
    with _PROCESS_LOCK, open(path / "db.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            c = connect(MilvusClient, db)
            try:
                yield c
            except Exception as exc:
                if not is_db_error(exc):
                    raise
                raise _failure(exc, path) from None
            finally:
                try:
                    c.close()
                finally:
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(db)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def connect(client_cls, uri: str, token: str = ""):
    try:
        return client_cls(uri, token=token) if token else client_cls(uri)
    except Exception as exc:  # noqa: BLE001 - what the client raised, sorted below
        if uri.startswith(("http://", "https://", "tcp://", "unix:", "grpc://")):
            raise _failure(exc, None) from None
        raise CachevizError(f"the store's database at {redact(uri)} could not be opened ({_reason(exc)})",
                            "close the other program using it", "point CACHEVIZ_MILVUS_URI at a Milvus server"
                            ) from None


def load(client, coll: str) -> None:
    # a reopened collection starts released; searching and querying need it loaded
    client.load_collection(coll)


def new_collection_name(name: str, uid: str) -> str:
    """The collection a new store's rows go to. A shared server holds many stores, from many data
    directories: the store's random `uid` keeps two stores of one name apart (Milvus names allow
    letters, digits and underscores)."""
    if not os.environ.get("CACHEVIZ_MILVUS_URI"):
        return COLLECTION
    return f"cv_{re.sub(r'[^A-Za-z0-9_]', '_', name)[:150]}_{uid[:12]}"


def collection_name(meta: dict) -> str:
    """The collection of an existing store (recorded in its meta.json at creation)."""
    if "collection" in meta:
        return meta["collection"]
    # stores made before the name was recorded
    return COLLECTION if not os.environ.get("CACHEVIZ_MILVUS_URI") else "cv_" + re.sub(r"\W", "_", meta["name"])



def make_collection(client, name: str, dim: int) -> None:
    from pymilvus import DataType

    if client.has_collection(name):
        client.drop_collection(name)  # a store without meta.json never committed anything
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("key", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("label", DataType.INT64)
    schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_LEN)
    schema.add_field("class_name", DataType.VARCHAR, max_length=NAME_LEN)
    schema.add_field("task", DataType.INT64)
    schema.add_field("version", DataType.INT64)
    ip = client.prepare_index_params()
    ip.add_index(field_name="key", index_type="FLAT", metric_type="IP")
    # Strong: a read right after another process's insert (a store opened by the next CLI
    # command, checked against its manifests) must see those rows; Lite ignores the level
    client.create_collection(name, schema=schema, index_params=ip, consistency_level="Strong")



def is_server() -> bool:
    """True when stores live on a Milvus server or cluster (`CACHEVIZ_MILVUS_URI`), not Milvus Lite."""
    return bool(os.environ.get("CACHEVIZ_MILVUS_URI"))


def count_rows(client, coll: str, below: int | None = None) -> int:
    """How many rows have an id below `below` (all rows when None).

    Strong consistency: a server answers a default (bounded) query from a view that may miss
    rows another process inserted a moment ago, which would read as a store short of rows.
    Milvus Lite and the 2.3 server both answer `count(*)`."""
    flt = f"id < {int(below)}" if below is not None else "id >= 0"
    res = client.query(coll, filter=flt, output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"]) if res else 0


def ids_below(client, coll: str, n: int) -> np.ndarray:
    """The sorted ids of the rows below `n`, read in id ranges of QUERY_WINDOW: a server caps
    one query's offset + limit at 16,384 rows, and ranges need neither offsets nor an order."""
    out = []
    for a in range(0, int(n), QUERY_WINDOW):
        b = min(int(n), a + QUERY_WINDOW)
        rows = client.query(coll, filter=f"id >= {a} and id < {b}", output_fields=["id"], limit=b - a,
                            consistency_level="Strong")
        out.append(np.fromiter((int(r["id"]) for r in rows), np.int64, len(rows)))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def copy_rows(client, src: str, dst: str, below: int, batch: int = 1000, then_flush: bool = True) -> int:
    """Insert the rows of `src` below id `below` into the existing collection `dst` (same
    schema), in id ranges; the count copied. On a server a store's folder does not hold its
    rows, so copying a store (a test's private copy, a branch made real) copies them here.
    `then_flush=False` leaves sealing to the server (2-3 s saved; the rows are durable once the
    insert returns, in its write-ahead log)."""
    fields = ["id", "key", "label", "source", "class_name", "task", "version"]
    done = 0
    for a in range(0, int(below), batch):
        b = min(int(below), a + batch)
        rows = client.query(src, filter=f"id >= {a} and id < {b}", output_fields=fields, limit=b - a,
                            consistency_level="Strong")
        if rows:
            client.insert(dst, [{f: (list(map(float, r[f])) if f == "key" else r[f]) for f in fields} for r in rows])
            done += len(rows)
    if then_flush:
        flush(client, dst)
    return done


FLUSH_RETRY_S = 45.0  # a restarted server's old data-node session lives 30 s (common.session.ttl)


def flush(client, coll: str, retry_s: float = FLUSH_RETRY_S) -> None:
    """`client.flush(coll)`, retried for up to `retry_s` while the server is only briefly unable
    to: for up to half a minute after a Milvus 2.3 standalone restarts, its data coordinator still
    assigns the channels to the data node of before (until that node's etcd session expires,
    `common.session.ttl`, 30 s by default) and flush answers "node not found"."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            client.flush(coll)
            return
        except Exception as exc:
            msg = str(getattr(exc, "message", exc)).lower()
            passing = is_db_error(exc) and not is_connection_failure(exc) and (
                getattr(exc, "retriable", False) or "node not found" in msg or "session not found" in msg
                or "not ready" in msg)
            if not passing or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


__all__ = ["COLLECTION", "NAME_LEN", "SOURCE_LEN", "collection_name", "connect", "copy_rows", "count_rows", "db", "describe_uri", "flush", "ids_below", "is_connection_failure", "is_db_error", "is_server", "load", "make_collection", "new_collection_name", "redact"]
