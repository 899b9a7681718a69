from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data directory per test session, so digits-cnn trains once for all tests."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data" / "cifar10" / "test").is_dir():
        pytest.skip("../shared (CIFAR-10 and checkpoints) is not here")
    return SHARED


@pytest.fixture(scope="session")
def digits_spec(data_dir):
    from cacheviz.models import load_model

    return load_model("digits-cnn", data_dir)


@pytest.fixture(scope="session")
def resnet20_random(tmp_path_factory):
    """ResNet20 with random weights, loaded through the public checkpoint path (not a mock)."""
    from cacheviz.models import build_cifar_resnet, load_model

    torch.manual_seed(0)
    net = build_cifar_resnet(20)
    # random BatchNorm statistics, so activations are not trivially the same everywhere
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp("rn20")
    ckpt = d / "random-resnet20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    return load_model("resnet20", d, checkpoint=ckpt)


@pytest.fixture(scope="session")
def app_entry(tmp_path_factory) -> str:
    """An entry script that runs app.py: AppTest on app.py itself trips Streamlit's pages/
    compatibility mode on every run (see cacheviz/ui.py: ensure_entrypoint)."""
    d = tmp_path_factory.mktemp("entry")
    (d / "entry.py").write_text(f"import runpy\nrunpy.run_path({str(REPO / 'app.py')!r}, run_name='__main__')\n")
    return str(d / "entry.py")


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Path:
    """One data directory per app test module: its pages share builds, other modules start clean."""
    return tmp_path_factory.mktemp("appdata")


@pytest.fixture
def env(app_dir, monkeypatch):
    """Point the app (CACHEVIZ_DATA_DIR) at the module's data directory."""
    monkeypatch.setenv("CACHEVIZ_DATA_DIR", str(app_dir))
    return app_dir


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("CACHEVIZ_DATA_DIR", raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    # AppTest runs the app in this process: its jobs run in threads here, where tests can patch
    # the engine; the real-server tests (browser, load) use worker processes as the app does.
    monkeypatch.setenv("CACHEVIZ_WORKERS", "0")


@pytest.fixture(scope="module")
def base(data_dir):
    """The digits setup's knowledge store (made once per session's data directory); store tests
    edit private copies of it. A module may override it (the Milvus server's tests do)."""
    pytest.importorskip("pymilvus")
    from cacheviz import kstore
    from cacheviz.config import Setup

    return kstore.open_or_create(Setup(), data_dir)
