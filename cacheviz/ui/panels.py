"""What a page shows for a study: its stored result, or the button that runs it and, while it
runs, its stages, progress bar, elapsed time and ETA; and errors as one sentence each."""
from __future__ import annotations

import functools
import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st

from .. import retrieval
from ..errors import CachevizError
from ..experiment import Evaluate
from ..progress import Stage
from .jobs import OUT_OF_MEMORY, Job
from .messages import message, shown
from .resources import cache_index, jobs, locks, result_tag, setup_lock
from .roles import start_refusal
from .state import OFFLINE, Choice, apply_preset, data_dir

log = logging.getLogger("cacheviz.app")

# The app asks on every rerun whether a study is stored; a folder dataset's listing is walked
# again at most this often (seconds).
LOOKUP_MAX_AGE = 5.0
INDEX_STAGES = (Stage.LOAD, Stage.TRAIN_FEATURES)
# Progress redraws per second of all sessions watching one job together (each at most 1/s).
REDRAWS_PER_S = 4


def use_offline_preset_button(key: str) -> None:
    st.button(f"Switch to the offline preset ({OFFLINE})", key=key, on_click=apply_preset, args=(OFFLINE,),
              type="primary")


def show_problem(msg: str, key: str = "offline_from_problem") -> None:
    """One sentence, where the data lives, and the way out: the offline preset."""
    st.error(shown(msg))
    # the configured path, never the server's absolute one: the app is open to a whole class
    where = data_dir()
    st.caption(f"Data directory: `{where}` (set `CACHEVIZ_DATA_DIR` to use another)." if not where.is_absolute()
               else "Data directory: the one the server's `CACHEVIZ_DATA_DIR` names.")
    use_offline_preset_button(key)


@contextmanager
def guard(key: str = "guard"):
    """Turn any error of a page into a message: never a traceback in the browser."""
    try:
        yield
    except CachevizError as exc:
        show_problem(message(exc), key=f"{key}_offline")
    except MemoryError:
        st.error(OUT_OF_MEMORY)
    except Exception as exc:  # Streamlit's stop/rerun are BaseExceptions and pass through
        log.error("unexpected error in the app:\n%s", traceback.format_exc())
        st.error(f"Something unexpected went wrong ({type(exc).__name__}); reload the page, and if it happens "
                 f"again report it with the server log.")


def _fmt_s(sec: float) -> str:
    sec = max(0.0, float(sec))
    return f"{sec:.0f} s" if sec < 90 else f"{sec // 60:.0f} min {sec % 60:02.0f} s"


def _stage_lines(snap: dict, stages: tuple[str, ...]) -> str:
    finished = dict(snap["finished"])
    lines = []
    for name in stages:
        if name in finished:
            lines.append(f":green[:material/check_circle:] {name} — {_fmt_s(finished[name])}")
        elif name == snap["stage"]:
            lines.append(f":blue[:material/progress_activity:] **{name}**")
        else:
            lines.append(f":gray[:material/radio_button_unchecked: {name}]")
    if snap["stage"] and snap["stage"] not in stages:  # e.g. waiting for another build
        lines.append(f":blue[:material/hourglass_top:] {snap['stage']}")
    if snap["state"] == "queued":
        ahead = snap["ahead"]
        lines.insert(0, f":blue[:material/hourglass_top:] **In line** — {ahead} job{'s' if ahead != 1 else ''} "
                        f"ahead of this one (one runs at a time, first come, first served)")
    return "  \n".join(lines)


def _bar(snap: dict) -> tuple[float, str]:
    frac = min(max(snap["done"] / snap["total"], 0.0), 1.0) if snap["state"] == "running" else 0.0
    el = snap["stage_elapsed"]
    eta = f" · ETA {_fmt_s(el / frac - el)}" if 0.02 < frac < 1 and el > 1 else ""
    detail = f" — {snap['detail']}" if snap["detail"] else ""
    count = f" {snap['done']}/{snap['total']}" if snap["total"] > 1 else ""
    what = "waiting in line" if snap["state"] == "queued" else f"{snap['stage'] or 'starting'}{detail}{count}"
    return frac, f"{what} · {_fmt_s(el)} in this stage{eta} · elapsed {_fmt_s(snap['elapsed'])}"


