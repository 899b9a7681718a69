"""Command line: the paper's experiments headless, each subcommand a thin adapter over a study.

    python -m cacheviz layers --model resnet20 [--json]
    python -m cacheviz evaluate --dataset cifar10 --model resnet20 [--layers layer3.0] [--json OUT]
    python -m cacheviz sweep-layers | sweep-size | table1 ... [--out X.json|X.csv]
    python -m cacheviz incremental --tasks 5 [--backbone-classes first|all] [--scenario class|task|both] [--out X.json]
    python -m cacheviz attack --attack fgsm --against network [--n 250] [--epsilons ...] [--source-model M2] ...

Bad input ends with one sentence naming the fix (with this command line's flags) and exit
status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from .config import COMBINE_TOP, MAX_SEED
from .errors import CachevizError

# How this command line names the engine's parameters in messages (None: it has no such flag).
FLAGS = {
    "dataset": "--dataset", "model": "--model", "layers": "--layers", "checkpoint": "--checkpoint PATH",
    "device": "--device", "train_limit": "--train-limit", "test_limit": "--test-limit",
    "val_from_train": "--val-from-train", "val_fraction": "the validation share", "grid": "--grid", "theta_max": "--theta-max", "protocol": "--protocol",
    "val_flips": "--protocol paper",
    "project_dim": "--project-dim", "batch_size": "--batch-size", "seed": "--seed", "fractions": "--fractions",
    "seeds": "--seeds", "combine_top": "--combine-top", "out": "--out", "json": "--json", "theta": "theta",
    "lam": "lam", "data_dir": "--data-dir", "attack": "--attack", "against": "--against", "n": "--n",
    "epsilons": "--epsilons", "source_model": "--source-model", "taus": "--taus", "timing_images": "--timing-images",
    "loss": "--loss", "fraction": "--fraction", "epochs": "--epochs", "tasks": "--tasks",
    "backbone_classes": "--backbone-classes", "scenario": "--scenario",
    "ks": "--k", "k": "--k", "index": "--index", "store": "--store", "label": "--label", "ids": "--ids",
    "folder": "--folder", "version": "--version",
}

TABLE_ROWS = [
    ("baseline (network alone)", "baseline_acc_val", "baseline_acc", None),
    ("cache model", "cache_acc_val", "cache_acc", "theta={theta:g}, lam={lam:g}"),
    ("cache-only (lam = 1)", "cache_only_acc_val", "cache_only_acc", "theta={theta_cache_only:g}"),
    ("k-NN vote (k = {knn_k})", None, "knn_acc", None),
]


def _data_dir(args) -> Path:
    return Path(args.data_dir or os.environ.get("CACHEVIZ_DATA_DIR") or "data")


class TerminalProgress:
    """A study's stages as lines on stderr: one updating line per stage, with elapsed time and ETA."""

    def __init__(self, stream=None):
        # sys.stderr at call time, not at import: a default bound at import keeps a stream that
        # a caller (a test's capture) may have closed since
        self.stream = stream = stream or sys.stderr
        self.name = None
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()
        self.last = 0.0

    def stage(self, name: str) -> None:
        if self.name is not None and self.tty:
            self.stream.write("\n")
        self.name, self.t0, self.last = name, time.perf_counter(), 0.0

    def step(self, done: int, total: int, detail: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < (0.1 if self.tty else 5) and done < total:
            return  # a log gets a line every few seconds, a terminal a redraw every 0.1 s
        self.last = now
        frac = done / total if total else 1.0
        el = now - self.t0
        eta = f", ETA {el / frac - el:.0f}s" if 0 < frac < 1 else ""
        what = f"{self.name}: {detail}" if detail else str(self.name)
        line = f"{what}: {done}/{total} ({frac:.0%}, {el:.1f}s{eta})"
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.name is not None and self.tty:
            self.stream.write("\n")


def _grid(text: str) -> tuple[int, int]:
    try:
        t, l = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a grid like 9x9 (theta values x lam values)") from None
    return t, l


# The largest whole number any option may hold: beyond it torch and numpy overflow (a traceback),
# where every count an option gives is far smaller anyway.
MAX_WHOLE = 2**63 - 1


def _whole(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"{v} must be {'positive' if least == 1 else '0 or more'}")
    if v > MAX_WHOLE:
        raise argparse.ArgumentTypeError(f"{v} is too large (at most {MAX_WHOLE})")
    return v


def _positive(text: str) -> int:
    return _whole(text, 1)


def _nonneg(text: str) -> int:
    return _whole(text, 0)


def _number(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return v


def _share(text: str) -> float:
    v = _number(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share above 0 and at most 1, e.g. 0.025")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cacheviz", description="The cache model of Orhan (NeurIPS 2018), headless.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data directory (default $CACHEVIZ_DATA_DIR or ./data)")
    common.add_argument("--checkpoint", help="weights for the model's architecture (a state_dict file)")

    lp = sub.add_parser("layers", parents=[common], help="list a model's tappable layers")
    lp.add_argument("--model", required=True)
    lp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("models", help="list the registered models")

    exp = argparse.ArgumentParser(add_help=False, parents=[common])
    exp.add_argument("--dataset", default="digits", help="digits (offline), cifar10, cifar100, mnist, fashion-mnist or folder:PATH")
    exp.add_argument("--model", help="registered model (default: resnet20 for cifar10, digits-cnn for digits)")
    exp.add_argument("--flip", action="store_true", help="also store horizontal flips of the cache items")
    exp.add_argument("--train-limit", type=_positive, help="class-balanced subset of N training items as the cache")
    exp.add_argument("--test-limit", type=_positive, help="class-balanced subset of N test items")
    exp.add_argument("--val-from-train", type=_nonneg, default=None, metavar="N",
                     help="tune on N held-out training items (paper's CIFAR protocol) instead of half the test set")
    exp.add_argument("--grid", type=_grid, default=None, help="theta x lam grid resolution (default 9x9)")
    exp.add_argument("--theta-max", type=_number, default=90.0, metavar="T",
                     help="the grid's largest theta (default 90, the paper's; raise it when the best theta is on the edge)")
    exp.add_argument("--protocol", choices=("default", "paper"), default="default",
                     help="paper: the author's CIFAR protocol (sets --flip, --val-from-train 5000 with the held-out "
                          "items' flips queried too, and --grid 33x33; an explicit --val-from-train or --grid "
                          "overrides); default: tune on half the test set")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    exp.add_argument("--batch-size", type=_positive, default=256)
    exp.add_argument("--force", action="store_true", help="recompute even if a stored result exists")

    ep = sub.add_parser("evaluate", parents=[exp], help="baseline vs cache vs cache-only, tuned on validation")
    ep.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    ep.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    ep.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT ('-' for stdout)")

    out_help = "write the rows to OUT: .json or .csv by its suffix ('-' prints JSON)"
    sl = sub.add_parser("sweep-layers", parents=[exp], help="Figure 2: accuracy with each layer alone as keys")
    sl.add_argument("--layers", help="comma-separated layers (default: every tappable layer)")
    sl.add_argument("--project-dim", type=_positive, default=1024,
                    help="random-project layers wider than D (default 1024, so all layers fit in memory)")
    sl.add_argument("--exact", action="store_true", help="exact keys: no projection (needs much more memory)")
    sl.add_argument("--retune", action="store_true", help="tune theta and lam per layer instead of the middle values")
    sl.add_argument("--out", metavar="OUT", help=out_help)

    ea = sub.add_parser("early", parents=[exp], help="answer early: truncated and gated caches inside the network")
    ea.add_argument("--layers", help="comma-separated exit layers (default: the chain's steps from l/L = 0.6 on, "
                                     "before the pooling; ResNet20: layer2.2, layer3.0, layer3.1, layer3.2)")
    ea.add_argument("--fractions", default="0.005,0.025,0.1,1",
                    help="cache sizes as fractions of the training set (class-balanced; default 0.005,0.025,0.1,1)")
    ea.add_argument("--taus", default="0.5,0.8,0.9,0.95,0.99",
                    help="thresholds on max p_mem for the gated exit (default 0.5,0.8,0.9,0.95,0.99)")
    ea.add_argument("--mix", action="store_true",
                    help="images that do not exit answer with the cache model's p (the paper's mixture), not p_net")
    ea.add_argument("--timing-images", type=_positive, default=1000, help="test images timed (default 1000)")
    ea.add_argument("--reps", type=_positive, default=3, help="timed runs of each model, median taken (default 3)")
    ea.add_argument("--out", metavar="OUT", help=out_help)

    kn = sub.add_parser("keynet", parents=[exp], help="train a key network for a layer's cache (a learned hash into its key space) and "
                                                      "compare it with the network")
    kn.add_argument("--layer", default=None, help="the teacher layer whose keys it learns (default: layer3.0 for "
                                                  "the CIFAR ResNets, pool for digits-cnn)")
    kn.add_argument("--loss", choices=("triplet", "npair"), default="triplet", help="the second stage's loss")
    kn.add_argument("--fraction", type=_share, default=0.025, help="the cache: this fraction of the training set "
                                                                   "(class-balanced; default 0.025, the seed's)")
    kn.add_argument("--epochs", default="6,3", help="regression and metric-learning epochs (default 6,3)")
    kn.add_argument("--timing-images", type=_positive, default=1000, help="test images timed (default 1000)")
    kn.add_argument("--out", metavar="OUT", help=out_help)

    ss = sub.add_parser("sweep-size", parents=[exp], help="Figure 3: accuracy against cache size")
    ss.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    ss.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    ss.add_argument("--fractions", default="0,0.01,0.03,0.1,0.3,1", help="cache sizes as fractions of the training set")
    ss.add_argument("--seeds", default="0,1", help="comma-separated seeds for the random subsets")
    ss.add_argument("--out", metavar="OUT", help=out_help)

    tp = sub.add_parser("table1", parents=[exp], help="Table 1: baseline / cache / cache-only / Cache3 errors")
    tp.add_argument("--models", help="comma-separated models (default: --model)")
    tp.add_argument("--layers", help="comma-separated key layers of the 'cache' row (default: each model's own)")
    tp.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    tp.add_argument("--combine-top", type=_positive, default=COMBINE_TOP,
                    help="Cache3 scores every layer of the last stage alone, then every pair and triple of the N best "
                         f"(default {COMBINE_TOP}: every set of up to 3 of ResNet20's six stage-3 layers)")
    tp.add_argument("--out", metavar="OUT", help=out_help)

    from .attacks import ATTACKS, MODELS

    ap = sub.add_parser("attack", parents=[exp], help="Tables 2-4 and strength curves: attacks and corruptions")
    ap.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    ap.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    ap.add_argument("--attack", required=True, help=f"one of {', '.join(ATTACKS)}")
    ap.add_argument("--against", default="network", help=f"the model attacked: {', '.join(MODELS)} (default network)")
    ap.add_argument("--n", type=_positive, default=250, help="test images attacked (default 250, the paper's)")
    ap.add_argument("--epsilons", help="a strength curve at these strengths (epsilons in the normalised input "
                                       "space, blur sigmas, or brightness/contrast/gamma factors); without it, "
                                       "the minimal perturbation per image")
    ap.add_argument("--source-model", help="Table 4: make the adversarials against this network, show them to --model's")
    ap.add_argument("--out", metavar="OUT", help=out_help)

    ip = sub.add_parser("incremental", parents=[exp], help="the cache as a knowledge store: classes arrive in tasks; "
                                                           "the store vs a fine-tuned head")
    ip.add_argument("--tasks", default="5", help="equal tasks the classes are cut into, in class order (default 5)")
    ip.add_argument("--backbone-classes", default="all",
                    help="all: the model as given (default); first: a backbone trained on the first task's classes "
                         "only (digits-cnn on digits)")
    ip.add_argument("--scenario", default="both",
                    help="class (predict among all seen classes), task (the task id is given) or both (default)")
    ip.add_argument("--out", metavar="OUT", help=out_help)

    jp = sub.add_parser("jacobian", parents=[exp], help="Figure 4: input-output Jacobians of the three models")
    jp.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    jp.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    jp.add_argument("--n", type=_positive, help="test images (default 500 on the CPU, the whole test part on a GPU)")
    jp.add_argument("--rho", metavar="ATTACKS",
                    help="comma-separated minimal attacks (fgsm, ifgsm, pixel, blur, hopskipjump): add each image's minimal "
                         "rho_adv against its own model from the robustness lab's stored runs (same setup and seed; "
                         "`attack --against M` for each model) as rho_adv_<attack>, and print |J|'s rank correlation "
                         "with it; computes no attack")
    jp.add_argument("--out", metavar="OUT", help=out_help)

    tk = sub.add_parser("topk", parents=[exp], help="p_mem from the k most similar items: accuracy against k, "
                                                    "exact or approximate index")
    tk.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    tk.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    tk.add_argument("--k", default="10,30,100,300,1000,3000,10000,50000", help="comma-separated k (items retrieved)")
    tk.add_argument("--index", default="exact", help="exact, ivf or hnsw (FAISS; default exact)")
    tk.add_argument("--out", metavar="OUT", help=out_help)

    sp = sub.add_parser("store", help="the knowledge store: create, list, add, remove, undo, query, repair")
    ssub = sp.add_subparsers(dest="store_command", required=True)
    st_exp = argparse.ArgumentParser(add_help=False, parents=[exp])
    st_exp.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    st_exp.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    st_exp.add_argument("--store", metavar="NAME", help="a store by name (default: the setup's own store)")
    sc = ssub.add_parser("create", parents=[st_exp], help="version 1: the setup's training items")
    sc.add_argument("--name", help="name the store (default: from the setup)")
    sl2 = ssub.add_parser("list", parents=[st_exp], help="the versions, or with --items the live items")
    sl2.add_argument("--items", action="store_true", help="list the items of a version instead")
    sl2.add_argument("--version", type=_positive, help="the version to list (default: the latest)")
    sl2.add_argument("--out", metavar="OUT", help=out_help)
    sa = ssub.add_parser("add", parents=[st_exp], help="add images with a label (files or a folder): a new version")
    sa.add_argument("images", nargs="*", help="image files")
    sa.add_argument("--folder", help="every image in this folder")
    sa.add_argument("--label", required=True, help="the class, by index or name")
    sr = ssub.add_parser("remove", parents=[st_exp], help="remove items or a whole class: a new version")
    sr.add_argument("--ids", help="comma-separated item ids")
    sr.add_argument("--class", dest="label", help="every item of this class (index or name)")
    sr.set_defaults(flag_names={"label": "--class"})  # messages name the flag typed, not add's --label
    ssub.add_parser("undo", parents=[st_exp], help="undo the latest edit: a new version equal to the one before it")
    sq = ssub.add_parser("query", parents=[st_exp], help="one image's nearest stored items and the answers")
    sq.add_argument("image", help="an image file")
    sq.add_argument("--k", type=_positive, default=10, help="neighbours shown (default 10)")
    sq.add_argument("--version", type=_positive, help="query this version (default: the latest)")
    srp = ssub.add_parser("repair", parents=[st_exp],
                          help="bring a damaged store back from the copies it keeps: manifests from their journal "
                               "copies, the database from the key segments, a key segment from the database")
    srp.add_argument("--accept-loss", action="store_true",
                     help="replace a version none of whose copies survives by a version equal to the one before it")
    return p


def cmd_layers(args) -> int:
    from .features import list_layers
    from .models import load_model
    from .store import check_data_dir

    from .models import architecture_only, default_keys_reason

    check_data_dir(_data_dir(args))
    name = _model_name(args.model)
    note = None
    try:
        spec = load_model(name, _data_dir(args), checkpoint=args.checkpoint)
    except CachevizError as exc:
        # layers, shapes and defaults need the architecture only: list them without the weights
        spec = architecture_only(name) if args.checkpoint is None else None
        if spec is None:
            raise
        note = f"the layers come from the architecture alone; the weights were not loaded: {exc.render(FLAGS)}"
    infos = list_layers(spec)
    default = set(spec.default_layers)
    if args.json:
        print(json.dumps([{"name": i.name, "shape": list(i.shape), "dim": i.dim, "depth": round(i.depth, 4),
                           "default": i.name in default} for i in infos], indent=2))
        return 0
    w = max(len(i.name) for i in infos)
    print(f"{'layer':<{w}}  {'shape':<14} {'dim':>8}  l/L")
    for i in infos:
        mark = "  (default key)" if i.name in default else ""
        print(f"{i.name:<{w}}  {'x'.join(map(str, i.shape)):<14} {i.dim:>8}  {i.depth:.3f}{mark}")
    print(f"default keys: {', '.join(spec.default_layers)}: {default_keys_reason(spec.name)}")
    if note:
        print(f"note: {note}")
    return 0


def cmd_models(_args) -> int:
    from .models import available_models

    for name in available_models():
        print(name)
    return 0


def _split_list(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else ()


def _model_name(text: str | None) -> str | None:
    if text is not None and not text.strip():
        raise CachevizError("an empty model name", "name a model (see: python -m cacheviz models)",
                            param="model", value=text)
    return text


def _setup(args, model: str | None = None, project_dim: int | None = None):
    from .config import DEFAULT_MODEL, Setup
    from .data import canonical_name

    dataset = canonical_name(args.dataset)
    model = model or _model_name(args.model) or DEFAULT_MODEL.get(dataset)
    if model is None:
        raise CachevizError(f"no default model for {dataset}", "name one (see: python -m cacheviz models)",
                            param="model")
    common = dict(
        dataset=dataset, model=model, layers=_split_list(getattr(args, "layers", None)),
        checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed, project_dim=project_dim,
        theta_max=args.theta_max,
    )
    # options left unset (None) take the protocol's values; an explicit one always wins (a
    # smaller dataset cannot hold out 5,000 items); the result's setup records what ran
    if args.val_from_train is not None:
        common["val_from_train"] = args.val_from_train
    if args.grid is not None:
        common["n_theta"], common["n_lam"] = args.grid
    if getattr(args, "protocol", "default") == "paper":
        return Setup.paper_protocol(**common)
    return Setup(**common, flip=args.flip)


def _print_rows(rows: list[dict], cols: list[str], stream=sys.stdout) -> None:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("+".join(v) if isinstance(v, list) else str(v))  # noqa: E731
    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=stream)
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)), file=stream)


