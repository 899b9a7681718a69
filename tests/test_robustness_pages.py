"""The robustness pages through AppTest on the offline digits preset: the robustness lab (a small
minimal-perturbation attack, a corruption curve, bad strengths) and "Why it resists" (its build
button, both images and their neighbours, the epsilon slider); and the engine behind the latter
(`cacheviz.resist`).

Like tests/test_app.py, the app starts through a one-line entry script in a folder without pages/.
One data directory serves the module: digits-cnn trains and the cache is built once, by the first
test (the "Why it resists" page's build button); the lab's studies reuse that Evaluate result.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from apptest import no_problems, open_page, until  # noqa: E402

from cacheviz import plots, ui  # noqa: E402
from cacheviz.config import Setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180
APP = ""
PAGE_SETUP = Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3"))  # the offline preset
TEST_PART = 225  # digits: 450 test images, half of them tune theta and lam


@pytest.fixture(scope="module", autouse=True)
def entry(app_entry):
    global APP
    APP = app_entry
    return APP


def _texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info])


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _images(at: AppTest) -> list:
    return [im for el in at.get("image") for im in el.proto.imgs]


def _downloads(at: AppTest) -> list[str]:
    return [d.proto.label for d in at.get("download_button")]


# ---------------------------------------------------------------------------------------------
# Why it resists (first: its build button is only there before anything built the cache)


def _resists_built(env) -> AppTest:
    at = open_page(APP, "resists.py")
    if [b for b in at.button if b.key == "wr_build"]:
        at.button(key="wr_build").click().run()
    until(at, lambda a: "Does the adversarial still retrieve" in _texts(a))
    no_problems(at)
    return at


def _rho(at: AppTest) -> str:
    (line,) = [m.value for m in at.markdown if "ρ_adv = **" in m.value]
    return line.split("ρ_adv = **")[1].split("**")[0]


def test_why_it_resists_builds_then_shows_both_images_and_neighbours(env):
    at = open_page(APP, "resists.py")
    assert at.title[0].value.startswith("Why it resists")
    assert at.button(key="wr_build").label == "Build cache", "nothing is built yet: the build button"
    t0 = time.perf_counter()
    at = _resists_built(env)
    print(f"why it resists, built through the page: {time.perf_counter() - t0:.1f} s")
    picker = at.selectbox(key=f"wr_img_{ui.setup_tag(PAGE_SETUP)}_0")
    assert len(picker.options) == TEST_PART and picker.index == 0
    assert at.radio(key="wr_attack").value == "fgsm" and at.radio(key="wr_against").value == "network"
    assert at.slider(key="wr_eps").value == pytest.approx(0.05)
    # clean, adversarial, perturbation; then the two galleries of neighbours
    imgs = _images(at)
    assert len(imgs) == 3 + 2 * ui.NEIGHBOURS
    captions = [im.caption for im in imgs]
    assert captions[0].startswith("clean · true ") and captions[1].startswith("adversarial · ρ_adv ")
    assert captions[2].startswith("perturbation ×") and "in pixels" in captions[2]
    assert [s.value for s in at.main.subheader] == ["Clean", "Adversarial"]
    probs = _figures(at)
    assert len(probs) == 2 and [t["name"] for t in probs[0]["data"]] == ["p_net", "p_mem", "p"]
    assert "pixel units" in _texts(at)

    # the slider recomputes: rho and the adversarial's probabilities move with epsilon
    rho_before, adv_before = _rho(at), probs[1]["data"][0]["y"]
    at.slider(key="wr_eps").set_value(0.4).run()
    no_problems(at)
    assert _rho(at) != rho_before and float(_rho(at)) > float(rho_before)
    assert _figures(at)[1]["data"][0]["y"] != adv_before
    assert _figures(at)[0]["data"][0]["y"] == probs[0]["data"][0]["y"], "the clean side does not change"
    # at epsilon 0 nothing moves: the two sides agree
    at.slider(key="wr_eps").set_value(0.0).run()
    no_problems(at)
    assert float(_rho(at)) == 0
    clean, adv = _figures(at)
    assert [t["y"] for t in clean["data"]] == [t["y"] for t in adv["data"]]
    assert "no perturbation" in _images(at)[2].caption
    # another model attacked, I-FGSM: still one sentence of verdict, no error
    at.radio(key="wr_attack").set_value("ifgsm").run()
    at.radio(key="wr_against").set_value("cache").run()
    at.slider(key="wr_eps").set_value(0.3).run()
    no_problems(at)
    assert float(_rho(at)) > 0 and "Does the adversarial still retrieve" in _texts(at)


# ---------------------------------------------------------------------------------------------
# The robustness lab


def test_robustness_page_renders_and_clamps_n(env, monkeypatch):
    at = open_page(APP, "robustness.py")
    assert at.title[0].value.startswith("Robustness lab")
    assert at.radio(key="rb_mode").value == ui.ROBUST_MODES[0]
    assert len(at.selectbox(key="rb_attack_0").options) == len(ui.MINIMAL_ATTACKS)
    assert at.number_input(key=f"rb_n_{TEST_PART}").value == TEST_PART  # min(250, the test part)
    assert at.toggle(key="rb_transfer").proto.disabled  # digits has one network
    assert at.button(key="rb_run")
    at.number_input(key=f"rb_n_{TEST_PART}").set_value(400).run()
    no_problems(at)
    assert any(f"holds {TEST_PART} images" in i.value for i in at.info)
    # Table 4 needs another network of the dataset: one that cannot load is one sentence, no run
    monkeypatch.setitem(ui.MODELS, "digits", ["digits-cnn", "no-such-net"])
    at.run()
    at.toggle(key="rb_transfer").set_value(True).run()
    assert not at.exception and at.selectbox(key="rb_source_digits").value == "no-such-net"
    (warning,) = [w.value for w in at.warning]
    assert warning.startswith("no-such-net cannot be loaded") and not [b for b in at.button if b.key == "rb_run"]
    at.toggle(key="rb_transfer").set_value(False).run()
    no_problems(at)
    # a corruption needs no model: the model picker goes
    at.selectbox(key="rb_attack_0").set_value("blur").run()
    no_problems(at)
    assert not [r for r in at.radio if r.key == "rb_against"]


def test_a_small_minimal_attack_shows_its_table_and_figure(env):
    at = open_page(APP, "robustness.py")
    at.number_input(key=f"rb_n_{TEST_PART}").set_value(20).run()
    t0 = time.perf_counter()
    at.button(key="rb_run").click().run()
    until(at, lambda a: a.get("plotly_chart"))
    no_problems(at)
    print(f"FGSM on 20 digits through the page: {time.perf_counter() - t0:.1f} s")
    fig = _figures(at)[0]
    assert [t["name"] for t in fig["data"]] == ["clean images", "adversarial images"]
    assert fig["data"][1]["x"] == ["network (attacked)", "cache", "cache-only"]
    assert "success" in fig["layout"]["title"]["text"]
    per_image = _figures(at)[1]  # the stored per-image strengths, in an expander
    assert per_image["layout"]["title"]["text"].startswith("Minimal strength per image")
    failed = int(at.dataframe[0].value["failed"][0])
    assert f"({20 - failed} successes, {failed} failures" in per_image["layout"]["title"]["text"]
    table = at.dataframe[0].value
    assert list(table["model"]) == ["network", "cache", "cache-only"] and set(table["images"]) == {20}
    assert all(0 <= v <= 100 for v in table["accuracy on adversarials %"])
    assert {m.label for m in at.metric} >= {"Success rate", "Mean ρ_adv (successes)", "Failed"}
    assert {"JSON", "CSV"} <= set(_downloads(at))
    problem = plots.png_problem()
    assert (problem and any(c.value == problem for c in at.caption)) or "PNG" in _downloads(at)
    cmd = ("python -m cacheviz attack --dataset digits --model digits-cnn --layers pool,relu3 --attack fgsm "
           "--against network --n 20")
    assert any(f"`{cmd}`" in c.value for c in at.caption)

    # the page's study is the one the command line computes, and it is stored
    from cacheviz.__main__ import _setup, build_parser
    from cacheviz.robustness import Attack, attack_study

    args = build_parser().parse_args(cmd.split()[3:])
    cli = attack_study(_setup(args, project_dim=args.project_dim), args.attack, args.against, args.n, args.seed)
    page = Attack(PAGE_SETUP, "fgsm", "network", 20, 0)
    assert cli.ident() == page.ident()
    rows = page.lookup(env)
    assert rows is not None and [r["accuracy"] for r in rows] == [pytest.approx(v / 100, abs=1e-4)
                                                                   for v in table["accuracy on adversarials %"]]


def test_curve_mode_refuses_bad_strengths_in_one_sentence_then_runs(env):
    at = open_page(APP, "robustness.py")
    at.radio(key="rb_mode").set_value(ui.ROBUST_MODES[1]).run()
    no_problems(at)
    assert at.text_input(key="rb_eps_fgsm").value == ui.strengths_text("fgsm")
    at.text_input(key="rb_eps_fgsm").set_value("-0.1, 0.1").run()
    assert not at.exception
    (warning,) = [w.value for w in at.warning]
    assert "negative" in warning and warning.endswith(".") and "\n" not in warning
    assert not [b for b in at.button if b.key == "rb_run"]
    at.text_input(key="rb_eps_fgsm").set_value("0, lots").run()
    (warning,) = [w.value for w in at.warning]
    assert "numbers separated by commas" in warning
    # a corruption curve (no gradients: quick), factors must be positive
    at.selectbox(key="rb_attack_1").set_value("brightness").run()
    at.text_input(key="rb_eps_brightness").set_value("0, 1").run()
    (warning,) = [w.value for w in at.warning]
    assert "positive" in warning
    at.text_input(key="rb_eps_brightness").set_value("0.5, 1, 1.5").run()
    at.number_input(key=f"rb_n_{TEST_PART}").set_value(20).run()
    no_problems(at)
    at.button(key="rb_run").click().run()
    until(at, lambda a: a.get("plotly_chart"))
    no_problems(at)
    fig = _figures(at)[0]
    lines = [t for t in fig["data"] if t.get("mode") == "lines+markers"]
    bands = [t for t in fig["data"] if t.get("fill") == "toself"]
    assert [t["name"] for t in lines] == ["network", "cache", "cache-only"] and len(bands) == 3
    assert lines[0]["x"] == [0.5, 1.0, 1.5] and fig["layout"]["xaxis"]["title"]["text"].startswith("brightness")
    assert len(at.dataframe[0].value) == 3
    assert any("--attack brightness --n 20 --epsilons 0.5,1,1.5`" in c.value for c in at.caption)


# ---------------------------------------------------------------------------------------------
# The engine behind "Why it resists"


@pytest.fixture(scope="module")
def lab(app_dir):
    from cacheviz.experiment import Evaluate
    from cacheviz.resist import Lab
    from cacheviz.retrieval import build_index
    from cacheviz.workspace import prepare

    result = Evaluate(PAGE_SETUP).run(app_dir)  # stored by the page tests when they ran first
    ws = prepare(PAGE_SETUP, app_dir, "cpu")
    return Lab(ws, build_index(ws), result["theta"], result["lam"], result["theta_cache_only"])


def test_resist_matches_the_models_and_the_neighbours_page(lab):
    from cacheviz.retrieval import make_query

    i = lab.sample()[0]
    x, _ = lab.image(i)
    c = lab.compare(i, "fgsm", "network", 0.0)
    assert c.rho == 0 and c.max_delta == 0 and not c.flipped
    probs = lab.victims.all_probs(x)
    ex = c.clean.explanation
    for name, got in (("network", ex.p_net), ("p_mem", ex.p_mem), ("cache", ex.p), ("cache-only", c.clean.p_only)):
        np.testing.assert_allclose(got, probs[name][0].numpy(), atol=1e-5, err_msg=name)
    # the uint8 query of the Neighbours page gives the same similarities for a clean test image
    q = make_query(lab.ws, lab.index, lab.ws.ds.test_x[i].numpy())
    from cacheviz.resist import query_of

    assert torch.allclose(q.sims, query_of(lab.victims, lab.index, x).sims, atol=1e-5)
    assert np.array_equal(c.clean.image[..., 0], lab.ws.ds.test_x[i].numpy()[..., 0])


def test_resist_fgsm_is_the_engines_and_a_slider_move_is_one_forward_pass(lab):
    from cacheviz import attacks as A

    i = lab.sample()[1]
    x, _ = lab.image(i)
    eps = 0.2
    c = lab.compare(i, "fgsm", "cache", eps)
    model = lab.victims.log_probs("cache")
    label = lab.victims.predict("cache", x)
    want = lab.victims.clip(x + eps * A.fgsm_direction(model, x, label))
    assert torch.allclose(c.adv.x, want, atol=1e-6)
    assert c.rho == pytest.approx(float(A.rho(want, x)[0]), rel=1e-5)
    assert c.max_delta == pytest.approx(eps * ui.pixel_scale(lab.ws.spec), rel=1e-4)
    calls = []
    hook = lab.victims.spec.net.register_forward_hook(lambda *a: calls.append(1))
    try:
        lab.compare(i, "fgsm", "cache", 0.25)
    finally:
        hook.remove()
    assert len(calls) == 1, "the direction, the label attacked and the clean side are kept"
    again = lab.compare(i, "fgsm", "cache", eps)
    assert again is c, "a slider moved back costs nothing"


def test_the_pages_reached_directly_still_get_the_sidebar(env):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.run()
    for page, title in (("pages/robustness.py", "Robustness lab"), ("pages/resists.py", "Why it resists")):
        at.switch_page(page).run()
        no_problems(at)
        assert at.sidebar.selectbox(key=ui.K_PRESET).value == ui.OFFLINE
        assert at.title[0].value.startswith(title)