# Streamlit's running indicator animates for as long as a script runs, and a follow loop runs for
# the whole build: in every watching browser, for nothing the progress bar does not already say.
_HIDE_RUNNING = '<style>[data-testid="stStatusWidget"]{visibility:hidden}</style>'


def follow(job: Job, stages: tuple[str, ...]) -> None:
    """Draw the job's stages and progress until it ends, in this script run.

    One loop per watching session that sleeps on the job's own event, rather than a fragment
    rerun every second per session: watching costs small redraws instead of script runs, and
    each session goes on to its result the moment the job ends. Any click or page switch
    interrupts the loop (Streamlit stops a run at its next command); the job goes on.

    A redraw costs each watching browser a re-render of the page (82-86 ms of CPU in headless
    Chromium: `python benchmarks/load.py --redraw-cost`), so a tick sends only the bar; the
    stage list is sent again only when it changes. The redraws of all sessions together are
    bounded: with more than `REDRAWS_PER_S` watchers each redraws less often (thirty watchers:
    every 7.5 s), so a class does not take the CPU from the build it watches. The end of the
    job wakes every watcher."""
    box = st.empty()
    job.watch(+1)
    try:
        with box.container():
            st.html(_HIDE_RUNNING)
            lines_slot, bar_slot = st.empty(), st.empty()
            st.caption("You may switch pages; the work goes on.")
        shown = None
        while True:
            snap = job.snapshot()
            lines = _stage_lines(snap, stages)
            if lines != shown:
                lines_slot.markdown(lines)
                shown = lines
            frac, text = _bar(snap)
            bar_slot.progress(frac, text=text)
            if snap["state"] not in ("queued", "running"):
                break
            job.finished.wait(max(1.0, job.watchers / REDRAWS_PER_S))
    finally:
        job.watch(-1)
    box.empty()


def _handed_over(study) -> None:
    """Log (at INFO, CACHEVIZ_LOG_LEVEL=INFO) the moment this session's run has the study's
    result to draw: benchmarks/load.py reads it to tell server time from browser time."""
    if log.isEnabledFor(logging.INFO):
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        log.info("cacheviz-delivered %.3f %s %s", time.time(), ctx.session_id if ctx else "-", study.title)


@contextmanager
def experiment_page(key: str, title: str, intro: str):
    """A page of the paper's experiments: its title and intro, then the body under `guard`, given
    the sidebar's choice; a choice that cannot be loaded here shows its problem instead."""
    from .state import current

    st.title(title)
    st.markdown(intro)
    with guard(key):
        choice = current()
        if choice.problem:
            show_problem(choice.problem, key=f"{key}_problem")
            st.stop()
        yield choice


def job_key(study, where: Path) -> tuple:
    return (study.kind, study.ident(), str(Path(where).resolve()))


def start(study, choice: Choice, lock_key: Any = None) -> Job:
    """Run `study` in the background on the shared board (a running twin is followed instead)."""
    where, device = choice.data_dir, choice.device
    lock = locks()(lock_key) if lock_key is not None else setup_lock(choice.setup, where)
    # a bound method and plain arguments: picklable, so it can run in a worker process
    return jobs().start(job_key(study, where), study.title, functools.partial(study.run, str(where), device), lock)