def _run(study, args):
    """Run a study (the stored result when there is one) with terminal progress."""
    progress = TerminalProgress()
    try:
        return study.run(_data_dir(args), device=args.device, progress=progress, force=args.force,
                         batch_size=args.batch_size)
    finally:
        progress.close()


def _run_rows(study, args, cols: list[str]) -> int:
    from .rows import check_out_path, write_rows

    if args.out:
        check_out_path(args.out)  # before the work, not after it
    rows = _run(study, args)
    _print_rows(rows, cols, sys.stderr if args.out == "-" else sys.stdout)
    if args.out:
        write_rows(rows, args.out)
    return 0


def cmd_sweep_layers(args) -> int:
    from .sweeps import LayerSweep

    setup = _setup(args, project_dim=None if args.exact else args.project_dim)
    study = LayerSweep(setup, layers=_split_list(args.layers) or None, retune=args.retune)
    return _run_rows(study, args, ["layer", "depth", "dim", "acc", "cache_only_acc", "baseline_acc", "theta", "lam"])


# What each comma-separated list may hold: (least, most, whether the least itself is allowed, the
# sentence's words, an example). Checked as the list is parsed, before anything loads, so no study
# meets an infinite seed or a NaN fraction halfway through, and every subcommand refuses alike.
LISTS = {
    "fractions": (0, 1, True, "numbers from 0 to 1", "0,0.1,1"),
    # tau 0: every image answers at the exit (the truncated network); 1: only a certain p_mem does
    "taus": (0, 1, True, "thresholds from 0 to 1 (max p_mem)", "0.9,0.99"),
    "seeds": (0, MAX_SEED, True, f"whole numbers from 0 to {MAX_SEED}", "0,1"),
    "k": (1, MAX_WHOLE, True, "whole numbers from 1", "10,100"),
    "ids": (0, MAX_WHOLE, True, "item ids (whole numbers from 0)", "1,2,3"),
    "epochs": (0, MAX_WHOLE, True, "whole numbers from 0", "6,3"),
    "epsilons": (-float("inf"), float("inf"), True, "finite numbers", "0,0.01,0.05"),
}


