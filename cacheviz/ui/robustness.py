"""The robustness pages' helpers: the lab's studies built from the sidebar's choice, their tables,
downloads and command line, and the "Why it resists" view's shared three-model object."""
from __future__ import annotations

import streamlit as st

from .. import attacks as A
from .. import config, resist, robustness, store
from ..config import Setup
from ..errors import CachevizError
from ..resist import Comparison, Lab
from ..robustness import attack_study, pixel_scale
from ..rows import json_bytes
from .messages import WIDGETS
from .resources import cache_index, result_tag, workspace
from .state import MODELS, Choice, test_size
from .studies import setup_cli
from .tables import export_buttons, pct

MINIMAL_ATTACKS, CURVE_ATTACKS, CORRUPTIONS = A.MINIMAL_ATTACKS, A.CURVE_ATTACKS, A.CORRUPTIONS
ROBUST_MODELS = A.MODELS
MAX_EPSILON, MAX_SEED, PAPER_N = A.MAX_EPSILON, config.MAX_SEED, robustness.PAPER_N
RESIST_ATTACKS, NEIGHBOURS = resist.ATTACKS, resist.NEIGHBOURS
ROBUST_MODES = ("minimal perturbation (Tables 2–4)", "strength curve")
ATTACK_NAMES = {
    "fgsm": "FGSM", "ifgsm": f"I-FGSM ({A.IFGSM_STEPS} steps)", "pixel": "single pixel", "blur": "Gaussian blur",
    "hopskipjump": "HopSkipJump (decision-based)", "l2": f"L2 I-FGSM ({A.IFGSM_STEPS} steps)",
    "brightness": "brightness", "contrast": "contrast", "gamma": "gamma",
}
MODEL_NAMES = {"network": "network (gray-box, Table 2)", "cache": "cache model (white-box, Table 3)",
               "cache-only": "cache-only model (white-box, Table 3)"}
# The lab's parameters named by the widgets that set them, for its one-sentence warnings.
NAMES = {**WIDGETS, "epsilons": "Strengths", "attack": "Attack", "against": "Model attacked", "n": "Images",
         "source_model": "Source network"}


# ---------------------------------------------------------------------------------------------
# The robustness lab


def test_part_size(choice: Choice) -> int | None:
    """How many images the setup's test part holds (the attacks draw from it, never from the
    tuning part), without loading the model: None where the dataset's size is not known here."""
    s = choice.setup
    n = test_size(s.dataset, choice.data_dir)
    if n is None:
        return None
    n = min(int(n), s.test_limit) if s.test_limit else int(n)
    return n if s.val_from_train else n - round(s.val_fraction * n)


def strengths_text(attack: str) -> str:
    return ", ".join(f"{v:g}" for v in A.default_strengths(attack))


def parse_strengths(text: str, attack: str) -> tuple[tuple[float, ...] | None, str | None]:
    """(the strengths, None), or (None, one sentence saying what is wrong with `text`)."""
    from .tables import parse_numbers

    try:
        return A.check_strengths(parse_numbers(text, "strengths"), attack), None
    except CachevizError as exc:
        return None, exc.render(NAMES)


def transfer_sources(choice: Choice) -> list[str]:
    """The other networks of the sidebar's dataset: Table 4's sources of adversarials."""
    return [m for m in MODELS.get(choice.setup.dataset, []) if m != choice.setup.model]


def robustness_study(choice: Choice, attack: str, against: str | None, n: int, seed: int,
                     strengths: tuple[float, ...] | None = None, source_model: str | None = None):
    """The Attack (no strengths) or Curve study of the sidebar's setup; a transfer source gets
    its own default key layers and weights, as the command line's --source-model does."""
    source = None if not source_model else choice.setup.replace(model=source_model, layers=(), checkpoint=None)
    return attack_study(choice.setup, attack, against or "network", int(n), int(seed), strengths, source)


def attack_cli(study) -> str:
    """The command line that computes the same rows. Its --seed would reseed the setup's split
    and tuning too, so it is written only when the images' seed is the setup's."""
    s: Setup = study.setup
    parts = setup_cli("attack", s)
    parts.append(f"--attack {study.attack}")
    if study.against:
        parts.append(f"--against {study.against}")
    parts.append(f"--n {study.n}")
    if study.seed == s.seed and s.seed:
        parts.append(f"--seed {s.seed}")
    if getattr(study, "epsilons", None) is not None and study.kind == "curve":
        parts.append(f"--epsilons {','.join(f'{e:g}' for e in study.epsilons)}")
    if getattr(study, "source", None) is not None:
        parts.append(f"--source-model {study.source.model}")
    return " ".join(parts)


def _f(v, digits: int = 4):
    return None if v is None else round(float(v), digits)


def attack_table(rows: list[dict]) -> list[dict]:
    """Tables 2-4 rows for display: accuracies in %, rho_adv over the successes."""
    return [{
        "model": r["model"], "accuracy on adversarials %": pct(r["accuracy"]), "clean accuracy %": pct(r["clean_accuracy"]),
        "answer changed %": pct(r.get("changed")), "success rate %": pct(r["success_rate"]),
        "mean ρ_adv": _f(r.get("rho_adv")), "median ρ_adv": _f(r.get("rho_adv_median")),
        "mean strength": _f(r.get("strength")), "ε in pixels": _f(r.get("epsilon_pixels")),
        "images": r["n"], "failed": r["n_failed"], "θ": r.get("theta"), "λ": r.get("lam"),
        "adversarials made on": r.get("source_model"),
    } for r in rows]


