"""The "Knowledge store" page's parts: creating the setup's store on the job board, one store
object per store per server, edits that end in a message and a rerun, what an edit changed, a
query explained by the stored items, and the equivalent command lines.

With the teacher role on (`roles`), a student's edits go to the session's own branch of the
store and the teacher publishes a branch to the class store ("main")."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import streamlit as st

from .. import images, kdb, kstore, plots, retrieval
from ..errors import CachevizError
from ..progress import Reporter, Stage
from .messages import markdown_text, message, shown, upload_name
from .panels import follow
from .resources import decode, jobs, setup_lock
from .roles import MAIN, is_teacher, session_branch, start_refusal, teacher_mode_on
from .state import Choice
from .studies import setup_cli

CREATE_STAGES = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, Stage.TUNE, Stage.TEST, "store")
MODELS = {"network": "network", "cache": "cache model", "cache_only": "cache-only"}
MAX_CHANGED_SHOWN = 24
K_NOTES = "ks_notes"  # what the last edit did, shown by the run after it

INTRO = """\
The cache model keeps what it knows about the training images **outside the network's
weights**: as rows of a database (here [Milvus Lite](https://milvus.io/docs/milvus_lite.md),
embedded, on disk), one row per stored image: its key (the unit-norm activations of the key
layers) and its label. So the knowledge can be edited the way a database is: *add rows instead
of fine-tuning*, delete rows to make it forget, and undo. Nothing is trained; every answer is
explained by the stored items it retrieved. Each edit is a new version of the store, and the
page shows what it changed on the held-out test images.
"""


def create_store(setup, where: str, device: str, progress: Reporter) -> None:
    """The job board's task (module-level, so a worker process can run it)."""
    kstore.KnowledgeStore.create(setup, where, device, progress=progress)


def store_path(choice: Choice) -> Path:
    return kstore.stores_dir(choice.data_dir) / kstore.store_name(choice.setup)


def _job_key(choice: Choice) -> tuple:
    return ("kstore", str(store_path(choice).resolve()))


@st.cache_resource(max_entries=4, show_spinner="Opening the knowledge store…")
def _store(path: str, where: str, device: str, created: float) -> kstore.KnowledgeStore:
    # `created` keys the object to this store: one deleted and created again is a new object
    return kstore.KnowledgeStore(Path(path), Path(where), device)


def open_store(choice: Choice) -> kstore.KnowledgeStore | None:
    """The sidebar setup's store, with the versions other sessions or the CLI committed; None if
    it does not exist yet."""
    path = store_path(choice)
    meta = path / "meta.json"
    if not meta.exists():
        return None
    try:
        ks = _store(str(path), str(choice.data_dir), choice.device, meta.stat().st_mtime)
    except kstore.StoreUnfinished:
        return None  # left by a create killed before creates were atomic: the create button makes it anew
    return ks.refresh()


def store_panel(choice: Choice) -> kstore.KnowledgeStore | None:
    """The store; else the intro, the "Create the knowledge store" button and, while it is
    created (by this session or another one), its progress."""
    ks = open_store(choice)
    if ks is not None:
        return ks
    st.markdown(INTRO)
    job = jobs().get(_job_key(choice))
    if job is None or not job.active:
        ask = start_refusal()  # creating it trains, tunes and perhaps downloads: the teacher's to start
        if ask:
            st.info(ask, icon=":material/school:")
            return None
        slot = st.empty()
        if not slot.button("Create the knowledge store", type="primary", key="ks_create",
                           icon=":material/database:"):
            if job is not None and job.state == "failed":
                st.error(job.error or "Creating the store failed; try again.")
            st.caption(f"Version 1 holds the cache items of {choice.setup.dataset} · {choice.setup.model} "
                       f"(the training images, keyed on {', '.join(choice.layers) or 'the model’s default layers'}); "
                       f"θ and λ are tuned on the validation part, as for the cache model.")
            return None
        slot.empty()
        task = functools.partial(create_store, choice.setup, str(choice.data_dir), choice.device)
        job = jobs().start(_job_key(choice), "knowledge store", task, setup_lock(choice.setup, choice.data_dir))
    follow(job, CREATE_STAGES)  # also when another session started it
    st.rerun()  # the next run opens the store, or shows why the job failed


# ---------------------------------------------------------------------------------------------
# Lines of the store: the class store ("main") and each student session's own copy


def session_view(base: kstore.KnowledgeStore) -> kstore.KnowledgeStore:
    """The store as this session sees and edits it: the class store for the teacher (and for
    everyone with the role off), a student's own branch otherwise."""
    line = session_branch()
    return base if line == MAIN else base.on_branch(line)


def edit_caption() -> str:
    if session_branch() != MAIN:
        return ("Each edit commits a new version of your copy at once; undo is one more version, equal to the one "
                "before the edit. The class store and the other students' copies do not change.")
    return ("Each edit commits a new version at once, for every session and the command line; undo is one more "
            "version, equal to the one before the edit.")


def own_copy_panel(base: kstore.KnowledgeStore) -> None:
    """Which line this session is on; for a student, the way back to the class store."""
    line = session_branch()
    if line == MAIN:
        if teacher_mode_on():
            st.caption("Signed in as the teacher: your edits change the class store every session sees.")
        return
    st.info(f"This is **your own copy** of the store (`{line}`): only you see your edits until the teacher "
            f"publishes them.", icon=":material/person:")
    own = base.branches().get(line)
    if own is not None and base.head.number > own.number:
        st.caption("The class store has changed since your copy's last edit; start over to take the new one "
                   "(your edits are dropped from your copy).")
    if st.button("Start over from the class store", key="ks_reset", icon=":material/restart_alt:",
                 disabled=own is None, help="Your copy has no edit of its own yet." if own is None else None):
        edit(base.reset_branch, line)
        st.rerun()


MAX_BRANCHES_SHOWN = 40


def students_edits(base: kstore.KnowledgeStore) -> None:
    """The teacher's view of the students' copies: each one's head, its items per class beside the
    class store's, and the button that publishes it to everyone."""
    if not is_teacher():
        return
    heads = base.branches()
    if not heads and not teacher_mode_on():
        return  # single-user, and nobody ever had a copy: nothing to say
    st.subheader("Students' edits")
    if not heads:
        st.caption("No student has edited their own copy yet; their edits show here, for you to publish.")
        return
    st.caption("Each student edits a copy of their own. Publishing a copy makes the class store equal to it "
               "(one more version of the class store; undo takes it back).")
    newest = sorted(heads.items(), key=lambda kv: -kv[1].created)[:MAX_BRANCHES_SHOWN]
    main_counts = base.class_counts()
    for name, v in newest:
        with st.expander(f"`{name}` · version {v.number} · {v.op} {markdown_text(v.detail)} · {v.n_live:,} items"):
            counts = base.on_branch(name).class_counts()
            table = {"": ["class store", "this copy"]}
            table.update({c: [int(a), int(b)] for c, a, b in zip(base.classes, main_counts, counts)})
            st.dataframe(table, hide_index=True, key=f"ks_branch_counts_{name}")
            if st.button("Publish to the class store", key=f"ks_publish_{name}", type="primary",
                         icon=":material/publish:"):
                edit(base.publish, name)
                st.rerun()
    if len(heads) > len(newest):
        st.caption(f"The {len(newest)} most recently edited of {len(heads)} copies shown.")


# ---------------------------------------------------------------------------------------------
# Edits: each runs here (they take milliseconds on the default setup), then the page runs again


def edit(what, *args, ok: str = "", notes: list[tuple[str, str]] | None = None) -> bool:
    """Run one store edit; its outcome (and `notes`) are shown by the rerun. False on a refusal."""
    notes = list(notes or [])
    try:
        v = what(*args)
    except CachevizError as exc:
        notes.append(("error", message(exc)))
        st.session_state[K_NOTES] = notes
        return False
    notes.insert(0, ("success", f"Version {v.number}: {v.op} {markdown_text(v.detail)}{ok} — "
                                f"{v.n_live:,} items now. The answers below are the new version's."))
    st.session_state[K_NOTES] = notes
    return True


def show_notes() -> None:
    for kind, text in st.session_state.pop(K_NOTES, []):
        getattr(st, kind)(text)


def decode_all(files, invert_light: bool, ds) -> tuple[list[np.ndarray], list[str], list[str]]:
    """(images, names, one sentence per unreadable file); light-background images inverted for
    data sets of light ink on black when `invert_light`."""
    good, names, bad = [], [], []
    for f in files:
        name = upload_name(f.name)  # Markdown-safe, for the messages
        try:
            img = decode(f.getvalue(), name)
        except CachevizError as exc:
            bad.append(str(exc))
            continue
        if invert_light and retrieval.background_differs(ds, img):
            img = retrieval.invert(img)
        good.append(img)
        names.append(re.sub(r"\\(.)", r"\1", name))  # the store keeps the plain name (no folder, no Markdown)
    return good, names, bad


# ---------------------------------------------------------------------------------------------
# What an edit changed


def store_default_pair(ks: kstore.KnowledgeStore) -> tuple[int, int]:
    """(before, after) for the head: against the version it followed on its own line (main, or a
    student's branch), so an undo or a reset is judged against what it undid and a publish against
    the class store it replaced; a branch's first edit against the class store it started from.
    Numbers are shared by all lines, so "the number before" may be another session's version."""
    h = ks.head
    prev = [v.number for v in ks.versions if v.branch == h.branch and v.number < h.number]
    if prev:
        return prev[-1], h.number
    return (h.parent if h.parent is not None else h.number), h.number


def per_class_rows(ks: kstore.KnowledgeStore, before: int, after: int) -> list[dict]:
    """Per class (and all): items stored, and each model's test accuracy (%) at both versions."""
    ea, eb = ks.evaluate(before), ks.evaluate(after)
    C = len(ks.classes)
    pa, pb = ea.per_class(C), eb.per_class(C)
    na, nb = ks.class_counts(before), ks.class_counts(after)
    rows = []
    for c in range(C):
        r = {"class": ks.classes[c], "items before": int(na[c]), "items after": int(nb[c]),
             "test images": int((eb.y == c).sum())}
        for key, label in MODELS.items():
            r[f"{label} before (%)"] = _pct(pa[key][c])
            r[f"{label} after (%)"] = _pct(pb[key][c])
        rows.append(r)
    total = {"class": "all", "items before": int(na.sum()), "items after": int(nb.sum()), "test images": len(eb.y)}
    for key, label in MODELS.items():
        attr = "pred_net" if key == "network" else f"pred_{key}"
        total[f"{label} before (%)"] = _pct((getattr(ea, attr) == ea.y).mean())
        total[f"{label} after (%)"] = _pct((getattr(eb, attr) == eb.y).mean())
    return rows + [total]


def _pct(x) -> float | None:
    return None if x is None or np.isnan(x) else round(100 * float(x), 1)


def store_verdict(ks: kstore.KnowledgeStore, rows: list[dict], before: int, after: int) -> str:
    """One sentence from the numbers: a forgotten class first, else the overall change."""
    gone = [r for r in rows[:-1] if r["items before"] > 0 and r["items after"] == 0 and r["test images"]]
    back = [r for r in rows[:-1] if r["items before"] == 0 and r["items after"] > 0 and r["test images"]]
    if gone:
        r = gone[0]
        c = r["class"]
        return (f"After removing {c}: the network still gets {r['network after (%)']:.0f}% of the test images of "
                f"class {c} right; the cache-only model gets {r['cache-only after (%)']:.0f}% (it has no {c} left "
                f"to retrieve), and the cache model, which mixes both, {r['cache model after (%)']:.0f}%.")
    if back:
        r = back[0]
        c = r["class"]
        return (f"With {c} back in the store, the cache-only model gets {r['cache-only after (%)']:.0f}% of the "
                f"test images of class {c} right again (it had {r['cache-only before (%)']:.0f}%); the network, untouched, "
                f"{r['network after (%)']:.0f}%.")
    t = rows[-1]
    return (f"Version {after} against version {before}: cache-only {t['cache-only before (%)']:.1f}% → "
            f"{t['cache-only after (%)']:.1f}%, cache model {t['cache model before (%)']:.1f}% → "
            f"{t['cache model after (%)']:.1f}% on {t['test images']:,} test images; the network's "
            f"{t['network after (%)']:.1f}% never moves (an edit changes only the stored items).")


def changed_gallery(ks: kstore.KnowledgeStore, before: int, after: int, model: str, size: int = 72) -> int:
    """The test images whose answer from `model` changed, captioned true · network · before → after."""
    rows = kstore.changed(ks.evaluate(before), ks.evaluate(after), model)
    if not rows:
        return 0
    ds, cls = ks.workspace().ds, ks.classes
    shown = rows[:MAX_CHANGED_SHOWN]
    imgs = ds.test_x[[r["test_idx"] for r in shown]].numpy()
    name = lambda c: cls[c] if c >= 0 else "—"  # noqa: E731 - an empty store answers nothing
    colors = [plots.MATCH if r["after"] == r["label"] else plots.MISMATCH for r in shown]
    thumbs = [images.framed(images.enlarge(im, size), col, width=3) for im, col in zip(imgs, colors)]
    caps = [f"#{r['test_idx']} true {name(r['label'])} · net {name(r['network'])} · "
            f"{name(r['before'])} → {name(r['after'])}" for r in shown]
    st.image(thumbs, caption=caps, width=thumbs[0].shape[1])
    if len(rows) > len(shown):
        st.caption(f"The first {len(shown)} of {len(rows)} shown.")
    return len(rows)



# ---------------------------------------------------------------------------------------------
# A query, explained by the stored items


def store_explain(ks: kstore.KnowledgeStore, img: np.ndarray, shown: int = 12) -> dict:
    """The query's answers (network, cache-only, cache model) and its nearest stored items with
    their share of the cache's vote (the softmax over the k retrieved items at θ)."""
    q, p_net = ks.keys_of(img)
    q = q.float().cpu().numpy()
    p_net = p_net.float().cpu()[0].numpy()
    p_mem = ks.p_mem(q)[0].numpy()
    p_only = ks.p_mem(q, theta=ks.theta_cache_only)[0].numpy()
    d, ids = ks.search(q, kstore.DEFAULT_K)
    d, ids = d[0], ids[0]
    live = ids >= 0
    w = np.zeros_like(d, dtype=np.float64)
    if live.any():
        e = np.exp(ks.theta * (d[live] - d[live].max()))
        w[live] = e / e.sum()
    if not live.any():  # an empty store has no vote: uniform, so the cache model is the network
        p_mem = p_only = np.full_like(p_net, 1 / len(p_net))
    keep = np.flatnonzero(live)[:shown]
    return {"p_net": p_net, "p_mem": p_mem, "p": (1 - ks.lam) * p_net + ks.lam * p_mem, "p_only": p_only,
            "ids": ids[keep], "sims": d[keep], "shares": w[keep], "k": int(live.sum())}


def store_neighbour_gallery(ks: kstore.KnowledgeStore, ex: dict, pred: int, size: int = 88) -> None:
    items = [ks.item(int(i)) for i in ex["ids"]]
    thumbs = [images.framed(images.enlarge(ks.image(int(i)), size), plots.MATCH if it["label"] == pred else plots.MISMATCH,
                            width=4) for i, it in zip(ex["ids"], items)]
    caps = [f"{it['class']} · sim {s:.3f} · {sh:.0%} of the vote · {'added' if it['source'].startswith('upload') else 'train'}"
            f" #{it['id']}" for it, s, sh in zip(items, ex["sims"], ex["shares"])]
    st.image(thumbs, caption=caps, width=thumbs[0].shape[1])
    st.caption(f"The {len(items)} nearest of the k = {ex['k']} stored items p_mem votes over hold "
               f"**{ex['shares'].sum():.0%}** of its vote. Green frame: the item's label is the cache model's answer "
               f"({ks.classes[pred]}); red: another label. *added*: an image taught through an edit.")


# ---------------------------------------------------------------------------------------------
# What the page says about the store


def store_k() -> int:
    return kstore.DEFAULT_K


def version_label(ks: kstore.KnowledgeStore):
    """A selectbox's words for a version number."""
    by = {v.number: v for v in ks.versions}
    return lambda n: f"v{n} · {by[n].op} {by[n].detail}"[:90] if n in by else f"v{n}"


def how_it_answers(ks: kstore.KnowledgeStore) -> str:
    return (f"**How it answers.** A query's key (the unit-norm activations of {', '.join(ks.layers)}) retrieves "
            f"the k = {kstore.DEFAULT_K} most similar items of the current version; p_mem is the softmax "
            f"(θ = {ks.theta:g}) of their similarities, summed per label; the cache model answers "
            f"p = (1 − λ) p_net + λ p_mem with λ = {ks.lam:g}, the cache-only model p_mem alone "
            f"(θ = {ks.theta_cache_only:g}). An edit changes which rows are live; no weight changes.")


def _store_folder(ks: kstore.KnowledgeStore) -> str:
    """The store's folder relative to the data directory (`stores/<name>`): a browser never
    sees, nor chooses, a path on the server."""
    try:
        return ks.path.resolve().relative_to(Path(ks.data_dir).resolve()).as_posix()
    except ValueError:  # a store opened by path, outside the data directory
        return f"stores/{ks.path.name}"


def where_it_lives(ks: kstore.KnowledgeStore) -> str:
    folder = _store_folder(ks)
    db = shown(kdb.describe_uri(Path(folder))).replace("`", "'")  # a code span: shown literally, whatever a URI holds
    return (f"Database: `{db}`; versions, key segments and added images under `{folder}` in the data "
            f"directory. Top-k search: FAISS ({ks.index_kind}) over the live items.")


def store_cli(choice: Choice, ks: kstore.KnowledgeStore, label: int = 0) -> list[str]:
    """The `python -m cacheviz store ...` commands that do what the page does, for this setup."""
    base = " ".join(setup_cli("store", choice.setup)[1:])
    cls = ks.classes[label]
    cls = f'"{cls}"' if " " in cls else cls
    return [f"python -m cacheviz store create {base}",
            f"python -m cacheviz store list {base}",
            f"python -m cacheviz store remove {base} --class {cls}",
            f"python -m cacheviz store add {base} --label {cls} one.png two.png",
            f"python -m cacheviz store add {base} --label {cls} --folder my_{cls}s/",
            f"python -m cacheviz store undo {base}",
            f"python -m cacheviz store query {base} mistaken.png"]


__all__ = ["CREATE_STAGES", "create_store", "store_path", "open_store", "store_panel", "session_view", "edit_caption",
           "own_copy_panel", "students_edits", "edit", "show_notes",
           "decode_all", "store_default_pair", "per_class_rows", "store_verdict", "changed_gallery", "store_explain",
           "store_neighbour_gallery", "how_it_answers", "where_it_lives", "store_cli", "store_k", "version_label"]