def _numbers(text: str, param: str, kind=float) -> list:
    import math

    least, most, least_ok, words, example = LISTS.get(param, (-math.inf, math.inf, True, "finite numbers", "0,0.1,1"))
    if kind is int and param not in LISTS:
        words = "whole numbers"

    def parse(v: str):
        try:
            x = int(v) if kind is int else float(v)
        except ValueError:
            x = float(v)  # 1e3 is a whole number too; a word raises here
            if kind is int and not (math.isfinite(x) and x == int(x)):
                raise ValueError from None
            x = kind(x)
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError  # nan and inf: no study can use them (and a huge int is no float)
        if not ((least < x or (least_ok and x == least)) and x <= most):
            raise ValueError
        return x

    try:
        return [parse(v) for v in _split_list(text)]
    except ValueError:
        raise CachevizError(f"give comma-separated {words}, e.g. {example}", param=param, value=text) from None


def cmd_sweep_size(args) -> int:
    from .sweeps import SizeSweep

    study = SizeSweep(_setup(args, project_dim=args.project_dim), fractions=_numbers(args.fractions, "fractions"),
                      seeds=_numbers(args.seeds, "seeds", int))
    return _run_rows(study, args, ["fraction", "seed", "n_cache", "baseline_acc", "cache_acc", "cache_only_acc",
                                   "gain", "theta", "lam"])


