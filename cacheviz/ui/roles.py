"""Who may do what in a shared app: the teacher and the students.

The app binds every interface with no authentication (students must reach it), so with a
teacher password set (`CACHEVIZ_TEACHER_PASSWORD`, or `teacher_password` in Streamlit's
secrets) every session starts as a student: a student's store edits go to a branch of its own,
and work that downloads or runs for minutes is the teacher's to start. Without a password the
app is single-user, as before: every visitor is the teacher and edits the shared store.

The role is session state only: a reload starts a new session, a student again.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading

import streamlit as st

ENV_PASSWORD = "CACHEVIZ_TEACHER_PASSWORD"
SECRET_PASSWORD = "teacher_password"
MAIN = "main"
K_TEACHER = "cv_teacher"  # True once this session signed in as the teacher
K_BRANCH = "cv_branch"  # this student session's branch of the knowledge store
K_PASSWORD = "cv_teacher_password"  # the sign-in field (cleared as soon as it is read)
K_FAILED = "cv_teacher_failed"

ASK_TEACHER = "Ask your teacher to build this first."
WRONG_PASSWORD = "That is not the teacher's password."
OFF_CAPTION = ("Single-user mode: no teacher password is set, so every visitor edits the shared store and "
               "may start builds.")

log = logging.getLogger("cacheviz.app")
_announced = threading.Event()


def _password() -> str:
    """The teacher's password, read on every call so a test (or an operator) can change it."""
    env = os.environ.get(ENV_PASSWORD, "")
    if env:
        return env
    # a probe that never raises (a missing or malformed file is False; Streamlit logs the latter):
    # reading st.secrets without a file would raise, and show an error box on every page
    if st.secrets.load_if_toml_exists():
        return str(st.secrets.get(SECRET_PASSWORD) or "")
    return ""


def teacher_mode_on() -> bool:
    """A teacher password is set: sessions start as students."""
    return bool(_password())


def is_teacher() -> bool:
    """This session may edit the class store and start builds (everyone, with the role off)."""
    return not teacher_mode_on() or bool(st.session_state.get(K_TEACHER))


def session_branch() -> str:
    """The knowledge-store branch this session's edits go to: "main" for the teacher, else the
    session's own `s-<random>` branch (random, so no other session can guess or reach it)."""
    if is_teacher():
        return MAIN
    name = st.session_state.get(K_BRANCH)
    if not name:
        name = st.session_state[K_BRANCH] = "s-" + secrets.token_hex(8)
    return name


def start_refusal() -> str | None:
    """None when this session may start work that downloads or runs for minutes; else the one
    sentence a student sees instead of the button. Every start site of the app asks this."""
    return None if is_teacher() else ASK_TEACHER


def check_password(given: str) -> bool:
    expected = _password()
    # bytes: compare_digest refuses non-ASCII str; constant time, so timing reveals nothing
    return bool(expected) and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _sign_in() -> None:
    given = st.session_state.get(K_PASSWORD) or ""
    st.session_state[K_PASSWORD] = ""  # the password does not stay in the session
    ok = check_password(given)
    st.session_state[K_TEACHER] = ok
    st.session_state[K_FAILED] = not ok
    if ok:
        log.info("a session signed in as the teacher")


def _sign_out() -> None:
    st.session_state[K_TEACHER] = False


def role_sidebar() -> None:
    """The sidebar's role part: one caption with the role off; sign-in or sign-out with it on."""
    sb = st.sidebar
    if not teacher_mode_on():
        sb.caption(OFF_CAPTION)
        return
    sb.divider()
    if st.session_state.get(K_TEACHER):
        sb.caption("Signed in as the teacher: your edits change the class store.")
        sb.button("Sign out", key="cv_sign_out", on_click=_sign_out, icon=":material/logout:")
        return
    with sb.expander("Teacher sign-in", icon=":material/key:"):
        with st.form("cv_sign_in", border=False):
            st.text_input("Teacher password", type="password", key=K_PASSWORD)
            st.form_submit_button("Sign in", on_click=_sign_in)
        if st.session_state.pop(K_FAILED, False):
            st.warning(WRONG_PASSWORD)


def announce() -> None:
    """One line in the server log, once per process, when the role is off."""
    if _announced.is_set():
        return
    _announced.set()
    if teacher_mode_on():
        log.info("teacher role on: sessions start as students")
    else:
        log.warning("teacher role off (no %s or secrets %s): every visitor may edit the shared knowledge store "
                    "and start builds", ENV_PASSWORD, SECRET_PASSWORD)


__all__ = ["ASK_TEACHER", "MAIN", "WRONG_PASSWORD", "announce", "check_password", "is_teacher", "role_sidebar",
           "session_branch", "start_refusal", "teacher_mode_on"]
