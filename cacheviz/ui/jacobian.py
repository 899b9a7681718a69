"""The Jacobians page's helpers (Figure 4): the study built from the sidebar's choice, its
default number of images, the |J| table, the command line, the explorer's sorted images, and the
|J| against rho_adv comparison with the robustness lab's stored runs."""
from __future__ import annotations

from ..attacks import MODELS
from ..config import Setup
from ..jacobian import RHO_ATTACKS  # noqa: F401 - re-exported: the attacks the page offers
from ..jacobian import CPU_DEFAULT_N, Jacobians, rank_correlations, stored_rho, summary, with_rho
from ..robustness import PAPER_N, Attack
from ..study import StudyGroup
from .panels import LOOKUP_MAX_AGE
from .state import Choice
from .studies import setup_cli

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
    return [{"model": s["model"], "images": s["n"], "mean |J|": _sig4(s["mean_norm"]),
             "median |J|": _sig4(s["median_norm"]),
             "σ₁ (mean)": _sig4(s["mean_singular_values"][0])} for s in summary_rows]


def _sig4(v: float) -> float:
    """Four significant digits: norms span many orders of magnitude (digits' are ~1e-6)."""
    return float(f"{float(v):.4g}")


def by_network_norm(rows: list[dict]) -> list[int]:
    """The study's test indices, the network's largest |J| first."""
    net = [r for r in rows if r["model"] == "network"]
    return [int(r["index"]) for r in sorted(net, key=lambda r: -r["norm"])]


def clicked_point(events, allowed: list[int]) -> int | None:
    """The test index of the point clicked in any of the scatter charts' selection events (their
    points carry it as customdata), if it is one of `allowed`."""
    for ev in events:
        try:
            points = ev["selection"]["points"]
        except (KeyError, TypeError):
            continue
        for pt in points:
            cd = pt.get("customdata")
            i = cd[0] if isinstance(cd, (list, tuple)) and cd else cd
            try:
                i = int(i)
            except (TypeError, ValueError):
                continue
            if i in allowed:
                return i
    return None


def norms_of(rows: list[dict], index: int) -> dict[str, float]:
    return {r["model"]: r["norm"] for r in rows if r["index"] == index}


def jacobian_cli(study: Jacobians) -> str:
    """The command line that computes the same rows (its --seed would reseed the split too, so
    it is written only where the images' seed is the setup's)."""
    s: Setup = study.setup
    parts = setup_cli("jacobian", s)
    parts.append(f"--n {study.n}")
    if study.seed == s.seed:
        parts.append(f"--seed {study.seed}")
    return " ".join(parts)



def _rho_ns(n: int) -> tuple[int, ...]:
    """The robustness lab's runs to look for: this page's N, then the lab's default."""
    return tuple(dict.fromkeys((int(n), PAPER_N)))


def rho_group(choice: Choice, attack: str, n: int, seed: int) -> StudyGroup:
    """The minimal `attack` against each model itself, on (the first of) these images: for each
    model the stored run of the first of N and the lab's default N that exists, else a new one on
    min(N, the lab's default) images, a prefix of the page's (the lab's draw is a seeded
    permutation's first n)."""
    parts = []
    for m in MODELS:
        found = None
        for k in _rho_ns(n):
            st_ = Attack(choice.setup, attack, m, k, int(seed))
            if st_.lookup(choice.data_dir, max_age=LOOKUP_MAX_AGE) is not None:
                found = st_
                break
        parts.append((m, found or Attack(choice.setup, attack, m, min(int(n), PAPER_N), int(seed))))
    return StudyGroup(parts)


def rho_rows(choice: Choice, rows: list[dict], attack: str, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(the Jacobian rows with rho_adv_<attack>, the per-model rank correlations)."""
    rho = stored_rho(choice.setup, attack, seed, choice.data_dir, _rho_ns(n), max_age=LOOKUP_MAX_AGE)
    joined = with_rho(rows, attack, rho)
    return joined, rank_correlations(joined, attack)


def correlation_table(corr: list[dict]) -> list[dict]:
    return [{"model": c["model"], "images": c["n"], "Spearman (|J|, ρ_adv)": round(c["spearman"], 3),
             "p-value": float(f"{c['p_value']:.2g}"), "median |J|": _sig4(c["median_norm"]),
             "median ρ_adv": _sig4(c["median_rho_adv"])} for c in corr]