def cmd_early(args) -> int:
    from .early import Early

    exits = tuple(_split_list(args.layers))
    args.layers = None  # exit layers, not the setup's key layers
    study = Early(_setup(args), layers=exits, fractions=tuple(_numbers(args.fractions, "fractions")),
                  taus=tuple(_numbers(args.taus, "taus")), mix=args.mix, timing_images=args.timing_images,
                  reps=args.reps)
    return _run_rows(study, args, ["layer", "cache_fraction", "tau", "mode", "accuracy", "ms_per_image", "exit_share",
                                   "speedup"])


def cmd_keynet(args) -> int:
    from .keynet import KeyNetStudy, default_layer

    epochs = _numbers(args.epochs, "epochs", int)
    if len(epochs) != 2:
        raise CachevizError("give two epoch counts: regression, then metric learning", "e.g. --epochs 6,3",
                            param="epochs", value=args.epochs)
    setup = _setup(args)
    study = KeyNetStudy(setup, layer=args.layer or default_layer(setup.model), loss=args.loss, fraction=args.fraction,
                        epochs_regress=epochs[0], epochs_metric=epochs[1], timing_images=args.timing_images)
    return _run_rows(study, args, ["model", "condition", "accuracy", "ms_per_image", "params"])


def cmd_topk(args) -> int:
    from .topk import TopK

    study = TopK(_setup(args, project_dim=args.project_dim), ks=tuple(_numbers(args.k, "k", int)), index=args.index)
    return _run_rows(study, args, ["k", "index", "accuracy", "cache_only_accuracy", "exact_accuracy",
                                   "exact_cache_only_accuracy", "recall_at_10", "ms_per_query"])


