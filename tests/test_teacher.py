"""The teacher role through AppTest on the offline digits preset: sessions of one process share
the store and the job board as a real server's sessions do, each with its own session state.

Off (no password): single-user, as before, and the sidebar says so. On: a session is a student
until it signs in; a student cannot start builds; a student's store edits go to a copy of their
own that nobody else sees until the teacher publishes it. And what no browser may see: the
database's password or token, the server's absolute data directory, a live link from a file
name."""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("streamlit")

from apptest import PAGES, no_problems, one_png, open_page, until  # noqa: E402

from cacheviz.ui import roles  # noqa: E402

PASSWORD = "correct horse battery"
EVIL = "[x](https:evil.example).png"


@pytest.fixture(scope="module")
def entry(app_entry):
    return app_entry


@pytest.fixture
def role_on(env, monkeypatch):
    monkeypatch.setenv(roles.ENV_PASSWORD, PASSWORD)
    return env


@pytest.fixture
def role_off(env, monkeypatch):
    monkeypatch.delenv(roles.ENV_PASSWORD, raising=False)
    return env


def _rendered(at) -> str:
    """Everything the app sent for the page: every element's and block's message, as text
    (labels, captions, values, table bytes, image captions, expander labels)."""
    out = []

    def walk(node):
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(out)


def _counts(at) -> list[int]:
    (table,) = [d.value for d in at.dataframe if list(d.value.columns) == [str(c) for c in range(10)]]
    return table.iloc[0].astype(int).tolist()


def _sign_in(at, password: str = PASSWORD):
    at.text_input(key=roles.K_PASSWORD).input(password)
    (submit,) = [b for b in at.sidebar.button if b.label == "Sign in"]
    submit.click().run()
    return at


def _has(at, key: str) -> bool:
    return any(getattr(b, "key", None) == key for b in at.button)


# ---------------------------------------------------------------------------------------------
# The role itself


def test_role_off_is_single_user(role_off, entry):
    at = open_page(entry, "knowledge.py")
    assert any(c.value == roles.OFF_CAPTION for c in at.sidebar.caption)
    assert not at.sidebar.text_input  # no sign-in to offer
    assert _has(at, "ks_create")  # everyone may start the build, as before the role existed


def test_password_from_streamlit_secrets(role_off, entry):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(entry)
    at.secrets[roles.SECRET_PASSWORD] = PASSWORD
    at.run()
    assert not any(c.value == roles.OFF_CAPTION for c in at.sidebar.caption)
    _sign_in(at)
    assert any("Signed in as the teacher" in c.value for c in at.sidebar.caption)


def test_student_is_refused_builds_and_signs_in(role_on, entry):
    at = open_page(entry, "knowledge.py")
    assert not any(c.value == roles.OFF_CAPTION for c in at.sidebar.caption)
    # a student: no button that starts the store's creation or a cache build, one sentence instead
    assert not _has(at, "ks_create")
    assert [i.value for i in at.info if roles.ASK_TEACHER in i.value] == [roles.ASK_TEACHER]
    at.switch_page(str(PAGES / "home.py")).run()
    no_problems(at)
    assert not _has(at, "home_build") and any(i.value == roles.ASK_TEACHER for i in at.info)

    # a wrong password: one sentence, not echoed, the field emptied, still a student
    _sign_in(at, "wrong-pw-7431")
    assert [w.value for w in at.sidebar.warning] == [roles.WRONG_PASSWORD]
    assert "wrong-pw-7431" not in _rendered(at)
    assert at.text_input(key=roles.K_PASSWORD).value == ""
    assert not _has(at, "home_build")

    _sign_in(at)
    no_problems(at)
    assert any("Signed in as the teacher" in c.value for c in at.sidebar.caption)
    assert PASSWORD not in _rendered(at)
    assert _has(at, "home_build")
    at.switch_page(str(PAGES / "knowledge.py")).run()
    assert _has(at, "ks_create")
    at.button(key="ks_create").click().run()
    until(at, lambda a: a.metric)
    no_problems(at)

    # signing out makes the session a student again
    (out,) = [b for b in at.sidebar.button if b.label == "Sign out"]
    out.click().run()
    assert any("your own copy" in i.value for i in at.info)


def test_student_picking_cifar_downloads_nothing(role_on, entry):
    """The CIFAR preset's weights are the teacher's to fetch: a student sees the layers (from the
    architecture) and one sentence, and nothing is written under checkpoints/."""
    at = open_page(entry, "home.py")
    at.selectbox(key="cv_preset").set_value("CIFAR-10 · ResNet-20").run()
    no_problems(at)
    assert not list((role_on / "checkpoints").glob("resnet20*"))
    assert at.multiselect(key="cv_layers").options  # the layers are listed all the same
    assert not _has(at, "home_build") and any(i.value == roles.ASK_TEACHER for i in at.info)


# ---------------------------------------------------------------------------------------------
# A student's own copy


def _teacher(entry):
    at = open_page(entry, "knowledge.py")
    _sign_in(at)
    if _has(at, "ks_create"):
        at.button(key="ks_create").click().run()
    until(at, lambda a: a.metric)
    no_problems(at)
    return at


