"""The "Answer early" page through AppTest on the offline digits preset: a small frontier run, the
tau slider moving the gated rows, bad numbers as one sentence, and the key network's table."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("streamlit")

from apptest import no_problems, open_page, until  # noqa: E402

from cacheviz import ui  # noqa: E402


@pytest.fixture(scope="module")
def entry(app_entry):
    return app_entry


def test_answer_early_page_runs_and_its_tau_slider_moves_the_gated_rows(env, entry):
    at = open_page(entry, "early.py")
    assert at.title[0].value == "Answer early"
    assert at.multiselect(key="ea_layers_digits-cnn").value == ["pool", "relu3"]
    at.text_input(key="ea_fractions").set_value("0.1, 1").run()
    at.text_input(key="ea_taus").set_value("0.5, 0.99").run()
    at.number_input(key="ea_timing").set_value(100).run()
    at.button(key="ea_run").click().run()
    until(at, lambda a: any(d for d in a.dataframe if "ms / image" in d.value.columns))
    no_problems(at)
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
    no_problems(at)
    (table,) = [d for d in at.dataframe if "ms / image" in d.value.columns]
    assert "gated, τ = 0.5" in set(table.value["model"])
    assert any("python -m cacheviz early --dataset digits --model digits-cnn" in c.value for c in at.caption)


def test_bad_numbers_are_one_sentence(env, entry):
    at = open_page(entry, "early.py")
    at.text_input(key="ea_fractions").set_value("a tenth").run()
    assert not at.exception
    assert any("cache sizes" in e.value for e in at.error)


def test_key_network_section_trains_and_shows_the_seeds_table(env, entry):
    at = open_page(entry, "early.py")
    at.text_input(key="ea_kn_epochs").set_value("2, 1").run()
    at.number_input(key="ea_kn_frac").set_value(0.5).run()
    at.button(key="ea_kn_run").click().run()
    until(at, lambda a: any(d for d in a.dataframe if "parameters" in d.value.columns))
    no_problems(at)
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
    at = open_page(entry, "neighbours.py")
    at.toggle(key="nb_keynet").set_value(True).run()
    no_problems(at)
    assert at.selectbox(key="nb_kn_pick").options, "the stored key network is offered"
    assert any("Key network → pool" in m.value and "the network never runs" in m.value for m in at.markdown)


def test_command_lines_carry_the_sidebars_setup():
    """The page's "the same numbers as" lines: the setup's protocol and flips, and the exits or
    teacher layer of the study, in a command the CLI accepts."""
    from cacheviz.__main__ import build_parser
    from cacheviz.config import Setup
    from cacheviz.early import Early
    from cacheviz.keynet import KeyNetStudy

    paper = Setup(dataset="digits", model="digits-cnn", flip=True, val_from_train=134)
    early = ui.early_cli(Early(paper, layers=("pool",), fractions=(0.1,)))
    keynet = ui.keynet_cli(KeyNetStudy(Setup(flip=True), layer="pool"))
    assert "--protocol paper --val-from-train 134" in early and "--layers pool" in early
    assert "--fractions 0.1" in early and "--flip" in keynet and "--layer pool" in keynet
    for cmd in (early, keynet):
        args = build_parser().parse_args(cmd.split()[3:])
        assert args.dataset == "digits" and args.model == "digits-cnn"