def _open_store(args, create: bool = False):
    from .kstore import KnowledgeStore, store_name, stores_dir
    from .store import file_sha256

    setup = _setup(args, project_dim=args.project_dim)
    where = _data_dir(args)
    if create:
        progress = TerminalProgress()
        try:
            return KnowledgeStore.create(setup, where, args.device if args.device != "auto" else "cpu",
                                         name=args.name, progress=progress)
        finally:
            progress.close()
    name = args.store or store_name(setup)
    if not (stores_dir(where) / name / "meta.json").exists() and not args.store:
        raise CachevizError("this setup has no knowledge store yet",
                            f"create it first: python -m cacheviz store create --dataset {setup.dataset} "
                            f"--model {setup.model}" + (f" --layers {','.join(setup.layers)}" if setup.layers else ""))
    # a named checkpoint must be the one the store's keys came from
    expect = file_sha256(setup.checkpoint) if setup.checkpoint and Path(setup.checkpoint).is_file() else None
    return KnowledgeStore.open(name, where, expect_weights=expect)


def _label(ks, text: str | None) -> int:
    if text is None:
        raise CachevizError("name the class", "add --label (an index or a class name)", param="label")
    t = text.strip()
    if t.isdigit() and int(t) < len(ks.classes):
        return int(t)
    if t in ks.classes:
        return ks.classes.index(t)
    raise CachevizError(f"{text!r} is not a class of this store",
                        f"use 0 to {len(ks.classes) - 1} or one of {', '.join(ks.classes[:10])}", param="label", value=text)


