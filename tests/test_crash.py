"""Crash safety with real processes: `kill -9` at any moment leaves nothing half-written that is
ever read, the next run gives the same numbers, and concurrent runs on one data directory agree.

A killed writer can leave its temp file (`.<name>.<pid>.<random>.tmp`) behind: it is never
read, and the next writer in that folder removes it. Every other file is complete and verified.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cacheviz import store
from cacheviz.progress import Stage

REPO = Path(__file__).resolve().parents[1]


def _cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cacheviz", "evaluate", "--data-dir", str(data_dir), "--device", "cpu",
            "--layers", "pool,relu3", "--json", str(out), *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _numbers(path: Path) -> dict:
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("baseline_acc", "cache_acc", "cache_only_acc", "knn_acc", "theta", "lam",
                              "n_fixed", "n_broken")}


def _temps(d: Path) -> list[Path]:
    return [p for p in d.rglob("*.tmp")] if d.exists() else []


def _kill_when(data_dir: Path, out: Path, trigger: str, attempts: int = 5) -> str:
    """Run evaluate and SIGKILL it when `trigger` happens: a stage's name on stderr, or "write"
    (the moment a temp file appears: mid-write). Returns what the process printed.

    A "write" run recomputes (--force): a kill at the stage before may land only after the
    result was stored (digits tunes in milliseconds), and a stored result writes nothing. With
    everything else stored, the result's own files are written in about a millisecond, which a
    poll every 2 ms can miss: a run that finished unseen is tried again (its output removed)."""
    for _ in range(attempts if trigger == "write" else 1):
        printed, fired = _run_and_kill(data_dir, out, trigger)
        if fired:
            break
        out.unlink(missing_ok=True)
    assert fired, f"never reached '{trigger}':\n{printed}"
    return printed


def _run_and_kill(data_dir: Path, out: Path, trigger: str) -> tuple[str, bool]:
    extra = ("--force",) if trigger == "write" else ()
    proc = subprocess.Popen(_cmd(data_dir, out, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    fired = threading.Event()

    def kill():
        if not fired.is_set():
            fired.set()
            proc.send_signal(signal.SIGKILL)

    def read():
        for line in proc.stdout:
            lines.append(line)
            if trigger != "write" and trigger in line:
                kill()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    end = time.time() + 120
    while proc.poll() is None and time.time() < end:
        if trigger == "write" and _temps(data_dir):
            kill()
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    reader.join(5)
    if fired.is_set():
        assert proc.returncode == -signal.SIGKILL
    return "".join(lines), fired.is_set()


def _verify(d: Path) -> None:
    """Every file but the killed writers' temp files is complete and passes its check."""
    for p in d.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".safetensors":
            assert store.load_tensors(p) is not None, f"{p} is damaged"
        elif p.suffix == ".json":
            doc = json.loads(p.read_text())
            assert store.load_result(p, doc["key"]) is not None, f"{p} is damaged"
        elif p.suffix == ".pt":
            import torch

            assert torch.load(p, weights_only=True), f"{p} is damaged"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("reference")
    out = d / "r.json"
    subprocess.run(_cmd(d / "data", out), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    return _numbers(out)


def test_kill_9_at_every_stage_then_the_same_numbers(tmp_path, reference):
    data = tmp_path / "data"
    out = tmp_path / "r.json"
    # each killed run gets further than the last: the artefacts the ones before finished persist
    for trigger in ("training digits-cnn", "write", Stage.TRAIN_FEATURES, "write", Stage.TEST_FEATURES,
                    Stage.TUNE, "write"):
        _kill_when(data, out, trigger)
        _verify(data)
        assert not out.exists(), "a killed run wrote its output file"
    p = subprocess.run(_cmd(data, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _numbers(out) == reference
    assert not _temps(data), "the killed writers' temp files were not cleaned"
    _verify(data)


def test_kill_9_during_a_sweep(tmp_path):
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "cacheviz", "sweep-layers", "--data-dir", str(data), "--device", "cpu",
           "--layers", "relu2,pool,relu3", "--retune", "--out", str(tmp_path / "rows.json")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if Stage.LAYERS in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    _verify(data)
    assert not (tmp_path / "rows.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["layer"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["relu2", "pool", "relu3"]
    assert not _temps(data)


def test_concurrent_runs_on_one_data_directory_agree(tmp_path, reference):
    data = tmp_path / "data"
    outs = [tmp_path / f"r{i}.json" for i in range(3)]
    procs = [subprocess.Popen(_cmd(data, o), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for o in outs]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert [_numbers(o) for o in outs] == [reference] * 3
    assert not _temps(data)
    _verify(data)
