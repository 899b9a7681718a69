"""The knowledge store's database of record: Milvus Lite on disk, or a Milvus server or cluster.

`kstore` asks this module for a client (`db`), for a store's collection name, and to create the
collection; every call into Milvus goes through here, so the two backends differ in one place.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from pathlib import Path
from typing import Iterator

from .errors import CachevizError

COLLECTION = "items"
SOURCE_LEN, NAME_LEN = 512, 128

# ---------------------------------------------------------------------------------------------
# The database


_SERVER_CLIENTS: dict[str, object] = {}
_PROCESS_LOCK = threading.RLock()


@contextlib.contextmanager
def db(path: Path) -> Iterator[object]:
    """The store's database, held only while in use.

    Milvus Lite serves one process per file, and the app's sessions, its worker processes and
    the CLI all edit stores; so each use takes the store's file lock, opens the file, and closes
    it (stopping its embedded server) after. A Milvus server (`CACHEVIZ_MILVUS_URI`) handles
    concurrent clients itself: its client stays open.
    """
    uri = os.environ.get("CACHEVIZ_MILVUS_URI")
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:  # pragma: no cover - in requirements
        raise CachevizError("the knowledge store needs pymilvus and milvus-lite",
                            "install the project's requirements.txt") from exc
    if uri:
        with _PROCESS_LOCK:
            c = _SERVER_CLIENTS.get(uri)
            if c is None:
                c = _SERVER_CLIENTS[uri] = connect(MilvusClient, uri, os.environ.get("CACHEVIZ_MILVUS_TOKEN", ""))
        yield c
        return
    db = str(path / "items.db")
    with _PROCESS_LOCK, open(path / "db.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        c = connect(MilvusClient, db)
        try:
            yield c
        finally:
            try:
                c.close()
            finally:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(db)
                fcntl.flock(fh, fcntl.LOCK_UN)


def connect(client_cls, uri: str, token: str = ""):
    try:
        return client_cls(uri, token=token) if token else client_cls(uri)
    except Exception as exc:
        raise CachevizError(f"the store's database at {uri} could not be opened ({type(exc).__name__}: {exc})",
                            "close the other program using it", "or point CACHEVIZ_MILVUS_URI at a Milvus server"
                            ) from exc


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
    client.create_collection(name, schema=schema, index_params=ip)



__all__ = ["db", "connect", "load", "collection_name", "new_collection_name", "make_collection", "COLLECTION", "SOURCE_LEN", "NAME_LEN"]