def _report_edit(ks, v) -> None:
    from .kstore import changed

    print(f"version {v.number}: {v.op} {v.detail} -> {v.n_live} items")
    if v.parent is None:
        return
    before, after = ks.evaluate(v.parent), ks.evaluate(v.number)
    for name, attr in (("network", "pred_net"), ("cache model", "pred_cache"), ("cache-only", "pred_cache_only")):
        a, b = (getattr(before, attr) == before.y).mean(), (getattr(after, attr) == after.y).mean()
        print(f"  {name:12s} test accuracy {100 * a:.2f}% -> {100 * b:.2f}%")
    n_co, n_c = len(changed(before, after, "cache_only")), len(changed(before, after, "cache"))
    print(f"  test items whose answer changed: {n_c} (cache model), {n_co} (cache-only), of {len(after.y)}")


def cmd_store(args) -> int:
    from .images import decode_upload

    what = args.store_command
    if what == "add" and args.folder and args.images:  # adding only one would drop the other unsaid
        raise CachevizError("give image files or --folder, not both", "run `store add` once for each")
    if what == "create":
        ks = _open_store(args, create=True)
        print(f"store {ks.path.name} at {ks.path}: version {ks.head.number}, {ks.head.n_live} items, "
              f"{ks.dim}-d keys, theta {ks.theta:g}, lam {ks.lam:g}")
        return 0
    if what == "repair":
        from .krepair import repair
        from .kstore import store_name

        name = args.store or store_name(_setup(args, project_dim=args.project_dim))
        for line in repair(name, _data_dir(args), accept_loss=args.accept_loss):
            print(line)
        return 0
    ks = _open_store(args)
    if what == "list":
        from .rows import check_out_path, write_rows

        if args.out:
            check_out_path(args.out)
        if args.items:
            rows = [ks.item(int(i)) | {"version": ks.version(args.version).number} for i in ks.live_ids(args.version)]
            cols = ["id", "label", "class", "source"]
        else:
            rows = ks.summary()
            cols = ["version", "op", "items", "parent", "created", "detail"]
        _print_rows(rows, cols, sys.stderr if args.out == "-" else sys.stdout)
        if args.out:
            write_rows(rows, args.out)
        return 0
    if what == "add":
        label = _label(ks, args.label)
        if args.folder:
            v = ks.add_folder(args.folder, label)
        else:
            if not args.images:
                raise CachevizError("no images to add", "name image files or --folder DIR")
            imgs = []
            for f in args.images:
                path = Path(f)
                if not path.is_file():
                    raise CachevizError(f"there is no file {f}", "check the path")
                imgs.append(decode_upload(path.read_bytes(), path.name))
            v = ks.add_images(imgs, [label] * len(imgs), [Path(f).name for f in args.images])
        _report_edit(ks, v)
        return 0
    if what == "remove":
        if (args.ids is None) == (args.label is None):
            raise CachevizError("say what to remove", "give --ids 1,2,3 or --class NAME (one of them)")
        v = ks.remove(_numbers(args.ids, "ids", int)) if args.ids else ks.remove_class(_label(ks, args.label))
        _report_edit(ks, v)
        return 0
    if what == "undo":
        _report_edit(ks, ks.undo())
        return 0
    if what == "query":
        path = Path(args.image)
        if not path.is_file():
            raise CachevizError(f"there is no file {args.image}", "check the path")
        img = decode_upload(path.read_bytes(), path.name)
        q, p_net = ks.keys_of(img)
        d, ids = ks.search(q.numpy(), args.k, args.version)
        p_mem = ks.p_mem(q.numpy(), version=args.version)[0]
        p = (1 - ks.lam) * p_net[0].cpu() + ks.lam * p_mem
        c = ks.classes
        print(f"network: {c[int(p_net[0].argmax())]}  cache-only: {c[int(p_mem.argmax())]}  cache model: {c[int(p.argmax())]}")
        rows = [ks.item(int(i)) | {"similarity": float(s)} for s, i in zip(d[0], ids[0]) if i >= 0]
        _print_rows(rows, ["id", "class", "similarity", "source"])
        return 0
    raise CachevizError(f"unknown store command {what!r}")  # pragma: no cover - argparse refuses first


