"""The paper's sweeps as tidy records, one row per setting (Figure 2, Figure 3, Table 1).

Every sweep extracts all the layers it needs in ONE forward pass (through `ExperimentData`),
persists its rows under results/ keyed by everything that determines them, and returns rows
that carry all their settings, so a CSV or a figure can be remade from the rows alone.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable, Sequence


from . import __version__, store
from .config import Setup
from .data import balanced_subset
from .errors import CachevizError
from .experiment import ExperimentData, _Stages, prepare, resolve_device
from .features import list_layers, resolve_layers
from .tuning import THETA_RANGE, LAM_RANGE, accuracy, default_grid, grid_search, predict

ProgressFn = Callable[[int, int, str], None]

# Figure 2 fixes theta and lam to the middle of their ranges.
MIDDLE_THETA = sum(THETA_RANGE) / 2
MIDDLE_LAM = sum(LAM_RANGE) / 2
# All of ResNet20's 21 layers at 1024-d: ~4.3 GB of float32 features for 50k + 10k images.
DEFAULT_SWEEP_DIM = 1024
DEFAULT_FRACTIONS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


def _cached(kind: str, key: dict, data_dir, force: bool, build: Callable[[], list[dict]]) -> list[dict]:
    key = json.loads(json.dumps({"kind": kind, **key, "format": store.FORMAT_VERSION}, default=str))
    path = Path(data_dir) / "results" / f"{kind}-{store.config_hash(key)}.json"
    if not force:
        hit = store.load_json(path)
        if hit is not None and hit.get("key") == key:
            return hit["rows"]
    rows = build()
    store.atomic_write_json(path, {"key": key, "rows": rows, "code_version": __version__})
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def sweep_layers(
    setup: Setup,
    data_dir: str | Path,
    layers: Sequence[str] | None = None,
    retune: bool = False,
    device: str = "auto",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> list[dict]:
    """Figure 2: each layer alone as keys. theta, lam fixed to the middle (or re-tuned per layer).

    `layers` None: every tappable layer from the input image to the logits. `setup.layers` is
    ignored; `setup.project_dim` (None = exact keys) bounds each layer's key dimension.
    Rows: model, dataset, layer, depth (l/L), dim (key dimension), full_dim, acc, cache_only_acc,
    baseline_acc, theta, lam, n_cache, n_test, project_dim, retuned.
    """
    resolve_device(device)
    setup = setup.replace(layers=())
    key = {"setup": setup.to_dict(), "layers": list(layers) if layers else None, "retune": retune}

    def build() -> list[dict]:
        stage = _Stages(progress)
        stage.begin("load data")
        ws = prepare(setup, data_dir, device, batch_size, progress=stage.inner)
        infos = {i.name: i for i in list_layers(ws.spec)}
        names = [i for i in infos] if not layers else resolve_layers(ws.spec, list(layers))
        stage.begin("extract train features")
        data = ExperimentData(ws, names, progress=stage.inner, on_stage=stage.begin)
        thetas, lams = default_grid(setup.n_theta, setup.n_lam)
        rows = []
        stage.begin("layers")
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            q_val, q_all = data.queries([name])
            q_test = q_all[data.trow]
            if retune:
                mem = data.memory([name], "val")
                g = grid_search(mem, q_val, data.p_val, data.y_val, thetas, lams)
                theta, lam, theta_co = g.theta, g.lam, g.theta_cache_only
                if data.from_train:
                    mem = data.memory([name], "test")
            else:
                theta, lam, theta_co = MIDDLE_THETA, MIDDLE_LAM, MIDDLE_THETA
                mem = data.memory([name], "test")
            p, p_co = predict(mem, q_test, data.p_test, [(theta, lam), (theta_co, 1.0)])
            info = infos[name]
            rows.append({
                "model": ws.spec.name, "dataset": setup.dataset, "layer": name, "depth": _r(info.depth),
                "dim": int(q_test.shape[1]), "full_dim": info.dim,
                "acc": _r(accuracy(p, data.y_test)), "cache_only_acc": _r(accuracy(p_co, data.y_test)),
                "baseline_acc": _r(accuracy(data.p_test, data.y_test)),
                "theta": theta, "lam": lam, "theta_cache_only": theta_co, "retuned": retune,
                "n_cache": len(mem), "n_test": len(data.y_test), "project_dim": setup.project_dim,
                "seconds": round(time.perf_counter() - t0, 3),
            })
            del mem
            stage.inner(i + 1, len(names), name)
        return rows

    return _cached("sweep-layers", key, data_dir, force, build)


def sweep_size(
    setup: Setup,
    data_dir: str | Path,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0, 1),
    device: str = "auto",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> list[dict]:
    """Figure 3: class-balanced random caches of a fraction of the training items, theta and
    lam re-tuned on validation at each size and seed. Fraction 0 is the network alone.

    Rows: model, dataset, layers, fraction, seed, n_cache, baseline_acc, cache_acc,
    cache_only_acc, gain (cache - baseline, percentage points), theta, lam, theta_cache_only.
    """
    resolve_device(device)
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise CachevizError("Cache fractions must lie between 0 and 1, e.g. 0,0.1,0.5,1.")
    if not seeds:
        raise CachevizError("Give at least one seed for the cache-size sweep.")
    key = {"setup": setup.to_dict(), "fractions": fractions, "seeds": list(seeds)}

    def build() -> list[dict]:
        stage = _Stages(progress)
        stage.begin("load data")
        ws = prepare(setup, data_dir, device, batch_size, progress=stage.inner)
        stage.begin("extract train features")
        data = ExperimentData(ws, ws.layers, progress=stage.inner, on_stage=stage.begin)
        q_val, q_all = data.queries(ws.layers)
        q_test = q_all[data.trow]
        thetas, lams = default_grid(setup.n_theta, setup.n_lam)
        base = accuracy(data.p_test, data.y_test)
        y_universe = ws.ds.train_y[data.train_u]
        n_classes = len(ws.ds.classes)
        rows, todo = [], [(f, s) for f in fractions for s in seeds]
        stage.begin("cache sizes")
        for i, (frac, seed) in enumerate(todo):
            n = int(round(frac * len(y_universe)))
            row = {"model": ws.spec.name, "dataset": setup.dataset, "layers": list(ws.layers),
                   "fraction": frac, "seed": seed, "baseline_acc": _r(base)}
            if n < n_classes:  # too small to hold every class: the network alone
                row.update(n_cache=0, cache_acc=_r(base), cache_only_acc=None, gain=0.0,
                           theta=None, lam=None, theta_cache_only=None)
            else:
                subset = balanced_subset(y_universe, n, seed)
                mem = data.memory(ws.layers, "val", subset)
                g = grid_search(mem, q_val, data.p_val, data.y_val, thetas, lams)
                if data.from_train:
                    mem = data.memory(ws.layers, "test", subset)
                p, p_co = predict(mem, q_test, data.p_test, [(g.theta, g.lam), (g.theta_cache_only, 1.0)])
                acc = accuracy(p, data.y_test)
                row.update(n_cache=len(mem), cache_acc=_r(acc), cache_only_acc=_r(accuracy(p_co, data.y_test)),
                           gain=round(100 * (acc - base), 4), theta=g.theta, lam=g.lam, theta_cache_only=g.theta_cache_only)
                del mem
            rows.append(row)
            stage.inner(i + 1, len(todo), f"{frac:.0%} of the training set, seed {seed}")
        return rows

    return _cached("sweep-size", key, data_dir, force, build)


def table1(
    setups: Sequence[Setup],
    data_dir: str | Path,
    combine_top: int = 3,
    device: str = "auto",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> list[dict]:
    """Table 1: error of baseline / cache / cache-only per model and dataset, plus "Cache3".

    For each setup: the cache with the setup's key layers (tuned on validation), and the best
    combination of up to 3 of the `combine_top` best single layers (ranked by validation
    accuracy with re-tuned theta, lam), as the paper's Cache3. Rows: model, dataset, variant
    (baseline, cache, cache-only, cache3), error, theta, lam, layers, key_dim, n_cache.
    """
    resolve_device(device)
    out: list[dict] = []
    for k, setup in enumerate(setups):
        key = {"setup": setup.to_dict(), "combine_top": combine_top}

        def build(setup=setup) -> list[dict]:
            return _table1_rows(setup, data_dir, combine_top, device, batch_size, progress)

        if progress:
            progress(k, len(setups), f"{setup.model} on {setup.dataset}")
        out.extend(_cached("table1", key, data_dir, force, build))
    return out


def _table1_rows(setup, data_dir, combine_top, device, batch_size, progress) -> list[dict]:
    stage = _Stages(progress)
    stage.begin("load data")
    ws = prepare(setup, data_dir, device, batch_size, progress=stage.inner)
    thetas, lams = default_grid(setup.n_theta, setup.n_lam)
    # candidates for Cache3: the stage-3-like layers near the output, i.e. the deepest
    # non-logit layers; ranking every layer of a deep net would cost a sweep of its own
    infos = [i for i in list_layers(ws.spec) if i.name not in ("input", "logits")]
    candidates = [i.name for i in infos[-max(combine_top * 2, 6):]]
    names = list(dict.fromkeys([*ws.layers, *candidates]))
    stage.begin("extract train features")
    data = ExperimentData(ws, names, progress=stage.inner, on_stage=stage.begin)

    def tuned(layers: list[str]) -> dict:
        q_val, q_all = data.queries(layers)
        mem = data.memory(layers, "val")
        g = grid_search(mem, q_val, data.p_val, data.y_val, thetas, lams)
        if data.from_train:
            mem = data.memory(layers, "test")
        p, p_co = predict(mem, q_all[data.trow], data.p_test, [(g.theta, g.lam), (g.theta_cache_only, 1.0)])
        return {"val": g.best_acc, "acc": accuracy(p, data.y_test), "acc_co": accuracy(p_co, data.y_test),
                "theta": g.theta, "lam": g.lam, "theta_co": g.theta_cache_only, "dim": int(q_all.shape[1]),
                "n_cache": len(mem), "layers": layers}

    stage.begin("tuning")
    top_n = min(combine_top, len(candidates))
    n_combos = sum(len(list(itertools.combinations(range(top_n), k))) for k in range(2, min(3, top_n) + 1))
    total, done = 1 + len(candidates) + n_combos, 0

    def step(layers: list[str]) -> dict:
        nonlocal done
        r = tuned(layers)
        done += 1
        stage.inner(done, total, "+".join(layers))
        return r

    main = step(list(ws.layers))
    singles = sorted((step([n]) for n in candidates), key=lambda r: -r["val"])
    best = singles[0]
    top = [r["layers"][0] for r in singles[:combine_top]]
    for size in range(2, min(3, len(top)) + 1):
        for combo in itertools.combinations(top, size):
            r = step(list(combo))
            if r["val"] > best["val"]:
                best = r
    base = accuracy(data.p_test, data.y_test)
    common = {"model": ws.spec.name, "dataset": setup.dataset}

    def row(variant, acc, theta, lam, layers, dim, n_cache):
        return {**common, "variant": variant, "error": _r(1 - acc), "theta": theta, "lam": lam,
                "layers": layers, "key_dim": dim, "n_cache": n_cache}

    return [
        row("baseline", base, None, None, [], None, 0),
        row("cache", main["acc"], main["theta"], main["lam"], main["layers"], main["dim"], main["n_cache"]),
        row("cache-only", main["acc_co"], main["theta_co"], 1.0, main["layers"], main["dim"], main["n_cache"]),
        row("cache3", best["acc"], best["theta"], best["lam"], best["layers"], best["dim"], best["n_cache"]),
    ]
