"""Speed and memory goals of the engine, as ratios against this machine's own limits.

    python benchmarks/run.py [--quick] [--update-readme]

(a) one-pass multi-layer extraction vs plain inference over the same images   goal <= 1.3x
(b) the full 9x9 theta x lam grid vs one (theta, lam) evaluation, same keys     goal <= 1.5x
(c) full CIFAR-10 `evaluate`, ResNet20, layer3.0 keys, 50k cache, features cold:
    wall time vs a lower bound measured in the same run (plain inference over the 60k images
    + the similarity GEMMs' FLOPs at this machine's measured GEMM rate)            goal <= 1.5x
    and its peak memory against the machine's memory.
(d) the full ResNet20 layer sweep (Figure 2: all 22 layers, whole training set as cache,
    whole test set, 1024-d sign-sketch keys for wide layers), features cold: wall time vs one
    forward pass over train + test plus the similarity GEMMs; goal <= 2x and <= 8 GB.
(e) how the projection dimension (exact, D = 256, 1024, 4096) changes accuracy, a few layers.
(c), (d), (e) need ../shared (CIFAR-10 and the ResNet20 checkpoint); without it, (a) and (b) run on
random images with a randomly initialised ResNet20, which costs the same.
Writes benchmarks/results/latest.json and prints the README table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from cacheviz.cache import CacheMemory  # noqa: E402
from cacheviz.features import extract  # noqa: E402
from cacheviz.models import load_model  # noqa: E402
from cacheviz.store import atomic_write_json  # noqa: E402
from cacheviz.tuning import default_grid, grid_search, predict  # noqa: E402


def best_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_of_pair(fn_a, fn_b, reps: int = 3) -> tuple[float, float]:
    """Best times of two functions measured alternately, so drift on the machine hits both."""
    ta, tb = [], []
    for _ in range(reps):
        ta.append(best_of(fn_a, 1))
        tb.append(best_of(fn_b, 1))
    return min(ta), min(tb)


def have_shared() -> bool:
    return (SHARED / "data" / "cifar10" / "test").is_dir() and (SHARED / "weights" / "resnet20-12fca82f.th").exists()


def setup_data_dir(root: Path) -> Path:
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    if have_shared():
        if not (root / "cifar10").exists():
            (root / "cifar10").symlink_to(SHARED / "data" / "cifar10")
        shutil.copy(SHARED / "weights" / "resnet20-12fca82f.th", root / "checkpoints")
    return root


def resnet20(data_dir: Path):
    if have_shared():
        return load_model("resnet20", data_dir)
    from cacheviz.models import build_cifar_resnet

    ckpt = data_dir / "checkpoints" / "random-resnet20.th"
    torch.save({"state_dict": build_cifar_resnet(20).state_dict()}, ckpt)
    return load_model("resnet20", data_dir, checkpoint=ckpt)


def images(data_dir: Path, n: int) -> torch.Tensor:
    if have_shared():
        from cacheviz.data import load_dataset

        return load_dataset("cifar10", data_dir).test_x[:n]
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def plain_inference(spec, x: torch.Tensor, batch_size: int = 256) -> None:
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            spec.net(spec.preprocess(x[s : s + batch_size]))


def bench_extraction(spec, x: torch.Tensor) -> dict:
    layers = list(spec.default_layers) + ["layer3.2", "logits"]
    plain_inference(spec, x[:512])  # warm-up
    t_plain, t_multi = best_of_pair(lambda: plain_inference(spec, x), lambda: extract(spec, x, layers))
    return {"images": len(x), "layers": layers, "plain_s": t_plain, "extract_s": t_multi,
            "ratio": t_multi / t_plain, "goal": 1.3}


def gemm_rate(n: int, k_items: int, d: int) -> float:
    """FLOP/s of the similarity GEMM at the block shape the engine uses."""
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    b = torch.nn.functional.normalize(torch.randn(k_items, d), dim=1)
    a @ b.T
    t = best_of(lambda: a @ b.T, reps=5)
    return 2 * n * k_items * d / t


def bench_grid(n_query: int, k_items: int, d: int) -> dict:
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(k_items, d, generator=g), dim=1)
    labels = torch.arange(k_items) % 10
    q = torch.nn.functional.normalize(torch.randn(n_query, d, generator=g), dim=1)
    # queries near some keys, as real ones are, so the softmax is not flat
    q = torch.nn.functional.normalize(q + 3 * keys[:n_query], dim=1)
    y = labels[:n_query]
    p_net = torch.softmax(torch.randn(n_query, 10, generator=g), dim=1)
    mem = CacheMemory(keys, labels, 10)
    thetas, lams = default_grid(9, 9)
    t_one, t_grid = best_of_pair(lambda: predict(mem, q, p_net, [(50.0, 0.5)]),
                                 lambda: grid_search(mem, q, p_net, y, thetas, lams))
    return {"queries": n_query, "cache": k_items, "dim": d, "one_s": t_one, "grid_s": t_grid,
            "ratio": t_grid / t_one, "goal": 1.5}


def bench_inference(data_dir: Path) -> float:
    """Seconds of plain ResNet20 inference over all 60k CIFAR-10 images."""
    from cacheviz.data import load_dataset

    ds = load_dataset("cifar10", data_dir)  # decoded once into the tensor file, outside the timing
    spec = load_model("resnet20", data_dir)
    all_x = torch.cat([ds.train_x, ds.test_x])
    plain_inference(spec, all_x[:512])
    t0 = time.perf_counter()
    plain_inference(spec, all_x)
    return time.perf_counter() - t0


def bench_evaluate(data_dir: Path) -> dict:
    t_infer = bench_inference(data_dir)
    n_cache, n_val, n_test, d = 50000, 5000, 5000, 4096
    rate = gemm_rate(671, n_cache, d)
    flops = 2 * (n_val + n_test) * n_cache * d
    bound = t_infer + flops / rate
    shutil.rmtree(data_dir / "features", ignore_errors=True)
    shutil.rmtree(data_dir / "results", ignore_errors=True)
    out = data_dir / "evaluate.json"
    cmd = [sys.executable, "-m", "cacheviz", "evaluate", "--dataset", "cifar10", "--model", "resnet20",
           "--layers", "layer3.0", "--data-dir", str(data_dir), "--device", "cpu", "--force", "--json", str(out)]
    wall, peak_gb = _run_cli(cmd[3:])
    peak = peak_gb * 2**30
    r = json.loads(out.read_text())
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "wall_s": wall, "inference_60k_s": t_infer, "gemm_gflops": rate / 1e9, "gemm_s": flops / rate,
        "bound_s": bound, "ratio": wall / bound, "goal": 1.5, "peak_rss_gb": peak / 2**30,
        "machine_mem_gb": mem_total / 2**30, "mem_ratio": peak / mem_total,
        "baseline_acc": r["baseline_acc"], "cache_acc": r["cache_acc"], "cache_only_acc": r["cache_only_acc"],
        "theta": r["theta"], "lam": r["lam"],
    }


def _run_cli(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one `python -m cacheviz` run in a fresh process."""
    code = ("import resource, runpy, sys, time; t = time.perf_counter(); sys.argv = ['cacheviz'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('cacheviz', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('BENCH', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30)")
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True)
    line = [l for l in p.stdout.splitlines() if l.startswith("BENCH")][-1]
    _, wall, peak = line.split()
    return float(wall), float(peak)