def cmd_incremental(args) -> int:
    from .data import inspect_classes
    from .incremental import SCENARIOS, Incremental, task_classes

    try:
        tasks = int(args.tasks)
    except ValueError:
        raise CachevizError("give a whole number of tasks from 1", "e.g. --tasks 5", param="tasks",
                            value=args.tasks) from None
    scenarios = SCENARIOS if args.scenario == "both" else (args.scenario,)
    setup = _setup(args)
    study = Incremental(setup, tasks=tasks, backbone_classes=args.backbone_classes, scenarios=scenarios)
    task_classes(inspect_classes(setup.dataset, _data_dir(args))[0], tasks)  # before any work
    return _run_rows(study, args, ["task", "method", "scenario", "classes_seen", "accuracy_seen", "n_store",
                                   "seconds"])


def cmd_table1(args) -> int:
    from .sweeps import table1_group

    models = _split_list(args.models) or (None,)
    study = table1_group([_setup(args, model=m, project_dim=args.project_dim) for m in models], args.combine_top)
    return _run_rows(study, args, ["model", "dataset", "variant", "error", "theta", "lam", "layers"])


def cmd_attack(args) -> int:
    from .robustness import attack_study

    setup = _setup(args, project_dim=args.project_dim)
    epsilons = _numbers(args.epsilons, "epsilons") if args.epsilons is not None else None
    if epsilons is not None and not epsilons:
        raise CachevizError("no strengths given", "e.g. --epsilons 0,0.01,0.05,0.1", param="epsilons", value=args.epsilons)
    source = None
    if args.source_model:
        source = setup.replace(model=_model_name(args.source_model), layers=(), checkpoint=None)
    study = attack_study(setup, args.attack, args.against, args.n, args.seed, epsilons, source)
    cols = (["model", "epsilon", "accuracy", "sem", "n"] if epsilons is not None else
            ["model", "accuracy", "clean_accuracy", "success_rate", "rho_adv", "strength", "n_failed", "theta", "lam"])
    return _run_rows(study, args, ["attack", "against", *cols])


def cmd_jacobian(args) -> int:
    from .jacobian import CPU_DEFAULT_N, RHO_ATTACKS, Jacobians, rank_correlations, stored_rho, summary, with_rho
    from .robustness import PAPER_N
    from .rows import check_out_path, write_rows
    from .workspace import resolve_device

    setup = _setup(args, project_dim=args.project_dim)
    attacks = [a.lower() for a in _split_list(args.rho or "")]
    for a in attacks:
        if a not in RHO_ATTACKS:
            raise CachevizError(f"--rho takes the robustness lab's minimal attacks: {', '.join(RHO_ATTACKS)}",
                                param="rho", value=a)
    n = args.n
    if n is None:
        if resolve_device(args.device).type == "cuda":
            from .workspace import prepare

            n = len(prepare(setup, _data_dir(args), "cpu").split.test_idx)
        else:
            n = CPU_DEFAULT_N
    study = Jacobians(setup, n, args.seed)
    if args.out:
        check_out_path(args.out)
    rows = _run(study, args)
    out = sys.stderr if args.out == "-" else sys.stdout
    _print_rows(summary(rows), ["model", "n", "mean_norm", "median_norm"], out)
    for a in attacks:
        rho = stored_rho(setup, a, args.seed, _data_dir(args), tuple(dict.fromkeys((n, PAPER_N))))
        rows = with_rho(rows, a, rho)
        corr = rank_correlations(rows, a)
        if corr:
            _print_rows(corr, ["model", "attack", "n", "spearman", "p_value", "median_norm", "median_rho_adv"], out)
        else:
            print(f"No stored {a} runs of this setup and seed share images with these; run `python -m cacheviz "
                  f"attack --attack {a} --against network` (and cache, cache-only) with the same options first.",
                  file=sys.stderr)
    if args.out:
        write_rows(rows, args.out)
    return 0


def edge_note(r: dict) -> str | None:
    """A sentence when a tuned theta is the grid's first or last value."""
    which = [name for name, flag in (("theta", "theta_on_edge"), ("the cache-only theta", "theta_cache_only_on_edge"))
             if r.get(flag)]
    if not which:
        return None
    thetas = r["grid"]["thetas"]
    return (f"{' and '.join(which)} landed on the grid's edge ({thetas[0]:g}..{thetas[-1]:g}): the best may lie "
            f"outside it; try --theta-max {2 * thetas[-1]:g}")


