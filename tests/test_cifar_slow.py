"""The paper's claim on real data: ResNet20 on the shared CIFAR-10 (needs ../shared; slow)."""
import shutil

import pytest

from cacheviz.config import Setup
from cacheviz.experiment import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar_dir(shared, tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar")
    (d / "cifar10").symlink_to(shared / "data" / "cifar10")
    (d / "checkpoints").mkdir()
    shutil.copy(shared / "weights" / "resnet20-12fca82f.th", d / "checkpoints")
    return d


def test_resnet20_cache_beats_baseline_on_cifar10(cifar_dir):
    r = evaluate(Setup(dataset="cifar10", model="resnet20", layers=("layer3.0",)), cifar_dir, device="cpu")
    assert r["n_cache"] == 50000 and r["n_val"] == 5000 and r["n_test"] == 5000
    # the published checkpoint on these JPEG-re-encoded images: 81.0% over the whole test set
    assert r["baseline_acc_all_test"] == pytest.approx(0.810, abs=0.005)
    assert r["cache_acc"] > r["baseline_acc"] + 0.01  # stage-3 keys beat the network
    assert r["cache_only_acc"] < r["cache_acc"]
    assert r["cache_acc_val"] > r["baseline_acc_val"]
