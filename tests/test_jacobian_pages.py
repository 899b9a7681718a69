"""The Jacobians page (Figure 4) through AppTest on the offline digits preset: it renders, a
small run shows the spectrum, both scatters and the mean/median table, and the explorer shows one
image's C heat-maps and a spectrum that follows the theta slider; and the engine behind the
explorer (`jacobian.heatmaps`, `jacobian.spectrum_at_theta`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from apptest import no_problems, open_page, until  # noqa: E402

from cacheviz import ui  # noqa: E402
from cacheviz.config import Setup  # noqa: E402
from cacheviz.jacobian import batch_jacobians, heatmaps, jacobian_stats, spectrum_at_theta  # noqa: E402
from cacheviz.progress import Silent  # noqa: E402
from cacheviz.robustness import load_victims  # noqa: E402
from cacheviz.study import Run  # noqa: E402

PAGE_SETUP = Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3"))  # the offline preset
TEST_PART = 225


# ---------------------------------------------------------------------------------------------
# The engine


@pytest.fixture(scope="module")
def victims(data_dir):
    ws, v, _ = load_victims(Setup(), Run(data_dir, "cpu", 256, Silent()))
    g = torch.Generator().manual_seed(0)
    # a little noise: digits' flat background makes max-pool ties, where no derivative exists
    x = ws.spec.preprocess(ws.ds.test_x[ws.split.test_idx[:1]]) + 0.05 * torch.randn(1, 1, 8, 8, generator=g)
    return v, x, ws


def test_heatmaps_are_the_jacobian_summed_over_channels(victims):
    v, x, ws = victims
    maps = heatmaps(v, x)
    c = len(ws.ds.classes)
    js = batch_jacobians(v, x)
    for m in ("network", "cache", "cache-only"):
        assert maps[m].shape == (c, 8, 8)
        want = js[m][0].reshape(c, 1, 8, 8).abs().sum(1).numpy()
        np.testing.assert_allclose(maps[m], want, rtol=1e-5, atol=1e-8)
    assert maps["cache"].sum() > 0


def test_spectrum_at_the_victims_own_theta_is_the_studys(victims):
    v, x, _ = victims
    stats, _ = jacobian_stats(v, x)
    sv = spectrum_at_theta(v, x, v.theta_cache_only)
    np.testing.assert_allclose(sv, stats.singular_values["cache-only"][0].numpy(), rtol=1e-5, atol=1e-9)
    other = spectrum_at_theta(v, x, 4 * v.theta_cache_only + 10)
    assert not np.allclose(other, sv)
    assert v.theta_cache_only == pytest.approx(v.classifiers["cache-only"].theta), "v itself is left alone"
    with pytest.raises(Exception, match="positive"):
        spectrum_at_theta(v, x, -1.0)


def test_a_click_on_a_scatter_point_names_its_image():
    ev = {"selection": {"points": [{"customdata": 17, "x": 0.1, "y": 0.2}]}}
    assert ui.clicked_point([{"selection": {"points": []}}, ev], [3, 17]) == 17
    assert ui.clicked_point([{"selection": {"points": [{"customdata": [5]}]}}], [5]) == 5
    assert ui.clicked_point([ev], [3]) is None, "not one of the study's images"
    assert ui.clicked_point([None, {}, {"selection": {"points": [{"x": 1}]}}], [3]) is None


def test_the_explorers_order_and_norms():
    rows = [{"index": 3, "model": "network", "norm": 0.1}, {"index": 5, "model": "network", "norm": 2.0},
            {"index": 5, "model": "cache", "norm": 1.0}]
    assert ui.by_network_norm(rows) == [5, 3]
    assert ui.norms_of(rows, 5) == {"network": 2.0, "cache": 1.0}


# ---------------------------------------------------------------------------------------------
# The page


@pytest.fixture(scope="module")
def entry(app_entry):
    return app_entry


def _figures(at: AppTest) -> dict[str, dict]:
    return {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def _titles(at: AppTest) -> list[str]:
    out = []
    for f in _figures(at).values():
        t = f["layout"].get("title", {})
        out.append(t.get("text", "") if isinstance(t, dict) else str(t))
    return out


def test_jacobian_page_runs_and_explores(env, entry):
    at = open_page(entry, "jacobian.py")
    assert at.title[0].value.startswith("Jacobians")
    n_input = [w for w in at.number_input if w.key.startswith("jc_n_")][0]
    assert n_input.value == TEST_PART, "500 on the CPU, clamped to the digits test part"
    n_input.set_value(20).run()
    at.button(key="jc_run").click().run()
    until(at, lambda a: any("Mean singular values" in t for t in _titles(a)) and len(a.get("plotly_chart")) >= 6)
    no_problems(at)
    titles = _titles(at)
    assert any(t.startswith("Mean singular values of the input-output Jacobian (20 test images)") for t in titles)
    assert any("network against cache (" in t for t in titles)
    assert any("network against cache-only (" in t for t in titles)
    (table,) = [d for d in at.dataframe if "median |J|" in d.value.columns]
    df = table.value
    assert list(df["model"]) == ["network", "cache", "cache-only"] and "median |J|" in df.columns
    assert (df["images"] == 20).all()
    assert any("python -m cacheviz jacobian --dataset digits --model digits-cnn" in c.value and "--n 20" in c.value
               for c in at.caption)
    labels = [d.proto.label for d in at.get("download_button")]
    assert "JSON" in labels and "CSV" in labels

    # |J| against the lab's minimal rho_adv: nothing stored yet, so the page offers to run it
    assert at.selectbox(key="jc_rho_attack").value == "fgsm"
    at.button(key="jc_rho_fgsm_run").click().run()
    until(at, lambda a: any("against the minimal fgsm" in t for t in _titles(a)))
    no_problems(at)
    (corr,) = [d for d in at.dataframe if "Spearman (|J|, ρ_adv)" in d.value.columns]
    assert set(corr.value["model"]) <= {"network", "cache", "cache-only"} and len(corr.value) >= 1
    assert ((corr.value["Spearman (|J|, ρ_adv)"] >= -1) & (corr.value["Spearman (|J|, ρ_adv)"] <= 1)).all()
    titles = _titles(at)

    # the explorer: the study's images, the network's largest |J| first, with C heat-maps
    picker = [s for s in at.selectbox if s.key.startswith("jc_img_")][0]
    assert len(picker.options) == 20
    heat = [f for t, f in zip(titles, _figures(at).values()) if "per class" in t]
    assert len(heat) == 1 and sum(tr["type"] == "heatmap" for tr in heat[0]["data"]) == 10
    picker.select_index(3).run()
    no_problems(at)
    # the image and its 12 neighbours from the cache
    imgs = [im for el in at.get("image") for im in el.proto.imgs]
    assert len(imgs) == 1 + ui.NEIGHBOURS
    assert all(" · σ " in im.caption for im in imgs[1:])

    def spectrum(a):
        (f,) = [f for f in _figures(a).values() if "singular values of J" in str(f["layout"].get("title"))]
        return f["data"][1]["y"]

    before = spectrum(at)
    at.slider(key="jc_theta").set_value(200.0).run()
    no_problems(at)
    after = spectrum(at)
    assert len(after) == 10 and not np.allclose(before, after)
