"""A real Milvus standalone server for the knowledge store's server-path tests (`-m milvus`).

PyPI's `milvus` package ships the Milvus 2.3 standalone binary (compressed) and a config
template; this module uses the package for those two things and runs the binary itself, so a
test can SIGKILL it and start it again on the same data directory and port. Where the package
or the binary cannot run, the calling test is skipped with one sentence.

Loopback only as far as Milvus 2.3 allows: the embedded etcd listens on 127.0.0.1 (its own
config file), every node advertises 127.0.0.1, and the ports are free ones picked outside the
kernel's ephemeral range; the gRPC and metrics listeners of this release bind all interfaces
(it has no listen-address setting), so the ports are random rather than Milvus's defaults.
Every wait has a deadline: a stuck server fails or skips a test, never hangs a CI run.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT = float(os.environ.get("CACHEVIZ_TEST_MILVUS_START_TIMEOUT", "120"))
STOP_TIMEOUT = 15.0
TERM_GRACE = 5.0  # Milvus 2.3 standalone does not exit on SIGTERM within a minute
SESSION_TTL = 5
PROBE = "cacheviz_test_probe"  # the collection readiness is checked on (one row per start)
_NODES = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on, below the ephemeral range: a client's outgoing
    connection cannot take one of them between a kill and the restart that needs it again."""
    lo, _ = _ephemeral_range()
    top = max(lo, 12000)
    rng = random.Random(os.getpid() ^ time.time_ns())
    got: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(2000):
            if len(got) == n:
                break
            port = rng.randrange(10000, top)
            if port in got:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            got.append(port)
    finally:
        for s in held:
            s.close()
    if len(got) < n:
        pytest.skip(f"found only {len(got)} of the {n} free TCP ports a Milvus server needs")
    return got


