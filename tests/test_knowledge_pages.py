"""The "Knowledge store" page through AppTest on the offline digits preset: the store is created
by a job from the page's button, a class is forgotten (the cache-only model loses it, the network
does not), the edit is undone, an uploaded image is taught with a label, and a broken upload is
one sentence."""
from __future__ import annotations


import pytest

pytest.importorskip("streamlit")

from apptest import no_problems, one_png, open_page, until  # noqa: E402

from cacheviz import ui  # noqa: E402


@pytest.fixture(scope="module")
def entry(app_entry):
    return app_entry


def _metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _per_class(at):
    (table,) = [d.value for d in at.dataframe if "cache-only after (%)" in d.value.columns]
    return table.set_index("class")


def _counts(at):
    (table,) = [d.value for d in at.dataframe if list(d.value.columns) == [str(c) for c in range(10)]]
    return table.iloc[0].astype(int).tolist()


def _captions(at) -> list[str]:
    return [c for el in at.get("image") for c in el.captions]


def test_create_forget_undo_and_teach(env, entry):
    at = open_page(entry, "knowledge.py")
    assert at.title[0].value.startswith("Knowledge store")
    assert any("add rows instead" in m.value for m in at.markdown)
    at.button(key="ks_create").click().run()
    until(at, lambda a: a.metric)
    no_problems(at)
    assert _metric(at, "Version") == "1"
    created = _counts(at)
    assert sum(created) == int(_metric(at, "Items").replace(",", ""))
    assert any("items.db" in c.value for c in at.caption)

    # forget class 3
    at.selectbox(key="ks_forget").set_value(3).run()
    at.button(key="ks_remove").click().run()
    no_problems(at)
    assert _metric(at, "Version") == "2" and _counts(at)[3] == 0
    assert any("Version 2: remove class 3" in s.value for s in at.success)
    table = _per_class(at)
    assert table.loc["3", "cache-only after (%)"] == 0
    assert table.loc["3", "cache-only before (%)"] > 50
    assert (table["network before (%)"] == table["network after (%)"]).all()
    assert any("After removing 3: the network still gets" in m.value for m in at.markdown)
    assert any("changed their cache-only model answer" in c.value for c in at.caption)
    assert any(" → " in c and "true 3" in c for c in _captions(at))
    (cli,) = [c.value for c in at.code]
    assert "python -m cacheviz store remove --dataset digits --model digits-cnn" in cli and "store undo" in cli

    # undo: the counts are back, and there is nothing more to undo
    at.button(key="ks_undo").click().run()
    no_problems(at)
    assert _metric(at, "Version") == "3" and _counts(at) == created
    assert at.button(key="ks_undo").disabled
    table = _per_class(at)
    assert table.loc["3", "cache-only after (%)"] > 50  # v3 against the v2 it undid

    # teach: an uploaded '1', labelled 1
    at.file_uploader(key="ks_files_0").set_value(("one.png", one_png(), "image/png")).run()
    at.selectbox(key="ks_label").set_value(1).run()
    at.button(key="ks_add").click().run()
    no_problems(at)
    assert _metric(at, "Version") == "4"
    assert _counts(at)[1] == created[1] + 1
    assert any("Version 4: add" in s.value for s in at.success)
    (history,) = [d.value for d in at.dataframe if "op" in d.value.columns]
    assert list(history["op"])[:2] == ["add", "undo"]
    assert list(history["detail"])[0] == "1 image labelled 1 (one.png)"  # the plain name, not Markdown
    # asked with the same image, the store retrieves the added item
    at.radio(key="ks_source").set_value("Upload").run()
    at.file_uploader(key="ks_query_file").set_value(("one.png", one_png(), "image/png")).run()
    no_problems(at)
    assert any("added #" in c and c.startswith("1 · sim 1.000") for c in _captions(at)), _captions(at)

    # a broken upload: one sentence, nothing added, no exception
    at.file_uploader(key="ks_files_1").set_value(("notes.png", b"just text\n" * 40, "image/png")).run()
    no_problems(at)
    assert any(ui.upload_name("notes.png") in w.value and "not an image" in w.value for w in at.warning), \
        [w.value for w in at.warning]
    assert at.button(key="ks_add").disabled
    assert _metric(at, "Version") == "4"


def test_what_a_killed_create_leaves_never_blocks_the_page(app_dir, monkeypatch, entry):
    """A create killed mid-way (its hidden folder, or a half-made store of the old layout with a
    meta.json and no version) shows the create button again, not an error with no way out."""
    import json

    from cacheviz import kstore
    from cacheviz.config import Setup

    d = app_dir.parent / "killed-create"
    monkeypatch.setenv("CACHEVIZ_DATA_DIR", str(d))
    name = kstore.store_name(Setup())
    hidden = d / "stores" / f".creating-{name}.999999999.abc"
    hidden.mkdir(parents=True)
    (hidden / "meta.json").write_text("{}")
    half = d / "stores" / name
    half.mkdir()
    (half / "meta.json").write_text(json.dumps({"name": name, "setup": Setup().to_dict(), "layers": [], "dim": 8,
                                                "classes": [str(c) for c in range(10)], "theta": 1, "lam": 0.5,
                                                "theta_cache_only": 1, "weights": "x", "format": 1}))
    at = open_page(entry, "knowledge.py")
    no_problems(at)
    assert at.button(key="ks_create")