def test_student_edits_stay_theirs_until_published(role_on, entry):
    teacher = _teacher(entry)
    created = _counts(teacher)
    assert created[3] > 0 and created[5] > 0

    a = open_page(entry, "knowledge.py")
    branch_a = a.session_state[roles.K_BRANCH]
    assert branch_a.startswith("s-") and any("your own copy" in i.value and branch_a in i.value for i in a.info)
    assert a.button(key="ks_reset").disabled  # nothing of its own yet
    a.selectbox(key="ks_forget").set_value(3).run()
    a.button(key="ks_remove").click().run()
    no_problems(a)
    assert _counts(a)[3] == 0 and any("remove class 3" in s.value for s in a.success)

    # another student and the teacher still have class 3, every item of it
    b = open_page(entry, "knowledge.py")
    assert b.session_state[roles.K_BRANCH] != branch_a
    assert _counts(b) == created
    teacher.run()
    assert _counts(teacher) == created

    # a student's "start over": their own edit gone, back to the class store
    b.selectbox(key="ks_forget").set_value(5).run()
    b.button(key="ks_remove").click().run()
    assert _counts(b)[5] == 0
    b.button(key="ks_reset").click().run()
    no_problems(b)
    assert _counts(b) == created

    # the teacher sees A's copy, its counts, and publishes it
    teacher.run()
    (copy_a,) = [e for e in teacher.expander if branch_a in e.label]
    assert "remove" in copy_a.label
    preview = copy_a.dataframe[0].value.set_index("")
    assert int(preview.loc["this copy", "3"]) == 0 and int(preview.loc["class store", "3"]) == created[3]
    teacher.button(key=f"ks_publish_{branch_a}").click().run()
    no_problems(teacher)
    assert _counts(teacher)[3] == 0 and any("publish" in s.value for s in teacher.success)
    fresh = open_page(entry, "knowledge.py")  # B after a reload: a new session
    assert _counts(fresh)[3] == 0
    # B's copy keeps what B made of it (its reset to the old class store) until B starts over again
    b.run()
    assert _counts(b)[3] == created[3] and any("changed since" in c.value for c in b.caption)
    b.button(key="ks_reset").click().run()
    assert _counts(b)[3] == 0


def test_publish_and_reset_are_not_offered_to_students(role_on, entry):
    _teacher(entry)
    a = open_page(entry, "knowledge.py")
    a.selectbox(key="ks_forget").set_value(int(np.flatnonzero(_counts(a))[0])).run()
    a.button(key="ks_remove").click().run()
    b = open_page(entry, "knowledge.py")
    assert not any("Students' edits" in h.value for h in b.subheader)
    assert not any(k.startswith("ks_publish_") for k in (getattr(x, "key", "") or "" for x in b.button))


# ---------------------------------------------------------------------------------------------
# What no browser sees


def test_no_credentials_or_server_paths(role_off, entry, monkeypatch):
    at = open_page(entry, "knowledge.py")
    if _has(at, "ks_create"):
        at.button(key="ks_create").click().run()
        until(at, lambda a: a.metric)
    monkeypatch.setenv("CACHEVIZ_MILVUS_URI", "http://admin:secret@127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setenv("CACHEVIZ_MILVUS_TOKEN", "tok-secret-5150")
    roots = {str(role_off), str(role_off.resolve())}

    def clean(at) -> str:
        text = _rendered(at)
        assert "secret" not in text
        for root in roots:
            assert root not in text
        return text

    # the store as it is: its "where it lives" line names the server, without the password
    at = open_page(entry, "knowledge.py")
    clean(at)
    (where,) = [c.value for c in at.caption if c.value.startswith("Database:")]
    assert "Milvus server at http://admin:***@127.0.0.1:1" in where and "under `stores/digits-" in where

    # a new store (another cache size) made against that server: the job fails, its error shown
    at.select_slider(key="cv_fraction").set_value(50).run()
    at.button(key="ks_create").click().run()
    until(at, lambda a: a.error or a.metric, errors_ok=True)
    assert at.error, "creating a store on a server that is not there should fail"
    clean(at)
    assert "admin:***@127.0.0.1:1" in "".join(e.value for e in at.error)


def test_file_names_are_inert(role_off, entry):
    at = open_page(entry, "knowledge.py")
    if _has(at, "ks_create"):
        at.button(key="ks_create").click().run()
        until(at, lambda a: a.metric)
    n = len(at.file_uploader)
    key = next(f.key for f in at.file_uploader if f.key.startswith("ks_files_"))
    at.file_uploader(key=key).set_value((EVIL, one_png(), "image/png")).run()
    at.button(key="ks_add").click().run()
    no_problems(at)
    assert any("evil" in s.value for s in at.success)
    at.radio(key="ks_source").set_value("Upload").run()
    at.file_uploader(key="ks_query_file").set_value((EVIL, one_png(), "image/png")).run()
    no_problems(at)
    assert n
    # wherever Markdown renders it (notes, captions, expander labels, image captions), the
    # name is escaped: "[x](" as such would be a live link
    markdown = [m.value for m in (*at.success, *at.markdown, *at.caption, *at.info, *at.warning)]
    markdown += [c for el in at.get("image") for c in el.captions]
    markdown += [e.label for e in at.expander]
    assert any("evil" in m for m in markdown)
    assert not [m for m in markdown if "[x](" in m]



def test_the_server_log_never_holds_a_credential(monkeypatch):
    """Even an unforeseen error's traceback, logged by the app, has its password masked."""
    import logging

    from cacheviz import ui  # noqa: F401 - configures the app's log handler

    monkeypatch.setenv("CACHEVIZ_MILVUS_TOKEN", "tok-123456")
    log = logging.getLogger("cacheviz.app")
    handler = log.handlers[0]
    try:
        raise RuntimeError("cannot reach http://admin:secret@db.example:19530 with token tok-123456")
    except RuntimeError:
        rec = log.makeRecord(log.name, logging.ERROR, __file__, 1, "job failed", (), sys.exc_info())
    text = handler.format(rec)
    assert "RuntimeError" in text and "db.example" in text
    assert "secret" not in text and "tok-123456" not in text