class MilvusTestServer:
    """One Milvus standalone process on its own base directory. `uri` reaches it (gRPC)."""

    def __init__(self, base_dir: str | os.PathLike):
        self.base = Path(base_dir)
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = 0
        self._cmd: list[str] = []
        self._env: dict[str, str] = {}

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> MilvusTestServer:
        try:
            import milvus
            from milvus import MilvusServerConfig, _initialize_data_files
        except ImportError as exc:
            pytest.skip(f"PyPI's milvus package (a Milvus standalone server) is not installed ({exc})")
        self.base.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            cfg = MilvusServerConfig(data_dir=str(self.base))
            port_keys = sorted(k for k in cfg.configurable_items if k.endswith("_port"))
            ports = _free_ports(len(port_keys) + 3)
            cfg.update(**dict(zip(port_keys, ports)))
            etcd_client = dict(zip(port_keys, ports))["etcd_port"]
            etcd_peer, self.metrics_port = ports[-3], ports[-2]
            self.port = cfg.configs["proxy_port"]
            for node in _NODES:
                cfg.set(f"{node}.ip", "127.0.0.1")
            # A restarted server's flushes fail ("node not found") until the session of the data
            # node of before expires: 30 s by default, 5 s here, so a restart takes ~15 s
            cfg.set("common.session.ttl", SESSION_TTL)
            cfg.resolve()
            _initialize_data_files(str(self.base))
        except Exception as exc:  # noqa: BLE001 - the package's own API or its template changed
            pytest.skip(f"PyPI's milvus package {getattr(milvus, '__version__', '?')} could not be set up "
                        f"({type(exc).__name__}: {exc})")
        etcd_cfg = self.base / "configs" / "embed-etcd.yaml"
        peer = f"http://127.0.0.1:{etcd_peer}"
        client = f"http://127.0.0.1:{etcd_client}"
        etcd_cfg.write_text(f"name: default\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
                            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                            f"initial-cluster: default={peer}\n")
        conf = self.base / "configs" / "milvus.yaml"
        # etcd's default peer port (2380) is fixed: two servers on one machine (or a leftover)
        # would collide; the template has no key for the embedded etcd's own config file
        text = conf.read_text()
        conf.write_text(text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_cfg}\n", 1))
        exe = self.base / "bin" / "milvus"
        self._cmd = [str(exe), "run", "standalone"]
        self._env = dict(os.environ, DEPLOY_MODE="STANDALONE", METRICS_PORT=str(self.metrics_port),
                         MILVUS_RUN_DIR=str(self.base / "run"),
                         LD_LIBRARY_PATH=f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        self._spawn()
        try:
            self._wait_healthy(START_TIMEOUT - (time.monotonic() - t0))
        except RuntimeError as exc:
            self.kill9()
            pytest.skip(f"the Milvus {getattr(milvus, '__version__', '?')} standalone binary did not start: {exc}")
        self.start_seconds = time.monotonic() - t0
        return self

    def _spawn(self) -> None:
        logs = self.base / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "milvus-stdout.log", "ab") as out, open(logs / "milvus-stderr.log", "ab") as err:
            # its own session: a kill reaches the whole group, and Ctrl-C on pytest does not
            self.proc = subprocess.Popen(self._cmd, cwd=self.base, env=self._env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_healthy(self, timeout: float) -> None:
        """Until /healthz says OK and a client can list collections; RuntimeError past `timeout`."""
        timeout = max(timeout, 1.0)
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"it exited with status {code} ({self._log_tail()})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2) as r:
                    if b"OK" in r.read():
                        if self._client_answers(deadline):
                            return
                        last = "healthz OK but a write could not be flushed yet"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"no healthy answer in {timeout:.0f} s ({last})")

    def _client_answers(self, deadline: float) -> bool:
        """A write reaches a flushed segment. /healthz says OK ten seconds before that: after a
        restart the data coordinator still names the data node of before (until its etcd
        session expires) and every flush answers "node not found"."""
        from pymilvus import MilvusClient

        try:
            c = MilvusClient(self.uri, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            try:
                if not c.has_collection(PROBE, timeout=5):
                    c.create_collection(PROBE, dimension=2, timeout=30)
                c.load_collection(PROBE, timeout=30)
                c.insert(PROBE, [{"id": int(time.time_ns() % 2**62), "vector": [0.0, 1.0]}], timeout=10)
                c.flush(PROBE, timeout=30)
            finally:
                c.close()
            return True
        except Exception:  # noqa: BLE001 - not ready yet: the caller's deadline bounds the retries
            return False

    def _log_tail(self) -> str:
        try:
            tail = (self.base / "logs" / "milvus-stderr.log").read_text(errors="replace").strip().splitlines()[-3:]
            return " | ".join(tail)[-400:] or "nothing on stderr"
        except OSError:
            return "no log"

    # -- stopping ----------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The server's processes: the binary we started and anything still running our base
        directory's binary (the group is killed too, should a release ever fork helpers)."""
        found = set()
        if self.proc is not None and self.proc.poll() is None:
            found.add(self.proc.pid)
        exe = str(self.base / "bin" / "milvus")
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") == exe:
                        found.add(int(d.name))
                except OSError:
                    continue
        return sorted(found)

    def kill9(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: nothing gets to flush or close."""
        pids = self.pids()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after TERM_GRACE seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=TERM_GRACE)
            except subprocess.TimeoutExpired:
                pass
        self.kill9()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """The same binary, config, data directory and ports; back when it answers again.
        A running server is killed first (SIGKILL: it would not exit on SIGTERM in a minute, so
        any supervisor ends up doing the same). A server that does not come back fails the test
        (its data is what is being tested)."""
        if self.pids():
            self.kill9()
        t0 = time.monotonic()
        self._spawn()
        self._wait_healthy(timeout)
        self.restart_seconds = time.monotonic() - t0


def start_server(base_dir: str | os.PathLike) -> MilvusTestServer:
    """A started server, or the calling test skipped with the reason."""
    return MilvusTestServer(base_dir).start()
