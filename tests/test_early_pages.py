"""The "Answer early" page through AppTest on the offline digits preset: a small frontier run, the
tau slider moving the gated rows, bad numbers as one sentence, and the key network's table."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 300


@pytest.fixture(scope="module")
def entry(app_entry):
    return app_entry


def _no_problems(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _until(at: AppTest, done, timeout: float = TIMEOUT) -> AppTest:
    end = time.time() + timeout
    while not done(at):
        _no_problems(at)
        assert time.time() < end, "the job did not finish in time"
        time.sleep(0.2)
        at.run()
    return at


def _page(entry) -> AppTest:
    at = AppTest.from_file(entry, default_timeout=TIMEOUT)
    at.run()
    at.switch_page(str(Path(__file__).resolve().parents[1] / "pages" / "early.py")).run()
    _no_problems(at)
    return at


def test_answer_early_page_runs_and_its_tau_slider_moves_the_gated_rows(env, entry):
    at = _page(entry)
    assert at.title[0].value == "Answer early"
    assert at.multiselect(key="ea_layers_digits-cnn").value == ["pool", "relu3"]
    at.text_input(key="ea_fractions").set_value("0.1, 1").run()
    at.text_input(key="ea_taus").set_value("0.5, 0.99").run()
    at.number_input(key="ea_timing").set_value(100).run()
    at.button(key="ea_run").click().run()
    _until(at, lambda a: any(d for d in a.dataframe if "ms / image" in d.value.columns))
    _no_problems(at)
    (table,) = [d for d in at.dataframe if "ms / image" in d.value.columns]
    df = table.value
    assert set(df["model"]) == {"full", "truncated", "gated, τ = 0.99", "cascade"}
    assert (df["model"] == "truncated").sum() == 4  # 2 layers x 2 cache sizes
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any("Answering early" in str(f["layout"].get("title")) for f in figs)
    assert any(("Faster than the network" in m.value) for m in at.success) or \
        any("No configuration here is faster" in i.value for i in at.info)
    slider = [s for s in at.select_slider if s.key.startswith("ea_tau_")][0]
    slider.set_value(0.5).run()
    _no_problems(at)
    (table,) = [d for d in at.dataframe if "ms / image" in d.value.columns]
    assert "gated, τ = 0.5" in set(table.value["model"])
    assert any("python -m cacheviz early --dataset digits --model digits-cnn" in c.value for c in at.caption)


def test_bad_numbers_are_one_sentence(env, entry):
    at = _page(entry)
    at.text_input(key="ea_fractions").set_value("a tenth").run()
    assert not at.exception
    assert any("cache sizes" in e.value for e in at.error)


def test_key_network_section_trains_and_shows_the_seeds_table(env, entry):
    at = _page(entry)
    at.text_input(key="ea_kn_epochs").set_value("2, 1").run()
    at.number_input(key="ea_kn_frac").set_value(0.5).run()
    at.button(key="ea_kn_run").click().run()
    _until(at, lambda a: any(d for d in a.dataframe if "parameters" in d.value.columns))
    _no_problems(at)
    (main,) = [d for d in at.dataframe if "parameters" in d.value.columns]
    assert list(main.value["model"]) == ["network (whole)", "key network + cache", "network to the layer + cache"]
    (robust,) = [d for d in at.dataframe if "key network (%)" in d.value.columns]
    assert "fgsm 0.05" in set(robust.value["condition"]) and len(robust.value) == 9


def test_neighbours_page_queries_a_trained_key_network(env, entry):
    """After the key network of the test above is stored: the Neighbours page offers it and shows
    the stored images its key retrieves (the network's cache must be built first)."""
    from cacheviz.config import Setup
    from cacheviz.experiment import Evaluate

    Evaluate(Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3"))).run(env, "cpu")
    at = AppTest.from_file(entry, default_timeout=TIMEOUT)
    at.run()
    at.switch_page(str(Path(__file__).resolve().parents[1] / "pages" / "neighbours.py")).run()
    _no_problems(at)
    at.toggle(key="nb_keynet").set_value(True).run()
    _no_problems(at)
    assert at.selectbox(key="nb_kn_pick").options, "the stored key network is offered"
    assert any("Key network → pool" in m.value and "the network never runs" in m.value for m in at.markdown)