def bench_layer_sweep(data_dir: Path, t_infer: float, rate: float) -> dict:
    shutil.rmtree(data_dir / "features", ignore_errors=True)
    shutil.rmtree(data_dir / "results", ignore_errors=True)
    out = data_dir / "sweep.json"
    wall, peak = _run_cli(["sweep-layers", "--dataset", "cifar10", "--model", "resnet20", "--data-dir", str(data_dir),
                           "--device", "cpu", "--project-dim", "1024", "--force", "--out", str(out)])
    rows = json.loads(out.read_text())
    n_cache, n_test = rows[0]["n_cache"], rows[0]["n_test"]
    gemm_s = sum(2 * n_test * n_cache * r["dim"] for r in rows) / rate
    bound = t_infer + gemm_s
    best = max(rows, key=lambda r: r["acc"])
    return {"layers": len(rows), "wall_s": wall, "peak_rss_gb": peak, "inference_60k_s": t_infer, "gemm_s": gemm_s,
            "bound_s": bound, "ratio": wall / bound, "goal": 2.0, "mem_goal_gb": 8.0,
            "best_layer": best["layer"], "best_acc": best["acc"], "baseline_acc": rows[0]["baseline_acc"],
            "rows": [{k: r[k] for k in ("layer", "depth", "dim", "acc")} for r in rows]}


def bench_projection(data_dir: Path) -> dict:
    from cacheviz.config import Setup
    from cacheviz.sweeps import sweep_layers

    layers = ["layer1.2", "layer2.2", "layer3.0", "layer3.2.relu1"]
    out = {}
    for dim in (None, 256, 1024, 4096):
        rows = sweep_layers(Setup(dataset="cifar10", model="resnet20", project_dim=dim), data_dir, layers=layers,
                            device="cpu")
        out["exact" if dim is None else str(dim)] = {r["layer"]: {"acc": r["acc"], "dim": r["dim"]} for r in rows}
    return {"layers": layers, "acc": out}


