"""Speed and memory goals of the engine, as ratios against limits measured in the same run.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--only abcdefghi] [--update-readme]
    python benchmarks/run.py --table-only [--update-readme]

Every timed benchmark runs 5 times, alternating with the limit it is set against (also run 5
times), after one untimed warm-up of each; it reports the median and min–max of both, the ratio
of the medians and the min–max of the per-run ratios. On CUDA every clock read follows a
`torch.cuda.synchronize()`.

(a) one-pass multi-layer extraction vs plain inference over the same 5000 images   goal <= 1.3x
(b) the full 9x9 theta x lam grid vs one (theta, lam) evaluation, same keys          goal <= 1.5x
(c) full CIFAR-10 `Evaluate`, ResNet20, layer3.0 keys, 50k cache, features cold (the
    `features/` and `results/` folders deleted before each run; the decoded dataset kept):
    wall time vs a lower bound measured in the same run: the engine's own `forward_layers`
    over the same images, stopping where the engine stops (training images up to layer3.0
    only, test images through the logits), plus the similarity GEMMs' FLOPs (5000 validation
    + 5000 test queries x 50000 keys x 4096 dims) at the GEMM rate measured at the engine's
    block shape. Goal <= 1.5x on the CPU, <= 2x on CUDA; and its peak memory.
(d) the ResNet20 layer sweep (Figure 2: all 22 layers from the input to the logits, whole
    training set as cache, 5000 test queries, 1024-d sign-sketch keys for wider layers),
    features cold: wall time vs the full forward pass over all 60k images plus each layer's
    GEMMs at its key dimension. Goal <= 2x on the CPU (and <= 8 GB), <= 3x on CUDA.
(e) how the projection dimension (exact, D = 256, 1024, 4096) changes accuracy, a few layers
    (accuracy, so one run).
(f) the two shortcuts `cacheviz.cache.SimilarityBlock` relies on, on a 671 x 50000 block of
    real layer3.0 similarities, 10 classes, the 9 thetas of the default grid: class masses as
    row-slice sums vs `w @ V`, and `p_mem_sweep` (one multiply per theta after the first) vs
    `p_mem` per theta (one exp each), end to end and the elementwise pass alone.
(g) Cache3's search: all 41 key sets of up to three of ResNet20's six stage-3 layers, tuned on
    the 9x9 grid and tested, at once (`study.score_key_sets`: one product per layer and query
    block for every set) vs one set at a time (`study.score_keys`), on a 10,000-item cache with
    1,000 validation + 1,000 test queries (3 runs each after a warm-up, alternating). Goal < 1x. Without the
    shared CIFAR-10: digits-cnn's 4 hidden layers (14 sets) on the bundled digits.

On the CPU, (c) and (d) run each time in a fresh process (`--worker`), timed around the study's
`run` (imports excluded), so that its peak RSS (`getrusage`) is the run's own. On CUDA they run
in this process with the CUDA context warm, after one untimed warm-up run of the same study on a
2000-item cache: process start and CUDA initialisation would otherwise dominate; peak memory is
then `torch.cuda.max_memory_allocated`. A benchmark that fails is reported and the others still
run; results are written after each benchmark (--results DIR puts them elsewhere).

(h) the robustness lab's Table 2 for ResNet20 (default keys and setup; theta, lam from its stored
    `Evaluate`, computed first, untimed), 250 test images (50 with --quick): the FGSM and the I-FGSM
    rows (minimal-perturbation search against the network, then the adversarials shown to the
    network, cache and cache-only models; 3 runs each, alternating) against a lower bound measured
    in the same run: the same number of plain batched network passes the search made (its input
    gradients as forward+backward passes, its label checks as forward passes) plus showing the
    clean and adversarial images to the three models (one network pass and one similarity
    product for them all). Goal <= 1.5x. Then the whole Table 2 (FGSM, I-FGSM, single pixel,
    blur) once, goal <= 15 min on the CPU and <= 1 min on one GPU.

(i) Figure 4's Jacobians of 1,000 CIFAR-10 test images (100 with --quick) for the three ResNet20
    models (`jacobian.jacobian_stats`: J, norms and all C singular values; theta, lam from the
    stored `Evaluate`, computed first, untimed) against a lower bound measured in the same run:
    per batch of images one forward pass with the similarity GEMMs (what the three models' outputs
    need) and 3C plain batched backward passes, one per output of each model (the three models'
    probability vectors are three different functions of x: C vector-Jacobian products each).
    One warm-up batch each, then 1 run each on the CPU (about 6 minutes a run), 3 alternating
    on CUDA. Goal <= 2x. On CUDA also the whole test part once: goal <= 2 minutes.

(c), (d), (e), (h), (i) need the shared CIFAR-10 and ResNet20 checkpoint (../shared, or --shared DIR);
without them, (a), (b) and (f) run on random images with a randomly initialised ResNet20, which
costs the same. The data directory is a fresh temporary one (or --data-dir, reused) holding a
link to the shared CIFAR-10 and a copy of the checkpoint; the dataset is decoded into it once,
up front, outside every timing.

Results: benchmarks/results/latest.json (CPU) or latest-cuda.json (CUDA), each with the device
name, torch version and CPU count; --quick (tiny sizes, for a smoke run) writes quick.json or
quick-cuda.json instead and never touches the README. --update-readme rewrites only the text
between <!-- bench:start --> and <!-- bench:end --> in README.md, from both results files.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from cacheviz.cache import SIM_BLOCK_BYTES, CacheMemory, class_shares
from cacheviz.config import Setup
from cacheviz.features import extract, forward_layers, list_layers, make_keys
from cacheviz.models import load_model
from cacheviz.store import atomic_write_json
from cacheviz.tuning import default_grid, grid_search, predict
from cacheviz.workspace import machine_memory_bytes

FORMAT = 2  # of the results files; older ones are not merged into a new run
REPS = 5
BATCH = 256  # the engine's default batch size
CKPT = "resnet20-12fca82f.th"
MARKER = ".cacheviz-benchmark"  # marks a data directory this script made (it deletes features/ there)
LETTERS = "abcdefghi"
# --quick: tiny caches and test sets for (c), (d), (e)
QUICK_LIMITS = {"train_limit": 2000, "test_limit": 1000}
SWEEP_DIM = 1024  # (d): the CLI's default --project-dim for sweep-layers
GOALS = {"a": 1.3, "b": 1.5, "c": {"cpu": 1.5, "cuda": 2.0}, "d": {"cpu": 2.0, "cuda": 3.0}}
D_MEM_GOAL_GB = 8.0


# ---------------------------------------------------------------------------------------------
# Timing


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def clock(fn: Callable[[], object], device) -> float:
    """Seconds of one call; on CUDA the queue is drained before both clock reads."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], device, reps: int = REPS, warmup: bool = True
              ) -> dict[str, list[float]]:
    """Each function `reps` times, taking turns, so drift on the machine hits all of them."""
    if warmup:
        for fn in fns.values():
            clock(fn, device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(clock(fn, device))
    return times


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": list(xs)}


def compare(measured: list[float], limit: list[float], goal) -> dict:
    """Median and min–max of both, ratio of the medians, min–max of the per-run ratios."""
    per_run = [m / lim for m, lim in zip(measured, limit)]
    return {"time": stats(measured), "limit": stats(limit),
            "ratio": statistics.median(measured) / statistics.median(limit),
            "ratio_runs": stats(per_run), "goal": goal}


# ---------------------------------------------------------------------------------------------
# Data directory, model, images


def find_shared(given: str | None) -> Path | None:
    """The shared folder with CIFAR-10 and the ResNet20 checkpoint, or None."""
    candidates = [Path(given)] if given else [REPO.parent / "shared", REPO / "shared"]
    for p in candidates:
        if (p / "data" / "cifar10" / "test").is_dir() and (p / "weights" / CKPT).exists():
            return p.resolve()
    return None


def setup_data_dir(root: Path, shared: Path | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()) and not (root / MARKER).exists():
        sys.exit(f"benchmarks/run.py: {root} is not empty and was not made by this script; give --data-dir an "
                 "empty or new directory (the benchmarks delete its features/ and results/).")
    (root / MARKER).touch()
    (root / "checkpoints").mkdir(exist_ok=True)
    if shared is not None:
        if not (root / "cifar10").exists():
            (root / "cifar10").symlink_to(shared / "data" / "cifar10")
        if not (root / "checkpoints" / CKPT).exists():
            shutil.copy(shared / "weights" / CKPT, root / "checkpoints")
    return root


def resnet20(data_dir: Path, real: bool):
    if real:
        return load_model("resnet20", data_dir)
    from cacheviz.models import build_cifar_resnet

    ckpt = data_dir / "checkpoints" / "random-resnet20.th"
    if not ckpt.exists():
        torch.save({"state_dict": build_cifar_resnet(20).state_dict()}, ckpt)
    return load_model("resnet20", data_dir, checkpoint=ckpt)


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def clean(data_dir: Path) -> None:
    """Features cold: drop stored features and results; the decoded dataset stays."""
    shutil.rmtree(data_dir / "features", ignore_errors=True)
    shutil.rmtree(data_dir / "results", ignore_errors=True)


def free_gpu(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()  # so the engine's "features fit in half the free memory" sees it all


def fp32_inference():
    """The numerics `extract` runs under: inference mode, full float32 convolutions (no TF32)."""
    return torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


def plain_inference(spec, x: torch.Tensor, device) -> None:
    mode, flags = fp32_inference()
    with mode, flags:
        for s in range(0, len(x), BATCH):
            spec.net(spec.preprocess(x[s : s + BATCH].to(device)))


def engine_pass(spec, x: torch.Tensor, layers: list[str], device) -> None:
    """The engine's own forward (`forward_layers`: it stops after the deepest wanted layer unless
    `logits` is wanted) over `x`, batch by batch as `extract` feeds it; outputs dropped."""
    mode, flags = fp32_inference()
    with mode, flags:
        for s in range(0, len(x), BATCH):
            forward_layers(spec, spec.preprocess(x[s : s + BATCH].to(device)), layers)


def block_rows(k_items: int) -> int:
    """Queries per similarity block for a K-item cache: `CacheMemory.chunk_rows`'s rule (671 for 50k)."""
    return max(1, SIM_BLOCK_BYTES // (4 * k_items))


class GemmProbe:
    """Seconds of one similarity block (the engine's `chunk_rows` queries x K keys x d) at a shape."""

    def __init__(self, device, reps: int):
        self.device, self.reps = torch.device(device), reps
        self._ops: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _operands(self, rows: int, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (rows, k, d) not in self._ops:
            g = torch.Generator(device=self.device).manual_seed(0)
            a = torch.randn(rows, d, generator=g, device=self.device)
            b = torch.randn(k, d, generator=g, device=self.device)
            self._ops[(rows, k, d)] = (a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True))
        return self._ops[(rows, k, d)]

    def rate(self, rows: int, k: int, d: int) -> float:
        """FLOP/s of a (rows, d) x (d, k) GEMM: median of `reps` (after one warm-up)."""
        a, b = self._operands(rows, k, d)
        clock(lambda: a @ b.T, self.device)
        t = statistics.median(clock(lambda: a @ b.T, self.device) for _ in range(self.reps))
        return 2 * a.shape[0] * k * d / t

    def free(self) -> None:
        if is_cuda(self.device):  # on the CPU the operands are kept: drawing 200M normals is slow
            self._ops.clear()
            free_gpu(self.device)


# ---------------------------------------------------------------------------------------------
# (a), (b)


def bench_extraction(spec, x: torch.Tensor, device) -> dict:
    layers = list(spec.default_layers) + ["layer3.2", "logits"]
    spec.net.to(device).eval()
    out_dev = device  # the engine keeps features on the GPU while they fit
    t = alternate({"plain": lambda: plain_inference(spec, x, device),
                   "extract": lambda: extract(spec, x, layers, device=device, out_device=out_dev)}, device)
    return {"images": len(x), "layers": layers, **compare(t["extract"], t["plain"], GOALS["a"])}


def bench_grid(n_query: int, k_items: int, d: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(k_items, d, generator=g), dim=1)
    labels = torch.arange(k_items) % 10
    q = torch.nn.functional.normalize(torch.randn(n_query, d, generator=g), dim=1)
    # queries near some keys, as real ones are, so the softmax is not flat
    q = torch.nn.functional.normalize(q + 3 * keys[:n_query], dim=1).to(device)
    y = labels[:n_query].to(device)
    p_net = torch.softmax(torch.randn(n_query, 10, generator=g), dim=1).to(device)
    mem = CacheMemory(keys, labels, 10, device=device)
    thetas, lams = default_grid(9, 9)
    t = alternate({"one": lambda: predict(mem, q, p_net, [(50.0, 0.5)]),
                   "grid": lambda: grid_search(mem, q, p_net, y, thetas, lams)}, device)
    return {"queries": n_query, "cache": k_items, "dim": d, **compare(t["grid"], t["one"], GOALS["b"])}


# ---------------------------------------------------------------------------------------------
# (c), (d): the studies, and their lower bounds


def setup_for(which: str, quick: bool) -> Setup:
    limits = QUICK_LIMITS if quick else {}
    if which == "c":
        return Setup(dataset="cifar10", model="resnet20", layers=("layer3.0",), **limits)
    return Setup(dataset="cifar10", model="resnet20", project_dim=SWEEP_DIM, **limits)


def study_for(which: str, quick: bool):
    from cacheviz.experiment import Evaluate
    from cacheviz.sweeps import LayerSweep

    setup = setup_for(which, quick)
    return Evaluate(setup) if which == "c" else LayerSweep(setup)  # (d): layers None = all of them


def run_study(which: str, data_dir: Path, device: str, quick: bool) -> dict:
    """One timed, features-cold run of study (c) or (d) in this process: wall seconds, peak
    memory (CUDA: max_memory_allocated; CPU: this process's peak RSS) and what it found."""
    study = study_for(which, quick)
    clean(data_dir)
    free_gpu(device)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
    box = {}
    wall = clock(lambda: box.setdefault("r", study.run(data_dir, device=device, force=True)), device)
    if is_cuda(device):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss / 2**30 if sys.platform == "darwin" else rss * 1024 / 2**30
    r = box["r"]
    if which == "c":
        found = {k: r[k] for k in ("baseline_acc", "cache_acc", "cache_only_acc", "knn_acc", "theta", "lam",
                                   "n_cache", "n_val", "n_test", "key_dim", "seconds")}
    else:
        found = {"n_cache": r[0]["n_cache"], "n_test": r[0]["n_test"], "baseline_acc": r[0]["baseline_acc"],
                 "rows": [{k: row[k] for k in ("layer", "depth", "dim", "acc")} for row in r]}
    return {"wall_s": wall, "peak_gb": peak, "found": found}


def run_study_fresh(which: str, data_dir: Path, quick: bool) -> dict:
    """`run_study` on the CPU in a fresh process (`--worker`), so peak RSS is that run's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--data-dir", str(data_dir),
           "--device", "cpu"] + (["--quick"] if quick else [])
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in p.stdout.splitlines() if line.startswith("BENCH ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark ({which}) worker failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("BENCH "):])


class Bound:
    """The images a study extracts and the similarity GEMMs it does, to time at best."""

    def __init__(self, which: str, quick: bool, ds, spec):
        from cacheviz.data import make_split

        setup = setup_for(which, quick)
        sp = make_split(ds, seed=setup.seed, val_from_train=setup.val_from_train, val_fraction=setup.val_fraction,
                        train_limit=setup.train_limit, test_limit=setup.test_limit)
        from_train = sp.val_part == "train"
        test_u = sp.test_idx if from_train else torch.unique(torch.cat([sp.test_idx, sp.val_idx]))
        self.train_x, self.test_x = ds.train_x[sp.cache_test_idx], ds.test_x[test_u]
        self.n_cache, self.n_val, self.n_test = len(sp.cache_test_idx), len(sp.val_idx), len(sp.test_idx)
        n_cache_val = len(sp.cache_val_idx)
        if which == "c":
            layers = list(setup.layers)
            # as ExperimentData: logits for training images only when validation comes from them
            self.train_layers = layers + (["logits"] if from_train else [])
            self.test_layers = layers + ["logits"]
            d = sum(i.dim for i in list_layers(spec) if i.name in layers)
            # the grid on validation queries vs the validation cache, then the test queries
            self.gemms = {d: 2 * d * (self.n_val * n_cache_val + self.n_test * self.n_cache)}
        else:
            self.train_layers = self.test_layers = ["logits"]  # every layer: the full pass
            self.gemms = {}
            for info in list_layers(spec):  # theta, lam given: test queries only, per layer
                d = min(info.dim, SWEEP_DIM)
                self.gemms[d] = self.gemms.get(d, 0) + 2 * d * self.n_test * self.n_cache
        self.n_images = len(self.train_x) + len(self.test_x)
        # the engine's block: chunk_rows queries at a time, or all of them when fewer
        self.rows = min(block_rows(self.n_cache), max(self.n_val, self.n_test))

    def measure(self, spec, device, probe: GemmProbe) -> dict:
        t_train = clock(lambda: engine_pass(spec, self.train_x, self.train_layers, device), device)
        t_test = clock(lambda: engine_pass(spec, self.test_x, self.test_layers, device), device)
        gemm_s, rates = 0.0, {}
        for d, flops in self.gemms.items():
            rates[d] = probe.rate(self.rows, self.n_cache, d)
            gemm_s += flops / rates[d]
        probe.free()
        return {"train_s": t_train, "test_s": t_test, "gemm_s": gemm_s,
                "gflops": {str(d): r / 1e9 for d, r in rates.items()}, "bound_s": t_train + t_test + gemm_s}


def bench_study(which: str, data_dir: Path, spec, ds, device, quick: bool) -> dict:
    cuda = is_cuda(device)
    bound = Bound(which, quick, ds, spec)
    spec.net.to(device).eval()
    probe = GemmProbe(device, reps=5 if cuda else 2)
    engine_pass(spec, bound.test_x[:BATCH], bound.test_layers, device)  # warm-up of the bound's pass
    if cuda:  # one untimed run of the study (on a small cache: it only warms the CUDA context,
        run_study(which, data_dir, device, quick=True)  # cuDNN, cuBLAS and the kernels)
    bounds, runs = [], []
    for i in range(REPS):
        bounds.append(bound.measure(spec, device, probe))
        runs.append(run_study(which, data_dir, device, quick) if cuda else run_study_fresh(which, data_dir, quick))
        print(f"  ({which}) run {i + 1}/{REPS}: {runs[-1]['wall_s']:.2f} s, bound {bounds[-1]['bound_s']:.2f} s",
              file=sys.stderr, flush=True)
    probe.free()
    clean(data_dir)
    goal = GOALS[which]["cuda" if cuda else "cpu"]
    out = {
        **compare([r["wall_s"] for r in runs], [b["bound_s"] for b in bounds], goal),
        "images": bound.n_images, "n_cache": bound.n_cache, "n_val": bound.n_val, "n_test": bound.n_test,
        "train_images": len(bound.train_x), "test_images": len(bound.test_x),
        "train_layers": bound.train_layers, "test_layers": bound.test_layers,
        "gemm_gflop": {str(d): f / 1e9 for d, f in bound.gemms.items()},
        "train_pass_s": stats([b["train_s"] for b in bounds]), "test_pass_s": stats([b["test_s"] for b in bounds]),
        "gemm_s": stats([b["gemm_s"] for b in bounds]),
        "gemm_rate_gflops": {d: statistics.median(b["gflops"][d] for b in bounds) for d in bounds[0]["gflops"]},
        "peak_gb": stats([r["peak_gb"] for r in runs]),
        "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (getrusage)",
        "process": "in-process, CUDA context warm, after one untimed warm-up run (2000-item cache)" if cuda
        else "a fresh process per run, timed around the study's run (imports excluded)",
        "found": runs[-1]["found"], "quick": quick,
    }
    if cuda:
        out["machine_mem_gb"] = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    else:
        out["machine_mem_gb"] = machine_memory_bytes() / 2**30
    if which == "d":
        out["layers"] = len(runs[-1]["found"]["rows"])
        if not cuda:
            out["mem_goal_gb"] = D_MEM_GOAL_GB
    return out


def bench_projection(data_dir: Path, device, quick: bool) -> dict:
    from cacheviz.sweeps import LayerSweep

    layers = ["layer1.2", "layer2.2", "layer3.0", "layer3.2.relu1"]
    limits = QUICK_LIMITS if quick else {}
    out = {}
    for dim in (None, 256, 1024, 4096):
        setup = Setup(dataset="cifar10", model="resnet20", project_dim=dim, **limits)
        rows = LayerSweep(setup, layers=tuple(layers)).run(data_dir, device=device, force=True)
        out["exact" if dim is None else str(dim)] = {r["layer"]: {"acc": r["acc"], "dim": r["dim"]} for r in rows}
        free_gpu(device)
    clean(data_dir)
    return {"layers": layers, "acc": out, "quick": quick, **(limits if quick else {})}


# ---------------------------------------------------------------------------------------------
# (f): the SimilarityBlock shortcuts


def bench_block(spec, train_x, train_y, test_x, n_rows: int, device, real: bool) -> dict:
    """Class mass by slices vs w @ V, and the theta sweep's multiplies vs one exp per theta,
    on one (n_rows, K) block of layer3.0 similarities."""
    layer = ["layer3.0"]
    keys = make_keys(extract(spec, train_x, layer, device=device, out_device=device), layer)
    q = make_keys(extract(spec, test_x[:n_rows], layer, device=device, out_device=device), layer)
    mem = CacheMemory(keys, train_y, 10, device=device)  # groups keys by class, as the engine does
    sims = q @ mem.keys.T
    thetas = default_grid(9, 9)[0]
    block = mem.block(sims)  # (bounds) slices
    w = torch.exp(block.shifted * 50.0)
    mass = alternate({"slices": lambda: class_shares(w, mem.values, mem.bounds, "slices"),
                      "matmul": lambda: class_shares(w, mem.values, None, "matmul")}, device)
    sweep = alternate({"sweep": lambda: list(block.p_mem_sweep(thetas)),
                       "per_theta": lambda: [block.p_mem(t) for t in thetas]}, device)
    # the elementwise pass alone: what p_mem does per theta vs what p_mem_sweep does after the first
    buf, start = torch.empty_like(block.shifted), torch.exp(block.shifted * thetas[0])
    step = torch.exp(block.shifted * (thetas[1] - thetas[0]))

    def exp_pass():
        torch.mul(block.shifted, thetas[-1], out=buf)
        buf.exp_()

    elem = alternate({"multiply": lambda: torch.mul(start, step, out=buf), "exp": exp_pass}, device)
    # float32 exp below ~exp(-87.3) is subnormal; CPUs take a slow path there
    subnormal = float((block.shifted * thetas[-1] < -87.3).float().mean())
    out = {
        "block": list(sims.shape), "classes": 10, "thetas": thetas, "layer": "layer3.0",
        "data": "CIFAR-10 through the trained ResNet20" if real else "random images through a random ResNet20",
        "class_mass": compare(mass["slices"], mass["matmul"], 1.0),
        "sweep": compare(sweep["sweep"], sweep["per_theta"], 1.0),
        "elementwise": compare(elem["multiply"], elem["exp"], 1.0),
        "subnormal_share_theta90": subnormal,
    }
    return out


# ---------------------------------------------------------------------------------------------
# (g): Cache3's key sets at once


def bench_key_sets(data_dir: Path, device, real: bool, quick: bool) -> dict:
    import itertools

    from cacheviz.study import score_key_sets, score_keys
    from cacheviz.sweeps import cache3_candidates
    from cacheviz.workspace import ExperimentData, prepare

    if real:
        n = (2000, 500) if quick else (10000, 2000)
        setup = Setup(dataset="cifar10", model="resnet20", train_limit=n[0], test_limit=n[1])
    else:
        setup = Setup()
    ws = prepare(setup, data_dir, device)
    layers = cache3_candidates(ws.spec)
    data = ExperimentData(ws, layers)
    sets = [list(c) for size in (1, 2, 3) for c in itertools.combinations(layers, size)]
    thetas, lams = default_grid(9, 9)
    t = alternate({"at_once": lambda: score_key_sets(data, sets, thetas, lams),
                   "one_at_a_time": lambda: [score_keys(data, s_, thetas, lams) for s_ in sets]},
                  device, reps=3)
    return {"model": ws.spec.name, "layers": layers, "sets": len(sets), "n_cache": len(data.y_cache),
            "n_val": len(data.y_val), "n_test": len(data.y_test),
            **compare(t["at_once"], t["one_at_a_time"], 1.0)}


H_GOAL = 1.5
H_TABLE2_GOAL_S = {"cpu": 15 * 60, "cuda": 60}


def bench_attacks(data_dir: Path, device, quick: bool) -> dict:
    from cacheviz import attacks as A
    from cacheviz.progress import Silent
    from cacheviz.robustness import attack_sample, load_victims
    from cacheviz.study import Run

    setup = Setup(dataset="cifar10", model="resnet20", **(QUICK_LIMITS if quick else {}))
    n = 50 if quick else 250
    run = Run(data_dir, device, BATCH, Silent())
    ws, v, _ = load_victims(setup, run)
    idx = attack_sample(ws.split.test_idx, n, 0)
    x = ws.spec.preprocess(ws.ds.test_x[idx].to(v.device))
    batch = 128  # the study's attack batch
    model = v.log_probs("network")
    out: dict = {"model": ws.spec.name, "layers": v.layers, "n": n, "n_cache": len(v.memory),
                 "key_dim": v.memory.dim}

    def row(attack: str) -> dict:
        res = A.minimal(v, "network", attack, x, batch=batch)
        adv = res.x_adv.to(v.device)
        v.predict_all(x)
        v.predict_all(adv)
        return {"evaluations": res.evaluations, "gradients": res.gradients, "success": int(res.success.sum())}

    for attack in ("fgsm", "ifgsm"):
        counts = row(attack)  # the warm-up run also gives the pass counts of the bound
        labels = v.predict("network", x, batch)
        reps = -(-batch // n)
        pool_x, pool_y = x.repeat(reps, 1, 1, 1)[:batch], labels.repeat(reps)[:batch]  # one full batch

        def bound():
            for k in range(0, counts["gradients"], batch):
                m = min(batch, counts["gradients"] - k)
                A.input_gradient(model, pool_x[:m], pool_y[:m])
            with torch.no_grad():
                for k in range(0, counts["evaluations"], batch):
                    v.probs("network", pool_x[:min(batch, counts["evaluations"] - k)])
            v.predict_all(x)
            v.predict_all(x)

        t = alternate({"search": lambda: row(attack), "bound": bound}, device, reps=3, warmup=False)
        out[attack] = {**counts, **compare(t["search"], t["bound"], H_GOAL)}
    whole = {}
    for attack in ("fgsm", "ifgsm", "pixel", "blur"):
        whole[attack] = clock(lambda: row(attack), device)
    out["table2_s"] = whole
    out["table2_goal_s"] = H_TABLE2_GOAL_S["cuda" if is_cuda(device) else "cpu"]
    return out


I_GOAL = 2.0
I_WHOLE_GOAL_S = 120.0  # the whole test part on one GPU


def bench_jacobians(data_dir: Path, device, quick: bool) -> dict:
    from cacheviz.attacks import fp32
    from cacheviz.jacobian import JACOBIAN_BATCH, _outputs, jacobian_stats
    from cacheviz.progress import Silent
    from cacheviz.robustness import attack_sample, load_victims
    from cacheviz.study import Run

    setup = Setup(dataset="cifar10", model="resnet20", **(QUICK_LIMITS if quick else {}))
    n = 100 if quick else 1000
    run = Run(data_dir, device, BATCH, Silent())
    with fp32():
        ws, v, _ = load_victims(setup, run)
    test_idx = ws.split.test_idx
    x = ws.spec.preprocess(ws.ds.test_x[attack_sample(test_idx, n, 0)].to(v.device))
    c = len(ws.ds.classes)
    batch = JACOBIAN_BATCH

    def ours(xs=x):
        with fp32():
            jacobian_stats(v, xs, batch=batch)

    def bound(xs=x):
        with fp32():
            for s in range(0, len(xs), batch):
                xb = xs[s:s + batch].detach().requires_grad_(True)
                with torch.enable_grad():
                    flat = _outputs(v, xb).reshape(len(xb), -1)  # (B, 3C)
                    for k in range(flat.shape[1]):
                        torch.autograd.grad(flat[:, k].sum(), xb, retain_graph=k < flat.shape[1] - 1)

    cuda = is_cuda(device)
    ours(x[:batch])  # warm-up: one batch each
    bound(x[:batch])
    t = alternate({"ours": ours, "bound": bound}, device, reps=3 if cuda else 1, warmup=False)
    out = {"model": ws.spec.name, "layers": v.layers, "n": n, "classes": c, "n_cache": len(v.memory),
           "key_dim": v.memory.dim, "batch": batch, "backward_per_image": 3 * c,
           **compare(t["ours"], t["bound"], I_GOAL)}
    if cuda and not quick:
        xall = ws.spec.preprocess(ws.ds.test_x[test_idx].to(v.device))
        out["whole"] = {"n": len(xall), "seconds": clock(lambda: ours(xall), device), "goal_s": I_WHOLE_GOAL_S}
    return out


# ---------------------------------------------------------------------------------------------
# The README table


def _unit(t: float) -> tuple[float, str]:
    return (1.0, "s") if t >= 1 else (1e3, "ms")


def _digits(v: float) -> int:
    """Decimals that give three significant digits (none past the unit's third decimal)."""
    return 0 if v >= 100 else 1 if v >= 10 else 2 if v >= 1 else 3


def fmt_s(t: float) -> str:
    scale, unit = _unit(t)
    return f"{t * scale:.{_digits(t * scale)}f} {unit}"


def spread(s: dict) -> str:
    """'75.5 s (72.1–80.3)': median, then min–max in the median's unit and precision."""
    scale, unit = _unit(s["median"])
    n = _digits(s["median"] * scale)
    return f"{s['median'] * scale:.{n}f} {unit} ({s['min'] * scale:.{n}f}–{s['max'] * scale:.{n}f})"


def ratio_cell(r: dict) -> str:
    rr = r["ratio_runs"]
    return f"{r['ratio']:.2f}x ({rr['min']:.2f}–{rr['max']:.2f} per run)"


def speedup_cell(r: dict) -> str:
    rr = r["ratio_runs"]
    verdict = f"{1 / r['ratio']:.1f}x cheaper" if r["ratio"] < 1 else f"{r['ratio']:.2f}x dearer"
    return f"{r['ratio']:.3f}x ({rr['min']:.3f}–{rr['max']:.3f} per run): {verdict}"


def table(res: dict) -> str:
    """One device's results as Markdown rows (header included)."""
    cuda = res.get("machine", {}).get("device", "cpu") != "cpu"
    rows = ["| benchmark | median (min–max) | limit it is set against (median) | ratio (min–max) | goal |",
            "|---|---|---|---|---|"]
    a = res.get("a")
    if a:
        rows.append(f"| (a) extraction of {len(a['layers'])} layers, {a['images']} images | {spread(a['time'])} "
                    f"| plain inference, same images: {fmt_s(a['limit']['median'])} | {ratio_cell(a)} "
                    f"| <= {a['goal']}x |")
    b = res.get("b")
    if b:
        rows.append(f"| (b) 9x9 theta x lam grid, {b['queries']} queries x {b['cache']} keys x {b['dim']}-d "
                    f"| {spread(b['time'])} | one (theta, lam) evaluation: {fmt_s(b['limit']['median'])} "
                    f"| {ratio_cell(b)} | <= {b['goal']}x |")
    how = "in-process, warm" if cuda else "fresh process"
    c = res.get("c")
    if c:
        rate = next(iter(c["gemm_rate_gflops"].values()))
        rows.append(
            f"| (c) CIFAR-10 evaluate, ResNet20 layer3.0, {c['n_cache']} cache, {c['n_val']} val + {c['n_test']} test "
            f"(features cold, {how}) | {spread(c['time'])} | forward to layer3.0 over {c['train_images']} training "
            f"images {fmt_s(c['train_pass_s']['median'])} + through the logits over {c['test_images']} test images "
            f"{fmt_s(c['test_pass_s']['median'])} + GEMMs {fmt_s(c['gemm_s']['median'])} at {rate:,.0f} GFLOP/s "
            f"= {fmt_s(c['limit']['median'])} | {ratio_cell(c)} | <= {c['goal']}x |")
        mem = "GPU memory allocated" if cuda else "RSS"
        rows.append(f"| (c) peak {mem} of that run | {c['peak_gb']['max']:.2f} GB (highest of {len(c['peak_gb']['runs'])} runs) "
                    f"| {'card' if cuda else 'machine'} memory {c['machine_mem_gb']:.1f} GB "
                    f"| {c['peak_gb']['max'] / c['machine_mem_gb']:.2f} | — |")
    d = res.get("d")
    if d:
        rates = ", ".join(f"{v:,.0f} GFLOP/s at {k}-d" for k, v in
                          sorted(d["gemm_rate_gflops"].items(), key=lambda kv: -int(kv[0])))
        rows.append(
            f"| (d) ResNet20 layer sweep, {d['layers']} layers, {d['n_cache']} cache, {d['n_test']} test "
            f"(features cold, {how}) | {spread(d['time'])} | full forward over {d['images']} images "
            f"{fmt_s(d['train_pass_s']['median'] + d['test_pass_s']['median'])} + GEMMs "
            f"{fmt_s(d['gemm_s']['median'])} ({rates}) = {fmt_s(d['limit']['median'])} | {ratio_cell(d)} "
            f"| <= {d['goal']}x |")
        if cuda:
            rows.append(f"| (d) peak GPU memory allocated in that run | {d['peak_gb']['max']:.2f} GB "
                        f"(highest of {len(d['peak_gb']['runs'])} runs) | card memory {d['machine_mem_gb']:.1f} GB "
                        f"| {d['peak_gb']['max'] / d['machine_mem_gb']:.2f} | — |")
        else:
            rows.append(f"| (d) peak RSS of that run | {d['peak_gb']['max']:.2f} GB (highest of {len(d['peak_gb']['runs'])} runs) "
                        f"| goal {d['mem_goal_gb']:.0f} GB | {d['peak_gb']['max'] / d['mem_goal_gb']:.2f} | <= 1 |")
    if not any(k in res for k in "cde") and res.get("shared", "") is None:
        rows.append("| (c), (d), (e) | not run: the shared CIFAR-10 and ResNet20 checkpoint were not found | | | |")
    f = res.get("f")
    if f:
        shape = f"{f['block'][0]} x {f['block'][1]} block of layer3.0 similarities ({f['data']})"
        cm, sw, el = f["class_mass"], f["sweep"], f["elementwise"]
        rows.append(f"| (f) class masses as row-slice sums, {shape}, {f['classes']} classes | {spread(cm['time'])} "
                    f"| w @ V: {fmt_s(cm['limit']['median'])} | {speedup_cell(cm)} | < 1x |")
        rows.append(f"| (f) p_mem_sweep over {len(f['thetas'])} thetas (one multiply per theta after the first), same block "
                    f"| {spread(sw['time'])} | p_mem per theta (one exp each): {fmt_s(sw['limit']['median'])} "
                    f"| {speedup_cell(sw)} | < 1x |")
        rows.append(f"| (f) the elementwise pass alone: exp(theta_k s) as a multiply, same block | {spread(el['time'])} "
                    f"| one exp pass (theta = {f['thetas'][-1]:g}): {fmt_s(el['limit']['median'])} | {speedup_cell(el)} "
                    f"| < 1x |")
    g = res.get("g")
    if g:
        rows.append(f"| (g) Cache3's {g['sets']} key sets of {g['model']}'s {len(g['layers'])} candidate layers, "
                    f"{g['n_cache']} cache, {g['n_val']} val + {g['n_test']} test queries, all at once "
                    f"(`score_key_sets`) | {spread(g['time'])} | one set at a time (`score_keys`): "
                    f"{fmt_s(g['limit']['median'])} | {speedup_cell(g)} | < 1x |")
    h = res.get("h")
    if h:
        for attack, label in (("fgsm", "FGSM"), ("ifgsm", "I-FGSM")):
            r = h[attack]
            rows.append(f"| (h) Table 2's {label} row, {h['model']}, {h['n']} images ({len(r['time']['runs'])} runs): "
                        f"minimal search against the network "
                        f"({r['gradients']:,} input gradients, {r['evaluations']:,} label checks), shown to the three "
                        f"models ({h['n_cache']:,} keys x {h['key_dim']:,}-d) | {spread(r['time'])} | the same network "
                        f"passes, plain and batched, + one show pass: {fmt_s(r['limit']['median'])} | {ratio_cell(r)} "
                        f"| <= {r['goal']}x |")
        tot = sum(h["table2_s"].values())
        parts = ", ".join(f"{k} {fmt_s(t)}" for k, t in h["table2_s"].items())
        rows.append(f"| (h) the whole Table 2 (four attacks x three models), {h['n']} images, once | {fmt_s(tot)} "
                    f"({parts}) | goal {fmt_s(h['table2_goal_s'])} | {tot / h['table2_goal_s']:.2f} | <= 1 |")
    i = res.get("i")
    if i:
        rows.append(f"| (i) Figure 4: Jacobians (all {i['classes']} singular values) of {i['n']:,} test images for the "
                    f"three {i['model']} models ({i['n_cache']:,} keys x {i['key_dim']:,}-d), "
                    f"{len(i['time']['runs'])} run{'s' if len(i['time']['runs']) > 1 else ''} | {spread(i['time'])} "
                    f"| one forward with the similarity GEMMs + {i['backward_per_image']} plain backward passes per "
                    f"image, batched: {fmt_s(i['limit']['median'])} | {ratio_cell(i)} | <= {i['goal']}x |")
        w = i.get("whole")
        if w:
            rows.append(f"| (i) Jacobians of the whole test part ({w['n']:,} images), once | {fmt_s(w['seconds'])} "
                        f"| goal {fmt_s(w['goal_s'])} | {w['seconds'] / w['goal_s']:.2f} | <= 1 |")
    e = res.get("e")
    if e:
        rows.append("")
        lim = f", {e['train_limit']}-item cache, {e['test_limit']}-item test set (--quick)" if e.get("quick") else ""
        rows.append(f"Projection dimension against test accuracy (layer alone as keys, theta = 50, lam = 0.5{lim}):")
        rows.append("")
        dims = sorted(e["acc"], key=lambda k: float("inf") if k == "exact" else int(k))
        rows.append("| layer | " + " | ".join(f"D = {k}" if k != "exact" else "exact" for k in dims) + " |")
        rows.append("|---|" + "---|" * len(dims))
        for layer in e["layers"]:
            cells = [f"{e['acc'][k][layer]['acc']:.2%} ({e['acc'][k][layer]['dim']}-d)" for k in dims]
            rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def heading(res: dict) -> str:
    m = res.get("machine", {})
    cmd = "python benchmarks/run.py" + (" --quick" if res.get("quick") else "")
    if m.get("device", "cpu") == "cpu":
        return (f"On the CPU ({m.get('cpus')} cores, torch {m.get('torch')}, `{cmd}`); "
                f"each time is the median (min–max) of {res.get('reps', REPS)} runs:")
    return (f"On one {m['device']} (`{cmd} --device cuda`, torch {m.get('torch')}, CUDA {m.get('cuda')}); "
            f"median (min–max) of {res.get('reps', REPS)} runs; (c) and (d) run in-process, the CUDA context "
            f"warm after one untimed run of the same study on a 2000-item cache (process start and CUDA "
            f"initialisation, a few seconds, are not counted):")


def render(*results: dict) -> str:
    parts = [f"{heading(r)}\n\n{table(r)}" for r in results if r]
    return "\n\n".join(parts) if parts else "(no benchmark results yet: run `python benchmarks/run.py`)"


def load_results(name: str) -> dict:
    path = RESULTS / name
    if not path.exists():
        return {}
    res = json.loads(path.read_text())
    return res if res.get("format") == FORMAT else {}


def update_readme(md: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        print(f"README.md has no {start} ... {end} markers; left it alone.", file=sys.stderr)
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{md}\n{end}{tail}")


# ---------------------------------------------------------------------------------------------


def machine(device: str) -> dict:
    m = {"device": torch.cuda.get_device_name(torch.device(device)) if is_cuda(device) else "cpu",
         "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
         "platform": platform.platform(),
         "memory_gb": round(machine_memory_bytes() / 2**30, 1)}
    if is_cuda(device):
        m["cuda"] = torch.version.cuda
        m["gpu_memory_gb"] = round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine runs (default cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 5 runs of tiny sizes; writes results/quick*.json, never the README")
    ap.add_argument("--only", help="which benchmarks to run, e.g. ab (default abcdefghi; on cuda abcdfghi)")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the table between the README's bench markers")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from results/latest*.json")
    ap.add_argument("--shared", help="folder with data/cifar10 and weights/ (default ../shared)")
    ap.add_argument("--data-dir", help="reuse this data directory (new or made by this script) instead of a temp one")
    ap.add_argument("--results", help="folder for the results files (default benchmarks/results); each "
                    "benchmark's result is written as soon as it is done")
    ap.add_argument("--worker", choices=["c", "d"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    global RESULTS
    if args.results:
        RESULTS = Path(args.results).resolve()
    if args.worker:  # one fresh-process run of (c) or (d); the parent reads the BENCH line
        print("BENCH " + json.dumps(run_study(args.worker, Path(args.data_dir), args.device, args.quick)), flush=True)
        return 0
    if args.table_only:
        md = render(load_results("latest.json"), load_results("latest-cuda.json"))
        print(md)
        if args.update_readme:
            update_readme(md)
        return 0
    if args.quick and args.update_readme:
        print("benchmarks/run.py: --quick numbers are a smoke test and never go into the README; "
              "drop --quick or --update-readme.", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/run.py: --device cuda needs a GPU that torch {torch.__version__} can use, and this "
              "machine has none; run without --device here, or on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    only = args.only if args.only is not None else ("abcdfghi" if args.device == "cuda" else LETTERS)
    if not only or set(only) - set(LETTERS):
        print(f"benchmarks/run.py: --only takes letters from {LETTERS}, e.g. --only ab; got {only!r}.", file=sys.stderr)
        return 2
    device, quick = args.device, args.quick
    shared = find_shared(args.shared)
    if args.shared and shared is None:
        print(f"benchmarks/run.py: {args.shared} has no data/cifar10/{{train,test}} and weights/{CKPT}.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    res = {"format": FORMAT, "machine": machine(device), "quick": quick, "reps": REPS,
           "shared": str(shared) if shared else None}
    print(f"benchmarks on {res['machine']['device']}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"CIFAR-10 {'from ' + str(shared) if shared else 'not found: random data, (c)-(e) skipped'}",
          file=sys.stderr, flush=True)
    with (nullcontext(args.data_dir) if args.data_dir else tempfile.TemporaryDirectory()) as tmp:
        data_dir = setup_data_dir(Path(tmp), shared)
        real = shared is not None
        ds = None
        if real:  # decoded once, up front: every later load reads the tensor file
            from cacheviz.data import load_dataset

            t0 = time.perf_counter()
            ds = load_dataset("cifar10", data_dir)
            print(f"dataset ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        spec = resnet20(data_dir, real)

        name = ("quick" if quick else "latest") + ("-cuda" if device == "cuda" else "") + ".json"
        previous = {} if quick else load_results(name)
        if previous.get("machine", {}).get("device") != res["machine"]["device"]:
            previous = {}  # another card's rows would be labelled with this one
        failed = []

        def save() -> None:
            """Write the results so far, with the last ones of benchmarks not (yet) run this time
            (so --only reruns a part, and a run cut short keeps what it finished)."""
            out = dict(res)
            for k in LETTERS:
                if k not in out and k in previous:
                    out[k] = previous[k]
            out["table"] = table(out)
            RESULTS.mkdir(parents=True, exist_ok=True)
            atomic_write_json(RESULTS / name, out)

        def bench(k: str, fn: Callable[[], dict]) -> None:
            print(f"({k}) ...", file=sys.stderr, flush=True)
            try:
                res[k] = {**fn(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            except Exception:  # noqa: BLE001 -- one failure must not cost the others (GPU time is short)
                failed.append(k)
                print(f"({k}) FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                return
            finally:
                free_gpu(device)  # the benchmark's tensors went with its frame
            shown = {key: v for key, v in res[k].items() if key not in ("found", "acc")}
            print(f"({k})", json.dumps(shown, default=str)[:1500], file=sys.stderr, flush=True)
            save()

        def block_inputs():
            n_keys = 5000 if quick else 50000
            if real:
                return ds.train_x[:n_keys], ds.train_y[:n_keys], ds.test_x
            return random_images(n_keys), torch.arange(n_keys) % 10, random_images(1000, seed=1)

        n_a = 1000 if quick else 5000
        if "a" in only:
            bench("a", lambda: bench_extraction(spec, ds.test_x[:n_a] if real else random_images(n_a), device))
        if "b" in only:
            bench("b", lambda: bench_grid(1000 if quick else 5000, 10000 if quick else 50000, 4096, device))
        for k in "cd":
            if k in only and real:
                bench(k, lambda k=k: bench_study(k, data_dir, spec, ds, device, quick))
        if "e" in only and real:
            bench("e", lambda: bench_projection(data_dir, device, quick))
        if "f" in only:
            bench("f", lambda: bench_block(spec, *block_inputs(), block_rows(50000), device, real))
        if "g" in only:
            bench("g", lambda: bench_key_sets(data_dir, device, real, quick))
        if "h" in only and real:
            bench("h", lambda: bench_attacks(data_dir, device, quick))
        if "i" in only and real:
            bench("i", lambda: bench_jacobians(data_dir, device, quick))
    save()
    res = load_results(name) if (RESULTS / name).exists() else res
    md = res.get("table") or table(res)
    print(f"{heading(res)}\n\n{md}")
    print(f"\n(written to {RESULTS / name})", file=sys.stderr)
    if failed:
        print(f"benchmarks/run.py: ({'), ('.join(failed)}) failed (tracebacks above); their rows keep the "
              "last good results, if any.", file=sys.stderr)
        return 1
    if args.update_readme:
        both = [res, load_results("latest-cuda.json")] if device == "cpu" else [load_results("latest.json"), res]
        update_readme(render(*both))
    return 0


if __name__ == "__main__":
    sys.exit(main())