def curve_table(rows: list[dict]) -> list[dict]:
    """One row per strength: each model's accuracy % and its s.e.m. (points)."""
    by: dict[float, dict] = {}
    for r in rows:
        d = by.setdefault(float(r["epsilon"]), {"strength": float(r["epsilon"])})
        if r.get("epsilon_pixels") is not None:
            d["in pixels"] = _f(r["epsilon_pixels"])
        d[f"{r['model']} %"] = pct(r["accuracy"])
        d[f"{r['model']} ± s.e.m."] = pct(r.get("sem"))
    return [by[k] for k in sorted(by)]


def robust_exports(fig, rows: list[dict], stem: str, key: str) -> None:
    """JSON beside the usual CSV and PNG downloads."""
    row = st.container(horizontal=True, vertical_alignment="center", gap="small")
    row.download_button("JSON", data=json_bytes(rows), file_name=f"{stem}.json", mime="application/json",
                        key=f"{key}_json", icon=":material/download:", on_click="ignore",
                        help="The rows, as `--out X.json` writes them.")
    with row:
        export_buttons(fig, rows, stem, key)


def attack_strengths(study, choice: Choice) -> dict | None:
    """The stored per-image tensors of a minimal-perturbation study (None for a curve), as
    `robustness.stored_attack_tensors` finds them but reusing the folder walk the lookup just made."""
    if study.kind != "attack":
        return None
    from .panels import LOOKUP_MAX_AGE

    key = study.key(choice.data_dir, max_age=LOOKUP_MAX_AGE)
    hit = None if key is None else store.load_tensors(study.path(choice.data_dir, key).with_suffix(".safetensors"), key)
    return None if hit is None else hit[0]


# ---------------------------------------------------------------------------------------------
# Why it resists


_HASH = {Setup: lambda s: store.config_hash(s.to_dict())}


@st.cache_resource(max_entries=2, show_spinner="Preparing the network and the cache for gradients…", hash_funcs=_HASH)
def _lab(setup: Setup, where: str, device: str, tag: str, theta: float, lam: float, theta_cache_only: float) -> Lab:
    ws = workspace(setup, where, device, tag)
    index = cache_index(setup, where, device, tag, ())  # the object the Neighbours page shares
    return Lab(ws, index, theta, lam, theta_cache_only)


def resist_lab(choice: Choice, result: dict) -> Lab:
    """The sidebar setup's three models over its test-time cache, at the tuned theta and lam."""
    return _lab(choice.setup, str(choice.data_dir), choice.device, result_tag(result), float(result["theta"]),
                float(result["lam"]), float(result["theta_cache_only"]))


def neighbour_gallery(ws, ex, truth: int, size: int = 72) -> None:
    """The cache's nearest stored images for one query, framed green where the label is the
    image's true one, red elsewhere, each with its label and share of the similarity mass."""
    from .. import plots, retrieval
    from .resources import thumbnails

    classes = ws.ds.classes
    colors = [plots.MATCH if int(label) == truth else plots.MISMATCH for label in ex.labels]
    thumbs = thumbnails(retrieval.neighbour_images(ws.ds, ex), colors, size=size)
    caps = [f"{classes[label]} · σ {sh:.0%}" for label, sh in zip(ex.labels, ex.shares)]
    st.image(thumbs, caption=caps, width=int(thumbs[0].shape[1]))


def attack_verdict(c: Comparison, classes: list[str]) -> str:
    who = {"network": "the network", "cache": "the cache model", "cache-only": "the cache-only model"}[c.against]
    was, now = classes[c.target], classes[c.adv.preds[c.against]]
    if c.eps == 0:
        return f"At ε = 0 the image is unchanged: {who} says **{was}**."
    if c.flipped:
        return f"The attack flips {who}: **{was}** → **{now}**."
    return f"{who[0].upper()}{who[1:]} still says **{was}**: this ε is not enough."


def resist_verdict(c: Comparison, classes: list[str]) -> str:
    """One sentence: does the adversarial still retrieve its true class?"""
    t = classes[c.adv.truth]
    k = len(c.adv.explanation.labels)
    a, b = c.adv.true_neighbours, c.clean.true_neighbours
    vote = c.adv.preds["p_mem"]
    if c.eps == 0:
        return (f"{a} of the {k} nearest stored images are labelled {t} and the cache's vote p_mem says "
                f"{classes[vote]}; move ε to see whether an adversarial keeps them.")
    held = f"{a} of its {k} nearest stored images are labelled {t} (the clean image: {b})"
    if vote == c.adv.truth and 2 * a > k:
        return f"Yes: {held}, and the cache's vote p_mem still says {t}."
    if vote == c.adv.truth:
        return f"Partly: only {held}, yet the similarity-weighted vote p_mem still says {t}."
    return f"No: {held}, and the cache's vote p_mem now says {classes[vote]}."


def eps_in_pixels(spec, eps: float) -> str:
    px = eps * pixel_scale(spec)
    return f"{px:.4f} in [0, 1] pixel units (≈ {255 * px:.1f} of 255 grey levels)"

