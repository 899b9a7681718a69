"""The README's Tables 2-4 from the rows `python -m cacheviz attack ... --out X.json` wrote.

    python benchmarks/robustness_tables.py docs/results/robustness

reads every JSON list of attack rows in the folder and prints Markdown: Table 2 (adversarials
made against the network, shown to the three models), Table 3 (each model attacked through its
own gradients, and by the decision-based HopSkipJump) and Table 4 (transfer from another
network). Rows are found by their own fields (attack, against, model, source_model, net), never
by file name.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"fgsm": "FGSM", "ifgsm": "I-FGSM", "pixel": "single pixel", "blur": "Gaussian blur",
         "hopskipjump": "HopSkipJump (decision-based)"}
ORDER = ["fgsm", "ifgsm", "pixel", "blur", "hopskipjump"]


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def num(v, digits=4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def load(folder: Path) -> list[dict]:
    rows = []
    for p in sorted(folder.glob("*.json")):
        data = json.loads(p.read_text())
        if isinstance(data, list) and data and isinstance(data[0], dict) and "rho_adv" in data[0]:
            rows += [{**r, "_file": p.name} for r in data]
    return rows


def mark(r: dict) -> str:
    """† for a row measured on a GPU (the footnote names it)."""
    return "" if r.get("device", "cpu") == "cpu" else " †"


def tables(rows: list[dict]) -> str:
    out = []
    own = [r for r in rows if r["source_model"] == r["net"]]
    by = {(r["net"], r["attack"], r["against"], r["model"]): r for r in own}
    nets = sorted({r["net"] for r in own})
    for net in nets:
        out += [f"**Table 2 — {net}, adversarials made against the network, shown to each model** "
                f"(accuracy on them, clean accuracy of the same images in brackets)", "",
                "| attack | images | success | mean ρ_adv (failures excluded) | network | cache | cache-only |",
                "|---|---|---|---|---|---|---|"]
        for a in ORDER:
            rs = [by.get((net, a, "network", m)) for m in ("network", "cache", "cache-only")]
            if rs[0] is None:
                continue
            r0 = rs[0]
            cells = [f"{pct(r['accuracy'])} ({pct(r['clean_accuracy'])})" for r in rs]
            out.append(f"| {NAMES[a]}{mark(r0)} | {r0['n']} | {pct(r0['success_rate'])} ({r0['n_failed']} failed) "
                       f"| {num(r0['rho_adv'])} | " + " | ".join(cells) + " |")
        out += ["", f"**Table 3 — {net}, each model attacked through its own gradients (white-box)**: "
                "success rate and mean ρ_adv over the successes", "",
                "| attack | network | cache | cache-only |", "|---|---|---|---|"]
        for a in ORDER:
            cells = []
            for m in ("network", "cache", "cache-only"):
                r = by.get((net, a, m, m))
                cells.append("not run" if r is None else
                             f"{pct(r['success_rate'])} of {r['n']}, ρ_adv {num(r['rho_adv'])}{mark(r)}")
            if any(c != "not run" for c in cells):
                out.append(f"| {NAMES[a]} | " + " | ".join(cells) + " |")
        out.append("")
    transfer = [r for r in rows if r["source_model"] != r["net"]]
    if transfer:
        out += ["**Table 4 — transfer: adversarials made against one network, shown to another with and without "
                "its cache** (accuracy; clean accuracy in brackets)", "",
                "| attack | made against | shown to | success on the source | network | cache | cache-only |",
                "|---|---|---|---|---|---|---|"]
        tby = {(r["source_model"], r["net"], r["attack"], r["model"]): r for r in transfer}
        for (src, net, a) in sorted({(r["source_model"], r["net"], r["attack"]) for r in transfer},
                                    key=lambda k: (k[0], k[1], ORDER.index(k[2]))):
            rs = [tby.get((src, net, a, m)) for m in ("network", "cache", "cache-only")]
            cells = ["—" if r is None else f"{pct(r['accuracy'])} ({pct(r['clean_accuracy'])})" for r in rs]
            out.append(f"| {NAMES[a]}{mark(rs[0])} | {src} | {net} | {pct(rs[0]['success_rate'])} | "
                       + " | ".join(cells) + " |")
    gpus = sorted({r["device"] for r in rows if r.get("device", "cpu") != "cpu"})
    if gpus:
        out += ["", f"† measured on one {', '.join(gpus)}; every other row on the 2-core CPU."]
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python benchmarks/robustness_tables.py FOLDER (of attack rows written with --out X.json)",
              file=sys.stderr)
        return 2
    print(tables(load(Path(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
