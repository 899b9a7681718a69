"""Command line: the paper's experiments headless, with JSON out.

    python -m cacheviz layers --model resnet20 [--json]
    python -m cacheviz evaluate --dataset cifar10 --model resnet20 [--layers layer3.0] [--json OUT]

Bad input ends with one sentence naming the fix and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import CachevizError

TABLE_ROWS = [
    ("baseline (network alone)", "baseline_acc_val", "baseline_acc", None),
    ("cache model", "cache_acc_val", "cache_acc", "theta={theta:g}, lam={lam:g}"),
    ("cache-only (lam = 1)", "cache_only_acc_val", "cache_only_acc", "theta={theta_cache_only:g}"),
    ("k-NN vote (k = {knn_k})", None, "knn_acc", None),
]


def _data_dir(args) -> Path:
    return Path(args.data_dir or os.environ.get("CACHEVIZ_DATA_DIR") or "data")


class TerminalProgress:
    """progress(done, total, message) -> one updating line on stderr, a new line per stage."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.message = None
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int, message: str):
        if done == 0 and total == 1:
            return  # a stage's opening tick; its first real step follows
        now = time.perf_counter()
        new_stage = message != self.message
        if new_stage:
            if self.message is not None and self.tty:
                self.stream.write("\n")
            self.message, self.t0 = message, now
        elif now - self.last < (0.1 if self.tty else 5) and done < total:
            return  # a log gets a line every few seconds, a terminal a redraw every 0.1 s
        self.last = now
        frac = done / total if total else 1.0
        el = now - self.t0
        eta = f", ETA {el / frac - el:.0f}s" if 0 < frac < 1 else ""
        line = f"{message}: {done}/{total} ({frac:.0%}, {el:.1f}s{eta})"
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.message is not None and self.tty:
            self.stream.write("\n")


def _grid(text: str) -> tuple[int, int]:
    try:
        t, l = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a grid like 9x9 (theta values x lam values)") from None
    return t, l


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be positive")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be 0 or more")
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

    ep = sub.add_parser("evaluate", parents=[common], help="baseline vs cache vs cache-only, tuned on validation")
    ep.add_argument("--dataset", default="digits", help="digits (offline), cifar10, cifar100, mnist, fashion-mnist or folder:PATH")
    ep.add_argument("--model", help="registered model (default: resnet20 for cifar10, digits-cnn for digits)")
    ep.add_argument("--layers", help="comma-separated key layers (default: the model's own defaults)")
    ep.add_argument("--flip", action="store_true", help="also store horizontal flips of the cache items")
    ep.add_argument("--train-limit", type=_positive, help="class-balanced subset of N training items as the cache")
    ep.add_argument("--test-limit", type=_positive, help="class-balanced subset of N test items")
    ep.add_argument("--val-from-train", type=_nonneg, default=0, metavar="N",
                    help="tune on N held-out training items (paper's CIFAR protocol) instead of half the test set")
    ep.add_argument("--project-dim", type=_positive, help="random-project layers wider than D to D dimensions")
    ep.add_argument("--grid", type=_grid, default=(9, 9), help="theta x lam grid resolution (default 9x9)")
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ep.add_argument("--batch-size", type=_positive, default=256)
    ep.add_argument("--force", action="store_true", help="recompute even if a stored result exists")
    ep.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT ('-' for stdout)")
    return p


def cmd_layers(args) -> int:
    from .features import list_layers
    from .models import load_model

    spec = load_model(args.model, _data_dir(args), checkpoint=args.checkpoint)
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
    return 0


def cmd_models(_args) -> int:
    from .models import available_models

    for name in available_models():
        print(name)
    return 0


def cmd_evaluate(args) -> int:
    from .config import DEFAULT_MODEL, Setup
    from .data import canonical_name
    from .experiment import evaluate

    dataset = canonical_name(args.dataset)
    model = args.model or DEFAULT_MODEL.get(dataset)
    if model is None:
        raise CachevizError(f"Name a model for dataset '{dataset}' with --model (see: python -m cacheviz models).")
    layers = tuple(l.strip() for l in args.layers.split(",") if l.strip()) if args.layers else ()
    setup = Setup(
        dataset=dataset, model=model, layers=layers,
        checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        flip=args.flip, train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed,
        val_from_train=args.val_from_train, project_dim=args.project_dim,
        n_theta=args.grid[0], n_lam=args.grid[1],
    )
    progress = TerminalProgress()
    try:
        r = evaluate(setup, _data_dir(args), device=args.device, batch_size=args.batch_size,
                     progress=progress, force=args.force)
    finally:
        progress.close()
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{r['dataset']} · {r['model']} · keys {','.join(r['layers'])} ({r['key_dim']}-d) · "
          f"cache {r['n_cache']} items · val {r['n_val']} ({r['val_part']}) · test {r['n_test']}", file=out)
    print(f"{'':<26}{'val acc':>9}{'test acc':>10}   hyper-parameters", file=out)
    for label, kv, kt, hp in TABLE_ROWS:
        val = f"{r[kv]:.2%}" if kv else "—"
        print(f"{label.format(**r):<26}{val:>9}{r[kt]:>10.2%}   {hp.format(**r) if hp else ''}", file=out)
    print(f"cache fixed {r['n_fixed']} and broke {r['n_broken']} of the network's test answers; "
          f"{r['seconds']:.1f}s on {r['device']}", file=out)
    if args.json:
        text = json.dumps(r, indent=2)
        if args.json == "-":
            print(text)
        else:
            from .store import atomic_write_bytes

            atomic_write_bytes(args.json, text.encode() + b"\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"layers": cmd_layers, "models": cmd_models, "evaluate": cmd_evaluate}[args.command](args)
    except CachevizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; stored results are intact.", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --train-limit or use --project-dim to shrink the keys.", file=sys.stderr)
        return 1
    except Exception as exc:  # the promise is: never a traceback for the user
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if "out of memory" in msg.lower():
            print("error: out of memory; lower --batch-size or --train-limit, or use --project-dim.", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {msg[:200]} — re-run with --debug and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