def cmd_evaluate(args) -> int:
    from .experiment import Evaluate
    from .rows import check_out_path, json_bytes
    from .store import atomic_write_bytes

    if args.json:
        check_out_path(args.json, param="json", suffixes=())
    r = _run(Evaluate(_setup(args, project_dim=args.project_dim)), args)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{r['dataset']} · {r['model']} · keys {','.join(r['layers'])} ({r['key_dim']}-d) · "
          f"cache {r['n_cache']} items · val {r['n_val']} ({r['val_part']}) · test {r['n_test']}", file=out)
    print(f"{'':<26}{'val acc':>9}{'test acc':>10}   hyper-parameters", file=out)
    for label, kv, kt, hp in TABLE_ROWS:
        val = f"{r[kv]:.2%}" if kv else "—"
        print(f"{label.format(**r):<26}{val:>9}{r[kt]:>10.2%}   {hp.format(**r) if hp else ''}", file=out)
    print(f"cache fixed {r['n_fixed']} and broke {r['n_broken']} of the network's test answers; "
          f"{r['seconds']:.1f}s on {r['device']}", file=out)
    edge = edge_note(r)
    if edge:
        print(f"note: {edge}", file=out)
    if args.json == "-":
        print(json.dumps(r, indent=2))
    elif args.json:
        atomic_write_bytes(args.json, json_bytes(r))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _preflight(args) -> None:
    """What every subcommand needs, checked before any of them loads or computes anything."""
    from . import env
    from .rows import check_out_path
    from .store import check_data_dir

    env.check()
    if hasattr(args, "data_dir"):  # its shape only: reading a stored result needs no write permission
        check_data_dir(_data_dir(args), create=False)
    if getattr(args, "out", None):
        check_out_path(args.out)
    if args.command == "evaluate" and args.json:
        check_out_path(args.json, param="json", suffixes=())


_DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "full (over quota)", errno.EROFS: "read-only",
                errno.EACCES: "forbidden", errno.EPERM: "forbidden"}
# Writers that wrap the OS error in their own (safetensors, torch) keep only its words.
_DISK_WORDS = {"No space left on device": errno.ENOSPC, "StorageFull": errno.ENOSPC,
               "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS}


def _disk_error(exc: BaseException, args) -> CachevizError | None:
    """A full, read-only or forbidden disk met anywhere in a command, as the sentence saying which
    disk and where to go instead; None for any other error."""
    code, filename, seen = None, None, set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and code is None:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            code, filename = e.errno, e.filename
        else:
            code = next((c for words, c in _DISK_WORDS.items() if words in str(e)), None)
        e = e.__cause__ or e.__context__
    if code is None:
        return None
    data = _data_dir(args) if hasattr(args, "data_dir") else None
    outs = {flag: getattr(args, name, None) for flag, name in (("out", "out"), ("json", "json"))}
    outs = {flag: Path(o).parent for flag, o in outs.items() if isinstance(o, str) and o != "-"}
    places = ([("data_dir", data)] if data is not None else []) + list(outs.items())
    if filename is not None:
        # the file that failed names the place; its folder decides which option moves it
        f = Path(os.fsdecode(filename)).resolve()
        where = next((param for param, d in places if d.resolve() == f or d.resolve() in f.parents), None)
        shown = f.parent if where is None else dict(places)[where]
    elif places:
        # a buffered write that failed at close names no file: the fullest disk of the places
        # this command writes to is the one (for a read-only or forbidden one, the data folder)
        def free(d: Path) -> int:
            try:
                return shutil.disk_usage(d).free
            except OSError:
                return 0

        where, shown = min(places, key=lambda pd: free(pd[1])) if code in (errno.ENOSPC, errno.EDQUOT) else places[0]
    else:
        where, shown = None, Path(".")
    full = code in (errno.ENOSPC, errno.EDQUOT)
    if where is None:  # a file of no option's (a checkpoint, a temp folder): no option moves it
        if code in (errno.EACCES, errno.EPERM):
            return CachevizError(f"permission denied on {filename or shown}", "check its permissions")
        return CachevizError(f"the disk holding {shown} is {_DISK_ERRNOS[code]}",
                             "free space there" if full else "")
    option = "{" + where + "}"
    if code in (errno.EACCES, errno.EPERM):
        return CachevizError(f"the folder {shown} is not writable to you", f"give {option} in a folder you can write to")
    problem = f"the disk holding {shown} is {_DISK_ERRNOS[code]}"
    if full:
        return CachevizError(problem, f"free space or give {option} on another disk")
    return CachevizError(problem, f"give {option} on a disk you can write to")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"layers": cmd_layers, "models": cmd_models, "evaluate": cmd_evaluate,
                "sweep-layers": cmd_sweep_layers, "sweep-size": cmd_sweep_size, "table1": cmd_table1, "attack": cmd_attack,
                "jacobian": cmd_jacobian, "early": cmd_early, "incremental": cmd_incremental,
                "keynet": cmd_keynet, "topk": cmd_topk, "store": cmd_store}
    names = {**FLAGS, **getattr(args, "flag_names", {})}
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # a damaged stored file: one line, not a source listing
    try:
        _preflight(args)
        return commands[args.command](args)
    except CachevizError as exc:
        print(f"error: {exc.render(names)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; stored results are intact.", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --train-limit or use --project-dim to shrink the keys.", file=sys.stderr)
        return 1
    except Exception as exc:  # the promise is: never a traceback for the user
        disk = _disk_error(exc, args)
        if disk is not None:  # the user's to fix, not a bug to report: no traceback even with --debug
            print(f"error: {disk.render(names)}", file=sys.stderr)
            return 2
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if "out of memory" in msg.lower():
            print("error: out of memory; lower --batch-size or --train-limit, or use --project-dim.", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {msg[:200]} — re-run with --debug and report it.", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
