"""The sweep pages (Figure 2, Figure 3, Table 1) through AppTest on the offline digits preset, the
figure builders behind them, PNG export and benchmarks/figures.py.

Like tests/test_app.py, the app starts through a one-line entry script in a folder without pages/
(see there why). One data directory serves the whole module: digits-cnn trains once, and the
sweeps the pages run are the ones `digits_rows` reads back from the store.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from apptest import no_problems, open_page, until  # noqa: E402

from cacheviz import plots, ui  # noqa: E402
from cacheviz.config import Setup  # noqa: E402
from cacheviz.errors import CachevizError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = ""
PAGE_FRACTIONS = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]  # the size page's defaults
PAGE_SETUP = Setup(dataset="digits", model="digits-cnn", layers=("pool", "relu3"))  # the offline preset


@pytest.fixture(scope="module", autouse=True)
def entry(app_entry):
    global APP
    APP = app_entry
    return APP


def _figure(at: AppTest, index: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def _run_sweep(at: AppTest, key: str) -> AppTest:
    at.button(key=f"{key}_run").click().run()
    until(at, lambda a: a.get("plotly_chart"))
    no_problems(at)
    return at


def _downloads(at: AppTest) -> list[str]:
    return [d.proto.label for d in at.get("download_button")]


def _png_ok(at: AppTest) -> None:
    """A PNG button where the renderer works here, else the sentence saying why."""
    problem = plots.png_problem()
    if problem:
        assert any(c.value == problem for c in at.caption)
    else:
        assert "PNG" in _downloads(at)


# ---------------------------------------------------------------------------------------------
# Pages


def test_layer_sweep_page(env, monkeypatch):
    at = open_page(APP, "layers.py")
    assert at.title[0].value.startswith("Which layer")
    assert at.toggle(key="ls_retune").value is False and at.toggle(key="ls_exact").value is False
    assert at.select_slider(key="ls_dim").value == 1024
    assert at.multiselect(key="ls_extra_digits").proto.disabled  # digits-cnn is the only digits model
    assert any("digits-cnn: 7 layers" in c.value for c in at.caption)
    t0 = time.perf_counter()
    _run_sweep(at, "ls")
    print(f"layer sweep through the page: {time.perf_counter() - t0:.1f} s")
    fig = _figure(at)
    names = [t.get("name", "") for t in fig["data"]]
    assert names[0] == "digits-cnn" and names[1].startswith("digits-cnn baseline") and names[2].startswith("digits-cnn best")
    assert "θ = 50, λ = 0.5" in fig["layout"]["title"]["text"]
    table = at.dataframe[0].value
    assert list(table["layer"]) == ["input", "relu1", "relu2", "pool", "relu3", "logits", "probs"]
    assert list(table["key dim"])[2] == 1024 and list(table["full dim"])[2] == 4096  # projected to D
    assert "CSV" in _downloads(at)
    _png_ok(at)
    assert any("best layer" in m.value for m in at.markdown)

    # Exact keys: the estimate is shown; above the limit the page refuses with one sentence.
    at.toggle(key="ls_exact").set_value(True).run()
    no_problems(at)
    assert at.select_slider(key="ls_dim").proto.disabled
    assert at.button(key="ls_run"), "exact keys are another sweep: not stored yet"
    monkeypatch.setattr(ui, "EXACT_LIMIT_GB", 1e-6)
    at.run()
    assert not at.exception
    assert not [b for b in at.button if b.key == "ls_run"]
    refusal = [w.value for w in at.warning]
    assert len(refusal) == 1 and "GB of memory" in refusal[0] and "projection" in refusal[0]


def test_layer_sweep_page_retuned(env):
    at = open_page(APP, "layers.py")
    at.toggle(key="ls_retune").set_value(True).run()
    at.select_slider(key="ls_dim").set_value(256).run()
    _run_sweep(at, "ls")
    assert "re-tuned" in _figure(at)["layout"]["title"]["text"]
    # the table shows the rows of the stored study: each layer's own tuned theta and lam
    from cacheviz.sweeps import LayerSweep

    rows = LayerSweep(PAGE_SETUP.replace(project_dim=256), retune=True).lookup(env)
    table = at.dataframe[0].value
    assert list(table["θ"]) == [r["theta"] for r in rows] and list(table["λ"]) == [r["lam"] for r in rows]
    assert len({(r["theta"], r["lam"]) for r in rows}) > 1  # tuned per layer, not one pair for all


def test_size_sweep_page(env):
    at = open_page(APP, "sizes.py")
    assert at.title[0].value.startswith("How big")
    # too few sizes or seeds: one sentence, no run
    at.text_input(key="ss_fractions").set_value("0, 0.5, 1").run()
    assert any("at least 6" in w.value for w in at.warning) and not at.get("button")
    at.text_input(key="ss_fractions").set_value("0, 0.1, lots").run()
    assert any("numbers separated by commas" in w.value for w in at.warning)
    at.text_input(key="ss_fractions").set_value("0, 0.01, 0.03, 0.1, 0.3, 1").run()
    at.text_input(key="ss_seeds").set_value("3").run()
    assert any("at least 2 different seeds" in w.value for w in at.warning)
    at.text_input(key="ss_seeds").set_value("0, 1").run()
    no_problems(at)
    t0 = time.perf_counter()
    _run_sweep(at, "ss")
    print(f"size sweep through the page: {time.perf_counter() - t0:.1f} s")
    fig = _figure(at)
    cache, only = fig["data"][0], fig["data"][1]
    assert cache["name"] == "cache" and only["name"].startswith("cache-only")
    assert len(cache["x"]) == 6 and cache["x"][0].startswith("0%") and cache["y"][0] == 0 == only["y"][0]
    assert len(cache["error_y"]["array"]) == 6 and cache["error_y"]["visible"]
    summary = at.dataframe[0].value
    assert len(summary) == 6 and set(summary["seeds"]) == {2}
    assert len(at.dataframe[1].value) == 12
    assert "CSV" in _downloads(at)
    _png_ok(at)


def test_table1_page(env):
    at = open_page(APP, "table1.py")
    assert at.title[0].value.startswith("Table 1")
    assert at.multiselect(key="t1_models_digits").value == ["digits-cnn"]
    assert not at.toggle(key="t1_side").proto.disabled  # the preset chose key layers
    t0 = time.perf_counter()
    _run_sweep(at, "t1")
    print(f"table 1 through the page: {time.perf_counter() - t0:.1f} s")
    wide = at.dataframe[0].value
    assert len(wide) == 1 and wide["model"][0] == "digits-cnn"
    for col in ("baseline %", "cache %", "cache-only %", "cache3 %"):
        assert 0 <= wide[col][0] <= 100
    assert "relu3" in wide["cache keys"][0] and ", " in wide["cache θ, λ"][0]
    assert len(at.dataframe[1].value) == 4
    assert [t["name"] for t in _figure(at)["data"]] == ["baseline", "cache", "cache-only", "cache3"]
    assert "CSV" in _downloads(at)
    _png_ok(at)
    # the sidebar's key layers for the 'cache' row: another table, run on demand
    at.toggle(key="t1_side").set_value(True).run()
    no_problems(at)
    assert at.button(key="t1_run")


def test_a_second_session_gets_the_stored_sweep_at_once(env, digits_rows):
    at = open_page(APP, "layers.py")  # the sweep of test_layer_sweep_page, or of `digits_rows` when run alone
    assert at.get("plotly_chart") and not [b for b in at.button if b.key == "ls_run"]


def test_a_failing_sweep_reports_one_sentence(env, monkeypatch):
    from cacheviz.sweeps import LayerSweep

    def broken(self, run):
        run.progress.stage("load data")
        raise CachevizError("the digits went missing", "restore them", param="dataset", value="digits")

    monkeypatch.setattr(LayerSweep, "compute", broken)
    at = open_page(APP, "layers.py")
    at.toggle(key="ls_retune").set_value(True).run()
    at.select_slider(key="ls_dim").set_value(64).run()
    at.button(key="ls_run").click().run()
    until(at, lambda a: a.error, timeout=30, errors_ok=True)
    assert [e.value for e in at.error] == ["Dataset (digits): the digits went missing; restore them."]
    assert at.button(key="ls_run"), "it can be tried again"


def test_parse_numbers():
    assert ui.parse_numbers("0, 0.01;0.1 1", "sizes") == [0, 0.01, 0.1, 1]
    assert ui.parse_numbers("0,1", "seeds", int) == [0, 1]
    for bad, kind in (("0, x", float), ("0.5", int)):
        with pytest.raises(CachevizError, match="separated by commas"):
            ui.parse_numbers(bad, "seeds", kind)


def test_table1_wide_layout():
    rows = [
        {"model": "m", "dataset": "d", "variant": "baseline", "error": 0.1, "theta": None, "lam": None, "layers": [],
         "key_dim": None, "n_cache": 0},
        {"model": "m", "dataset": "d", "variant": "cache", "error": 0.08, "theta": 50, "lam": 0.3, "layers": ["a"],
         "key_dim": 4096, "n_cache": 100},
        {"model": "m", "dataset": "d", "variant": "cache-only", "error": 0.12, "theta": 70, "lam": 1.0, "layers": ["a"],
         "key_dim": 4096, "n_cache": 100},
        {"model": "m", "dataset": "d", "variant": "cache3", "error": 0.07, "theta": 40, "lam": 0.5, "layers": ["a", "b"],
         "key_dim": 8192, "n_cache": 100},
    ]
    (w,) = ui.table1_wide(rows)
    assert (w["baseline %"], w["cache %"], w["cache-only %"], w["cache3 %"]) == (10.0, 8.0, 12.0, 7.0)
    assert w["cache θ, λ"] == "50, 0.3" and w["cache-only θ"] == "70" and w["cache3 keys"] == "a+b (8,192)"
    assert w["cache items"] == 100
    from cacheviz.rows import csv_bytes

    csv = csv_bytes(rows).decode()
    assert csv.splitlines()[0].startswith("model,dataset,variant,error") and "a+b" in csv


# ---------------------------------------------------------------------------------------------
# Figure builders


def _layer_rows(model: str, accs: list[float], base: float, retuned: bool = False) -> list[dict]:
    n = len(accs)
    return [{"model": model, "dataset": "cifar10", "layer": f"L{i}", "depth": i / (n - 1), "dim": min(1024, 64 << i),
             "full_dim": 64 << i, "acc": a, "cache_only_acc": a - 0.01, "baseline_acc": base,
             "theta": 50.0, "lam": 0.5, "retuned": retuned} for i, a in enumerate(accs)]


def test_fig_layer_sweep_curves_baselines_and_stars():
    rows = {"resnet20": _layer_rows("resnet20", [0.5, 0.7, 0.86, 0.84, 0.81], 0.81),
            "resnet56": _layer_rows("resnet56", [0.45, 0.8, 0.88, 0.9, 0.84], 0.84)}
    fig = plots.fig_layer_sweep(rows)
    assert len(fig.data) == 6
    for k, (model, best_layer, best_acc, base) in enumerate((("resnet20", "L2", 86.0, 81.0),
                                                            ("resnet56", "L3", 90.0, 84.0))):
        curve, baseline, star = fig.data[3 * k: 3 * k + 3]
        assert curve.name == model and list(curve.x) == [0, 0.25, 0.5, 0.75, 1.0]
        assert [round(v, 6) for v in curve.y][0] == {0: 50.0, 1: 45.0}[k]
        assert list(baseline.x) == [0, 1] and list(baseline.y) == [base, base] and baseline.line.dash == "dash"
        assert star.marker.symbol == "star" and math.isclose(star.y[0], best_acc) and star.customdata[0][0] == best_layer
        assert star.name == f"{model} best: {best_layer}"
        assert curve.line.color == baseline.line.color == star.marker.color  # one colour per model
        # hover: layer name, dimensions (projected from the full one), accuracy
        assert list(curve.customdata[4]) == ["L4", "1,024"]  # 1024-d already: nothing projected
        assert "%{customdata[0]}" in curve.hovertemplate and "accuracy" in curve.hovertemplate
    assert fig.data[0].line.color != fig.data[3].line.color
    assert "θ = 50, λ = 0.5" in fig.layout.title.text
    # a flat list of rows is grouped by model; re-tuned rows say so
    flat = plots.fig_layer_sweep(_layer_rows("a", [0.5, 0.6, 0.7], 0.6, True) + _layer_rows("b", [0.5, 0.6, 0.7], 0.6, True))
    assert [t.name for t in flat.data][::3] == ["a", "b"] and "re-tuned" in flat.layout.title.text


def test_fig_layer_sweep_hover_dims():
    (curve, _, _) = plots.fig_layer_sweep({"m": _layer_rows("m", [0.5, 0.6, 0.7, 0.6, 0.5, 0.4], 0.5)}).data
    dims = [c[1] for c in curve.customdata]
    assert dims[0] == "64" and dims[5] == "1,024 (projected from 2,048)"


def _size_rows() -> list[dict]:
    rows = []
    for frac, gains in ((0.0, None), (0.1, (1.0, 3.0)), (1.0, (4.0, 4.0))):
        for seed in (0, 1):
            base = 0.80
            if gains is None:
                rows.append({"fraction": frac, "seed": seed, "n_cache": 0, "baseline_acc": base, "cache_acc": base,
                             "cache_only_acc": None, "gain": 0.0})
            else:
                g = gains[seed] / 100
                rows.append({"fraction": frac, "seed": seed, "n_cache": int(frac * 1000), "baseline_acc": base,
                             "cache_acc": base + g, "cache_only_acc": base - 0.02 + g, "gain": g * 100})
    return rows


def test_fig_size_sweep_means_and_error_bars():
    fig = plots.fig_size_sweep(_size_rows())
    cache, only = fig.data
    assert list(cache.x) == ["0% (network)", "10%", "100%"]
    assert [round(v, 6) for v in cache.y] == [0.0, 2.0, 4.0]
    assert [round(v, 6) for v in only.y] == [0.0, 0.0, 2.0]  # cache-only gain = cache_only_acc - baseline_acc
    # s.e.m. of (1, 3) over 2 seeds = std(ddof=1) / sqrt(2) = 1
    assert [round(v, 6) for v in cache.error_y.array] == [0.0, 1.0, 0.0] and cache.error_y.visible
    assert [round(v, 6) for v in only.error_y.array] == [0.0, 1.0, 0.0]
    assert any(s.y0 == 0 == s.y1 for s in fig.layout.shapes)  # the network's line at zero gain
    assert "2 seeds" in fig.layout.title.text
    summary = plots.size_sweep_summary(_size_rows())
    assert [s["n_cache"] for s in summary] == [0, 100, 1000]


def test_fig_table1():
    rows = [{"model": "m", "dataset": "d", "variant": v, "error": e, "layers": l}
            for v, e, l in (("baseline", 0.1, []), ("cache", 0.08, ["a"]), ("cache-only", 0.12, ["a"]),
                            ("cache3", 0.07, ["a", "b"]))]
    fig = plots.fig_table1(rows)
    assert [t.name for t in fig.data] == list(plots.TABLE1_VARIANTS)
    assert [round(t.y[0], 6) for t in fig.data] == [10.0, 8.0, 12.0, 7.0]


# ---------------------------------------------------------------------------------------------
# PNG export and the README figures script


def _needs_png():
    problem = plots.png_problem()
    if problem:
        pytest.skip(f"PNG renderer unavailable here: {problem}")


def test_fig_to_png():
    _needs_png()
    fig = plots.fig_size_sweep(_size_rows())
    t0 = time.perf_counter()
    png = plots.fig_to_png(fig, width=600, height=400, scale=1)
    print(f"PNG rendered in {time.perf_counter() - t0:.1f} s")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(png)).size == (600, 400)


def test_fig_to_png_without_a_browser_is_one_sentence(monkeypatch):
    monkeypatch.setattr(plots, "chrome_path", lambda: None)
    with pytest.raises(CachevizError) as info:
        plots.fig_to_png(plots.fig_table1([]))
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg and ("Chromium" in msg or "kaleido" in msg)


@pytest.fixture(scope="module")
def digits_rows(app_dir) -> dict:
    """Digits sweep rows, read back from the store the pages wrote (computed if run alone)."""
    from cacheviz.sweeps import LayerSweep, SizeSweep

    return {
        "layers": LayerSweep(PAGE_SETUP.replace(project_dim=1024)).run(app_dir),
        "sizes": SizeSweep(PAGE_SETUP, fractions=PAGE_FRACTIONS, seeds=(0, 1)).run(app_dir),
    }


def test_figures_script_on_digits_rows(digits_rows, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("figures", REPO / "benchmarks" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    (tmp_path / "layers.json").write_text(json.dumps(digits_rows["layers"]))
    (tmp_path / "sizes.json").write_text(json.dumps(digits_rows["sizes"]))
    out = tmp_path / "figs"
    # what it needs: rows with the figure's columns
    (tmp_path / "bad.json").write_text(json.dumps([{"fraction": 0}]))
    assert figures.main(["--sizes", str(tmp_path / "bad.json"), "--out-dir", str(out)]) == 2
    assert "does not hold the rows" in capsys.readouterr().err
    args = ["--layers", str(tmp_path / "layers.json"), "--sizes", str(tmp_path / "sizes.json"), "--out-dir", str(out)]
    if plots.png_problem():
        assert figures.main(args) == 2
        pytest.skip(f"PNG renderer unavailable here: {plots.png_problem()}")
    assert figures.main(args) == 0
    for name in ("layer-sweep.png", "size-sweep.png"):
        data = (out / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000


def test_a_job_over_several_models_reports_prefixed_stages(app_dir, digits_rows):
    """Overlays run one study per model in one job; each model's stages carry its name."""
    from cacheviz.study import StudyGroup
    from cacheviz.sweeps import LayerSweep

    group = StudyGroup([("a", LayerSweep(PAGE_SETUP.replace(project_dim=1024))),
                        ("b", LayerSweep(PAGE_SETUP.replace(project_dim=128)))])
    assert group.lookup(app_dir) is None  # "b" is not stored yet: nothing is computed to find out
    board = ui.JobBoard()
    job = board.start(("t",), "t", lambda j: group.run(app_dir, "cpu", j), threading.Lock())
    while job.state == "running":
        time.sleep(0.05)
    assert job.state == "done", job.error
    rows = group.lookup(app_dir)
    assert len(rows) == 14 and rows[:7] == digits_rows["layers"]
    stages = [name for name, _ in job.snapshot()["finished"]]
    assert stages == ["b · load data", "b · extract train features", "b · extract test features", "b · layers"]
    assert set(stages) <= set(group.stages) and group.stages[:2] == ("a · load data", "a · extract train features")


def test_the_grid_table_shows_every_cell_and_stars_the_chosen_pair():
    import re

    acc = [[0.5, 0.6, 0.7], [0.55, 0.9, 0.65]]
    result = {"grid": {"thetas": [10.0, 20.0], "lams": [0.1, 0.5, 0.9], "acc": acc},
              "theta": 20.0, "lam": 0.5, "baseline_acc_val": 0.5}
    html = plots.grid_table_html(result)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
    assert cells == ["50.0", "60.0", "70.0", "55.0", "★ 90.0", "65.0"]
    assert re.findall(r'title="θ = (\S+), λ = (\S+):', html)[4] == ("20", "0.5")
    colours = re.findall(r"background:(rgb\([^)]*\))", html)
    assert len(set(colours)) == 6  # every accuracy its own colour; the lowest and highest at the ends
    assert colours[0] == "rgb(68, 1, 84)" and colours[4] == "rgb(253, 231, 37)"
    flat = dict(result, grid=dict(result["grid"], acc=[[0.5] * 3] * 2))  # one value: no division by 0
    assert re.findall(r"<td[^>]*>([^<]*)</td>", plots.grid_table_html(flat)).count("50.0") == 5