def table(res: dict) -> str:
    rows = ["| benchmark | measured | limit it is set against | ratio | goal |", "|---|---|---|---|---|"]
    res = {**res, "machine": res.get("machine", {})}
    a, b = res["a"], res["b"]
    rows.append(f"| (a) extraction of {len(a['layers'])} layers, {a['images']} images | {a['extract_s']:.2f} s "
                f"| plain inference, same images: {a['plain_s']:.2f} s | {a['ratio']:.2f}x | <= {a['goal']}x |")
    rows.append(f"| (b) 9x9 theta x lam grid, {b['queries']} queries x {b['cache']} keys x {b['dim']}-d | {b['grid_s']:.2f} s "
                f"| one (theta, lam) evaluation: {b['one_s']:.2f} s | {b['ratio']:.2f}x | <= {b['goal']}x |")
    c = res.get("c")
    if c:
        rows.append(f"| (c) CIFAR-10 evaluate, ResNet20 layer3.0, 50k cache (features cold) | {c['wall_s']:.1f} s "
                    f"| inference over 60k images {c['inference_60k_s']:.1f} s + GEMMs {c['gemm_s']:.1f} s at "
                    f"{c['gemm_gflops']:.0f} GFLOP/s = {c['bound_s']:.1f} s | {c['ratio']:.2f}x | <= {c['goal']}x |")
        rows.append(f"| (c) peak memory of that run | {c['peak_rss_gb']:.2f} GB | machine memory {c['machine_mem_gb']:.1f} GB "
                    f"| {c['mem_ratio']:.2f} | — |")
    else:
        rows.append("| (c) CIFAR-10 evaluate | not run (--quick, or ../shared is not here) | | | |")
    d = res.get("d")
    if d:
        rows.append(f"| (d) ResNet20 layer sweep, {d['layers']} layers, 50k cache, 5k test (features cold) | {d['wall_s']:.1f} s "
                    f"| inference over 60k images {d['inference_60k_s']:.1f} s + GEMMs {d['gemm_s']:.1f} s = "
                    f"{d['bound_s']:.1f} s | {d['ratio']:.2f}x | <= {d['goal']}x |")
        rows.append(f"| (d) peak memory of that run | {d['peak_rss_gb']:.2f} GB | goal {d['mem_goal_gb']:.0f} GB "
                    f"| {d['peak_rss_gb'] / d['mem_goal_gb']:.2f} | <= 1 |")
    e = res.get("e")
    if e:
        rows.append("")
        rows.append("Projection dimension against test accuracy (layer alone as keys, theta = 50, lam = 0.5):")
        rows.append("")
        dims = sorted(e["acc"], key=lambda k: float("inf") if k == "exact" else int(k))
        rows.append("| layer | " + " | ".join(f"D = {k}" if k != "exact" else "exact" for k in dims) + " |")
        rows.append("|---|" + "---|" * len(dims))
        for layer in e["layers"]:
            cells = [f"{e['acc'][k][layer]['acc']:.2%} ({e['acc'][k][layer]['dim']}-d)" for k in dims]
            rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller (a)/(b), skip (c)")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--only", default="abcde", help="which benchmarks to run, e.g. ab")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from results/latest.json")
    args = ap.parse_args()
    if args.table_only:
        md = table(json.loads((REPO / "benchmarks" / "results" / "latest.json").read_text()))
        print(md)
        if args.update_readme:
            _update_readme(md)
        return 0
    torch.manual_seed(0)
    res = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = setup_data_dir(Path(tmp))
        spec = resnet20(data_dir)
        if "a" in args.only:
            x = images(data_dir, 1000 if args.quick else 5000)
            res["a"] = bench_extraction(spec, x)
            print("(a)", json.dumps(res["a"]), flush=True)
        if "b" in args.only:
            res["b"] = bench_grid(1000 if args.quick else 5000, 10000 if args.quick else 50000, 4096)
            print("(b)", json.dumps(res["b"]), flush=True)
        if have_shared() and not args.quick:
            if "c" in args.only:
                res["c"] = bench_evaluate(data_dir)
                print("(c)", json.dumps(res["c"]), flush=True)
            if "d" in args.only:
                t_infer = res["c"]["inference_60k_s"] if "c" in res else bench_inference(data_dir)
                rate = res["c"]["gemm_gflops"] * 1e9 if "c" in res else gemm_rate(671, 50000, 1024)
                res["d"] = bench_layer_sweep(data_dir, t_infer, rate)
                print("(d)", json.dumps({k: v for k, v in res["d"].items() if k != "rows"}), flush=True)
            if "e" in args.only:
                res["e"] = bench_projection(data_dir)
                print("(e)", json.dumps(res["e"]), flush=True)
    # benchmarks not run this time keep their last results (--only reruns a part)
    latest = REPO / "benchmarks" / "results" / "latest.json"
    previous = json.loads(latest.read_text()) if latest.exists() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for k in "abcde":
        if k in res:
            res[k]["measured_at"] = stamp
        elif k in previous:
            res[k] = previous[k]
    md = table(res)
    res["table"] = md
    atomic_write_json(latest, res)
    print(md)
    if args.update_readme:
        _update_readme(md)
    return 0


def _update_readme(md: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{md}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
