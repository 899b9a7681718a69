"""Remake the README's figures from sweep rows, headless, with the app's own figure builders.

    python -m cacheviz sweep-layers --dataset cifar10 --model resnet20 --out rn20-layers.json
    python -m cacheviz sweep-layers --dataset cifar10 --model resnet56 --out rn56-layers.json
    python -m cacheviz sweep-size   --dataset cifar10 --model resnet20 --out rn20-sizes.json
    python benchmarks/figures.py --layers rn20-layers.json rn56-layers.json --sizes rn20-sizes.json \
        --out-dir docs/figures

writes layer-sweep.png (Figure 2, every --layers file overlaid) and size-sweep.png (Figure 3);
--table1 t.json adds table1.png; --curves a.json b.json ... draws strength curves (rows of
`attack --epsilons ... --out X.json`) as one grid, robustness-curves.png (--curves-name);
--jacobian j.json (rows of `jacobian --out j.json`, optionally with `--rho A`) draws Figure 4:
jacobian-spectrum.png (4a), jacobian-scatter.png (4b, 4c) and, for each rho_adv_<A> column,
jacobian-rho-<A>.png; --early e.json (rows of `early --out e.json`) draws the accuracy/latency
frontier, early-frontier.png, with the gated exits at --tau. Rows are the JSON lists that `--out X.json` writes.
Needs kaleido and a local Chrome/Chromium (see cacheviz.plots.fig_to_png); exit status 2 with
one sentence when something is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheviz import plots  # noqa: E402
from cacheviz.errors import CachevizError  # noqa: E402


def read_rows(path: str | Path, needed: set[str]) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CachevizError(f"{path} does not exist; write it with the command line's --out {Path(path).name}.") from None
    except (OSError, ValueError) as exc:
        raise CachevizError(f"{path} is not a JSON file of rows ({type(exc).__name__}); write it with --out X.json.") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and needed <= set(r) for r in rows):
        raise CachevizError(f"{path} does not hold the rows this figure needs (each with {', '.join(sorted(needed))}).")
    return rows


def write_png(fig, path: Path, width: int) -> Path:
    path.write_bytes(plots.fig_to_png(fig, width=width))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="*", default=[], metavar="JSON", help="sweep-layers rows, one file per model")
    p.add_argument("--sizes", metavar="JSON", help="sweep-size rows")
    p.add_argument("--table1", metavar="JSON", help="table1 rows (optional)")
    p.add_argument("--curves", nargs="*", default=[], metavar="JSON",
                   help="attack --epsilons rows, one file per curve, drawn as one grid of panels")
    p.add_argument("--curves-name", default="robustness-curves.png", help="file name of the --curves grid")
    p.add_argument("--jacobian", metavar="JSON", help="jacobian rows: Figure 4 (and |J| against rho_adv)")
    p.add_argument("--early", metavar="JSON", help="early rows: the accuracy/latency frontier")
    p.add_argument("--tau", type=float, default=0.9, help="the gate's threshold drawn with --early (default 0.9)")
    p.add_argument("--incremental", nargs="+", metavar="TITLE=JSON",
                   help="incremental rows, one panel each: the store against a fine-tuned head, task by task")
    p.add_argument("--out-dir", default="docs/figures", help="where the PNGs go (default docs/figures)")
    p.add_argument("--width", type=int, default=900, help="figure width in layout pixels (PNG at 2x)")
    args = p.parse_args(argv)
    if not (args.layers or args.sizes or args.table1 or args.curves or args.jacobian or args.early
            or args.incremental):
        p.error("give --layers, --sizes, --table1, --curves, --jacobian, --early and/or --incremental")
    try:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if args.layers:
            rows = [r for f in args.layers for r in read_rows(f, {"model", "layer", "depth", "dim", "acc", "baseline_acc"})]
            written.append(write_png(plots.fig_layer_sweep(rows), out / "layer-sweep.png", args.width))
        if args.sizes:
            rows = read_rows(args.sizes, {"fraction", "seed", "baseline_acc", "cache_acc", "cache_only_acc"})
            written.append(write_png(plots.fig_size_sweep(rows), out / "size-sweep.png", args.width))
        if args.table1:
            rows = read_rows(args.table1, {"model", "dataset", "variant", "error"})
            written.append(write_png(plots.fig_table1(rows), out / "table1.png", args.width))
        if args.curves:
            panels = [read_rows(f, {"attack", "against", "model", "epsilon", "accuracy", "sem", "n"}) for f in args.curves]
            written.append(write_png(plots.fig_curve_grid(panels), out / args.curves_name, args.width))
        if args.jacobian:
            from cacheviz.jacobian import RHO_ATTACKS, rank_correlations, summary

            rows = read_rows(args.jacobian, {"index", "model", "norm", "singular_values"})
            written.append(write_png(plots.fig_jacobian_spectrum(summary(rows)), out / "jacobian-spectrum.png",
                                     args.width))
            written.append(write_png(plots.fig_jacobian_scatter_pair(rows), out / "jacobian-scatter.png", args.width))
            for a in RHO_ATTACKS:
                if any(r.get(f"rho_adv_{a}") is not None for r in rows):
                    fig = plots.fig_norm_vs_rho(rows, a, rank_correlations(rows, a))
                    written.append(write_png(fig, out / f"jacobian-rho-{a}.png", args.width))
        if args.early:
            rows = read_rows(args.early, {"layer", "mode", "cache_fraction", "tau", "accuracy", "ms_per_image"})
            written.append(write_png(plots.fig_early_frontier(rows, tau=args.tau), out / "early-frontier.png",
                                     args.width))
        if args.incremental:
            panels = {}
            for spec in args.incremental:
                title, _, f = spec.rpartition("=")
                panels[title or f] = read_rows(f, {"task", "method", "scenario", "accuracy_seen"})
            written.append(write_png(plots.fig_incremental(panels), out / "incremental.png", args.width))
    except CachevizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