def study_panel(study, choice: Choice, key: str, label: str, refusal: str | None = None, note: str | None = None,
                lock_key: Any = None, offer_offline: bool = False, button_key: str | None = None) -> Any | None:
    """The study's stored result; else its run button and, while it runs, its progress.

    `refusal`: one sentence why it must not run (shown, no button). The job is shared by every
    session asking for the same study, and a page switch does not stop it.
    """
    result = study.lookup(choice.data_dir, max_age=LOOKUP_MAX_AGE)
    if result is not None:
        _handed_over(study)
        return result
    job = jobs().get(job_key(study, choice.data_dir))
    if job is None or not job.active:
        if refusal:
            st.warning(refusal, icon=":material/memory:")
            return None
        ask = start_refusal()  # a student: results stored or running stay visible, starting is the teacher's
        if ask:
            st.info(ask, icon=":material/school:")
            return None
        if note and job is None:
            st.info(shown(note))
        slot = st.empty()
        if not slot.button(label, type="primary", key=button_key or f"{key}_run", icon=":material/play_arrow:"):
            if job is not None and job.state == "failed":
                msg = shown(job.error or "The last run failed; try again.")
                if offer_offline:
                    show_problem(msg, key=f"{key}_failed")
                else:
                    st.error(msg)
            return None
        slot.empty()  # the progress takes the button's place
        job = start(study, choice, lock_key)
    follow(job, study.stages)  # also when another session started it
    if job.state == "done":
        result = study.lookup(choice.data_dir, max_age=LOOKUP_MAX_AGE)
        _handed_over(study)
        return result
    st.rerun()  # the next run says why it failed, with the button to try again


def build_panel(choice: Choice, key: str) -> dict | None:
    """The evaluate result of the sidebar's setup, or the "Build cache" button and its progress."""
    if choice.problem:
        show_problem(choice.problem, key=f"{key}_problem")
        return None
    from .studies import missing_data_note

    return study_panel(Evaluate(choice.setup), choice, key, "Build cache", note=missing_data_note(choice),
                       offer_offline=True, button_key=f"{key}_build")


# ---------------------------------------------------------------------------------------------
# The cache as an index for the Neighbours page (its features come from the store after a build)


def _index_key(choice: Choice, layers: tuple[str, ...]) -> tuple:
    setup = choice.setup.replace(layers=tuple(layers)) if layers else choice.setup
    return ("index", setup, str(Path(choice.data_dir).resolve())), setup


def index_job(choice: Choice, layers: tuple[str, ...] = ()) -> Job | None:
    return jobs().get(_index_key(choice, layers)[0])


def start_index_job(choice: Choice, layers: tuple[str, ...] = ()) -> Job:
    """Make sure the cache items' features for `layers` are in the store, in the background.

    They are, right after a build, and then this takes a fraction of a second; for another key
    layer (a comparison) or after the store was cleared it extracts them, with progress.
    """
    key, setup = _index_key(choice, layers)
    where, device = choice.data_dir, choice.device
    task = functools.partial(retrieval.store_cache_features, setup, str(where), device)
    return jobs().start(key, f"keys {','.join(layers or choice.layers)}", task, setup_lock(setup, where))


def load_index(choice: Choice, result: dict, layers: tuple[str, ...] = (), key: str = "index"
               ) -> retrieval.CacheIndex | None:
    """The cache keyed on `layers` (default: the setup's); while its features are extracted, the
    progress is shown and None returned."""
    layers = tuple(layers)
    job = index_job(choice, layers)
    if job is not None and job.state == "failed":
        st.error(job.error or "Preparing these keys failed.")
        if not st.button("Try again", key=f"{key}_retry"):
            return None
        job = None
    if job is None:
        job = start_index_job(choice, layers)
        for _ in range(20):  # keys already in the store load in a moment: spare the page a flash of progress
            if not job.active:
                break
            time.sleep(0.1)
    if job.active:
        follow(job, INDEX_STAGES)
    if job.state == "failed":
        st.rerun()  # shown, with "Try again", by the next run
    return cache_index(choice.setup, str(choice.data_dir), choice.device, result_tag(result), layers)
