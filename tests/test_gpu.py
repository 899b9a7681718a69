"""The engine on CUDA: the paper's math, extraction and one small evaluate agree with the CPU.

Skipped without a GPU (`python -m pytest -m gpu` collects them anywhere). On a GPU the features
of a study stay on the device and results record the card's name.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cacheviz.cache import CacheMemory
from cacheviz.config import Setup
from cacheviz.experiment import Evaluate
from cacheviz.features import extract
from cacheviz.tuning import default_grid, grid_search, predict
from cacheviz.workspace import ExperimentData, prepare

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def _memory(device, K=2000, d=64, C=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(K, d, generator=g), dim=1)
    labels = torch.randint(0, C, (K,), generator=g)
    q = F.normalize(torch.randn(300, d, generator=g) + 2 * keys[:300], dim=1)
    return CacheMemory(keys, labels, C, device=device), q, labels[:300]


def test_p_mem_grid_and_predict_agree_with_the_cpu():
    cpu, q, y = _memory("cpu")
    gpu, _, _ = _memory("cuda")
    assert gpu.keys.is_cuda
    for theta in (10.0, 50.0, 90.0):
        assert torch.allclose(gpu.p_mem(q, theta).cpu(), cpu.p_mem(q, theta), atol=1e-5)
    p_net = torch.softmax(torch.randn(len(q), 10, generator=torch.Generator().manual_seed(1)), dim=1)
    thetas, lams = default_grid(9, 9)
    g_cpu = grid_search(cpu, q, p_net, y, thetas, lams)
    g_gpu = grid_search(gpu, q.cuda(), p_net.cuda(), y.cuda(), thetas, lams)
    assert torch.allclose(g_cpu.acc, g_gpu.acc, atol=1 / len(q) + 1e-6)
    (p_c,), knn_c = predict(cpu, q, p_net, [(50.0, 0.5)], knn_k=5)
    (p_g,), knn_g = predict(gpu, q.cuda(), p_net.cuda(), [(50.0, 0.5)], knn_k=5)
    assert torch.allclose(p_c, p_g, atol=1e-5) and (knn_c == knn_g).float().mean() > 0.99


def test_extraction_on_the_gpu_matches_the_cpu(resnet20_random):
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    layers = ["layer1.0", "layer3.2.relu1", "logits"]
    cpu = extract(resnet20_random, x, layers, device="cpu")
    gpu = extract(resnet20_random, x, layers, device="cuda", out_device="cuda", flip=True)
    resnet20_random.net.cpu()
    for name in layers:
        assert gpu[name].is_cuda and gpu[name].shape[0] == 128
        assert torch.allclose(gpu[name][:64].cpu(), cpu[name], rtol=1e-4, atol=1e-4), name


def test_a_study_keeps_its_features_on_the_device(data_dir):
    ws = prepare(Setup(layers=("pool", "relu3")), data_dir, "cuda")
    data = ExperimentData(ws, ws.layers)
    assert data.device.type == "cuda"
    assert all(t.is_cuda for t in data.tf.values()) and all(t.is_cuda for t in data.qf.values())
    mem = data.memory(ws.layers, "test")
    assert mem.keys.is_cuda


def test_a_small_evaluate_on_cuda_gives_the_cpus_numbers(data_dir):
    setup = Setup(layers=("pool", "relu3"))
    on_cpu = Evaluate(setup).run(data_dir, "cpu")
    on_gpu = Evaluate(setup).run(data_dir, "cuda", force=True)
    assert on_gpu["device"] == torch.cuda.get_device_name()
    n = on_cpu["n_test"]
    for k in ("baseline_acc", "cache_acc", "cache_only_acc", "knn_acc"):
        assert abs(on_gpu[k] - on_cpu[k]) <= 1 / n + 1e-9, k  # at most one test item apart
    assert on_gpu["inputs"] == on_cpu["inputs"]


def test_key_sets_at_once_on_cuda_give_the_cpus_numbers(data_dir):
    """Cache3's kernel (one product per layer for every set) with the features on the device."""
    from cacheviz.study import score_key_sets

    sets = [["relu3"], ["pool", "relu3"], ["relu1", "pool", "relu3"]]
    thetas, lams = default_grid()
    scores = {}
    for device in ("cpu", "cuda"):
        ws = prepare(Setup(), data_dir, device)
        data = ExperimentData(ws, ["relu1", "pool", "relu3"])
        scores[device] = score_key_sets(data, sets, thetas, lams)
        n_val = len(data.y_val)
    assert scores["cuda"][0].p.device.type == "cpu"  # results come back to the host
    for cpu, gpu in zip(scores["cpu"], scores["cuda"]):  # at most one item apart
        assert abs(cpu.val_acc - gpu.val_acc) <= 1 / n_val + 1e-9
        assert abs(cpu.acc - gpu.acc) <= 1 / len(cpu.y) + 1e-9


def test_attacks_on_cuda_give_the_cpus_answers(data_dir):
    """The robustness lab on the GPU: the cache's keys on the device, the same searches' results."""
    from cacheviz import attacks as A
    from cacheviz.progress import Silent
    from cacheviz.robustness import attack_sample, load_victims
    from cacheviz.study import Run

    out = {}
    for dev in ("cpu", "cuda"):
        ws, v, _ = load_victims(Setup(), Run(data_dir, dev, 256, Silent()))
        if dev == "cuda":
            assert v.memory.keys.is_cuda
        x = ws.spec.preprocess(ws.ds.test_x[attack_sample(ws.split.test_idx, 40, 0)])
        out[dev] = {(a, t): A.minimal(v, t, a, x) for a in ("fgsm", "blur", "pixel") for t in ("network", "cache")}
    for k, cpu in out["cpu"].items():
        gpu = out["cuda"][k]
        agree = float((cpu.success == gpu.success).float().mean())
        assert agree >= 0.95, k
        both = cpu.success & gpu.success
        close = torch.isclose(cpu.strength[both], gpu.strength[both], rtol=0.02)
        assert float(close.float().mean()) >= 0.9, k


def test_jacobians_on_cuda_give_the_cpus(data_dir):
    """Figure 4 on the GPU: the cache's keys on the device, the same norms and spectra."""
    from cacheviz.attacks import fp32
    from cacheviz.jacobian import jacobian_stats
    from cacheviz.progress import Silent
    from cacheviz.robustness import attack_sample, load_victims
    from cacheviz.study import Run

    out = {}
    for dev in ("cpu", "cuda"):
        ws, v, _ = load_victims(Setup(), Run(data_dir, dev, 256, Silent()))
        x = ws.spec.preprocess(ws.ds.test_x[attack_sample(ws.split.test_idx, 40, 0)]).to(v.device)
        with fp32():
            out[dev], _ = jacobian_stats(v, x, batch=16)
    for m in ("network", "cache", "cache-only"):
        cpu, gpu = out["cpu"], out["cuda"]
        assert torch.allclose(cpu.norms[m], gpu.norms[m], rtol=1e-3, atol=1e-7), m
        assert torch.allclose(cpu.singular_values[m][:, :3], gpu.singular_values[m][:, :3], rtol=1e-3, atol=1e-7), m
