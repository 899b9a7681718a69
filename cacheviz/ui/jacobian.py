"""The Jacobians page's helpers (Figure 4): the study built from the sidebar's choice, its
default number of images, the |J| table, the command line, and the explorer's sorted images."""
from __future__ import annotations

from ..config import PAPER_VAL_ITEMS, Setup
from ..jacobian import CPU_DEFAULT_N, Jacobians, summary
from .state import Choice

THETA_RANGE = (10.0, 200.0)  # the explorer's theta slider: from a soft to a saturated softmax


def jacobian_default_n(choice: Choice, test_part: int | None) -> int:
    """500 images on the CPU (the whole test part on a GPU), never more than the test part."""
    n = CPU_DEFAULT_N if choice.device == "cpu" or test_part is None else test_part
    return min(n, test_part) if test_part else n


def jacobian_study(choice: Choice, n: int, seed: int) -> Jacobians:
    return Jacobians(choice.setup, int(n), int(seed))


def jacobian_summary(rows: list[dict]) -> list[dict]:
    """Per model: Figure 4a's mean spectrum, and the mean and median |J|."""
    return summary(rows)


def norm_table(summary_rows: list[dict]) -> list[dict]:
    """Mean AND median |J| per model: the per-image norms are heavy-tailed (most images
    saturate the softmax, a few are very sensitive), so the two can rank the models differently."""
    return [{"model": s["model"], "images": s["n"], "mean |J|": round(s["mean_norm"], 4),
             "median |J|": round(s["median_norm"], 4),
             "σ₁ (mean)": round(s["mean_singular_values"][0], 4)} for s in summary_rows]


def by_network_norm(rows: list[dict]) -> list[int]:
    """The study's test indices, the network's largest |J| first."""
    net = [r for r in rows if r["model"] == "network"]
    return [int(r["index"]) for r in sorted(net, key=lambda r: -r["norm"])]


def norms_of(rows: list[dict], index: int) -> dict[str, float]:
    return {r["model"]: r["norm"] for r in rows if r["index"] == index}


def jacobian_cli(study: Jacobians) -> str:
    """The command line that computes the same rows (its --seed would reseed the split too, so
    it is written only where the images' seed is the setup's)."""
    s: Setup = study.setup
    parts = ["python -m cacheviz jacobian", f"--dataset {s.dataset}", f"--model {s.model}"]
    if s.layers:
        parts.append(f"--layers {','.join(s.layers)}")
    if s.train_limit:
        parts.append(f"--train-limit {s.train_limit}")
    if s.val_from_train:
        parts.append("--protocol paper")
        if s.val_from_train != PAPER_VAL_ITEMS:
            parts.append(f"--val-from-train {s.val_from_train}")
    elif s.flip:
        parts.append("--flip")
    parts.append(f"--n {study.n}")
    if study.seed == s.seed:
        parts.append(f"--seed {study.seed}")
    return " ".join(parts)

