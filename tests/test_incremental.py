"""The cache as a knowledge store (issue 11): classes in tasks, the store against a fine-tuned head, on digits.

Margins come from the measured digits runs (docs/notes/issue11-incremental.md): after the fifth
task the store still answers all 44 test items of digits 0 and 1 right with the full backbone
(and with the first-task backbone); 0.95 allows two of them to go wrong. The fine-tuned head
answers none of them right in the class scenario, and all of them in the task scenario.
"""
from __future__ import annotations

import json

import pytest
import torch

from cacheviz.__main__ import main
from cacheviz.config import Setup
from cacheviz.incremental import Incremental, task_classes


@pytest.fixture(scope="module")
def rows_all(data_dir):
    return Incremental(Setup(), tasks=5, backbone_classes="all").run(data_dir, "cpu")


def _pick(rows, method, scenario):
    out = [r for r in rows if r["method"] == method and r["scenario"] == scenario]
    return sorted(out, key=lambda r: r["task"])


def test_tasks_are_classes_in_index_order():
    assert task_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert task_classes(10, 1) == [list(range(10))]


def test_store_keeps_the_first_task_and_finetune_forgets_it(rows_all, data_dir):
    from cacheviz.data import load_dataset

    train_y = load_dataset("digits", data_dir).train_y
    for method in ("store", "finetune"):
        for scenario in ("class", "task"):
            rs = _pick(rows_all, method, scenario)
            assert [r["task"] for r in rs] == [1, 2, 3, 4, 5]
            assert [r["classes_seen"] for r in rs] == [2, 4, 6, 8, 10]
            assert [len(r["accuracy_per_task"]) for r in rs] == [1, 2, 3, 4, 5]
    store = _pick(rows_all, "store", "class")
    # every training item of the seen classes, nothing removed
    assert [r["n_store"] for r in store] == [int((train_y < 2 * t).sum()) for t in range(1, 6)]
    assert store[-1]["accuracy_per_task"][0] >= 0.95 and store[-1]["accuracy_seen"] >= 0.95
    ft_class, ft_task = _pick(rows_all, "finetune", "class"), _pick(rows_all, "finetune", "task")
    assert ft_class[0]["accuracy_seen"] >= 0.95  # it did learn task 1 ...
    assert ft_class[-1]["accuracy_per_task"][0] <= 0.1  # ... and forgot it once later tasks came
    assert ft_class[-1]["accuracy_seen"] <= 0.35
    assert ft_task[-1]["accuracy_seen"] >= ft_class[-1]["accuracy_seen"] + 0.5
    assert store[-1]["accuracy_seen"] >= ft_class[-1]["accuracy_seen"] + 0.5


def test_first_backbone_never_saw_the_later_digits(data_dir, rows_all):
    from cacheviz.data import load_dataset
    from cacheviz.models import digits_cnn_on_classes

    spec = digits_cnn_on_classes(data_dir, [1, 0])
    assert spec.classes == ["0", "1"] and spec.net.fc2.out_features == 2
    again = digits_cnn_on_classes(data_dir, [0, 1])  # from the file, keyed by the recipe
    assert again.weights_id == spec.weights_id
    ds = load_dataset("digits", data_dir)
    sel = ds.test_y < 2
    with torch.no_grad():
        pred = spec.net(spec.preprocess(ds.test_x[sel])).argmax(1)
    assert float((pred == ds.test_y[sel]).float().mean()) >= 0.95

    rows = Incremental(Setup(), tasks=5, backbone_classes="first").run(data_dir, "cpu")
    store, store_all = _pick(rows, "store", "class"), _pick(rows_all, "store", "class")
    assert store[-1]["accuracy_per_task"][0] >= 0.95
    # features that never saw digits 2..9 separate them far worse than the full network's
    assert store[-1]["accuracy_seen"] <= store_all[-1]["accuracy_seen"] - 0.2


def test_cli_writes_the_rows(data_dir, tmp_path, capsys):
    out = tmp_path / "inc.json"
    assert main(["incremental", "--data-dir", str(data_dir), "--tasks", "5", "--scenario", "class",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["scenario"] for r in rows} == {"class"} and len(rows) == 10
    assert {r["method"] for r in rows} == {"store", "finetune"}
    assert [r["classes_seen"] for r in rows if r["method"] == "store"] == [2, 4, 6, 8, 10]
    assert "finetune" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "3"], "do not split into 3 equal tasks"),
    (["--tasks", "0"], "whole number of tasks"),
    (["--tasks", "two"], "whole number of tasks"),
    (["--scenario", "domain"], "unknown scenario"),
    (["--backbone-classes", "half"], "unknown backbone"),
    (["--dataset", "cifar10", "--backbone-classes", "first"], "--backbone-classes all"),
])
def test_bad_input_is_one_sentence_and_status_2(data_dir, capsys, argv, words):
    assert main(["incremental", "--data-dir", str(data_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_incremental_figure_draws_each_method_and_scenario():
    import json
    from pathlib import Path

    from cacheviz.plots import fig_incremental

    rows = json.loads((Path(__file__).resolve().parents[1] / "docs/results/store/incremental-digits-first.json").read_text())
    fig = fig_incremental({"a": rows, "b": rows})
    assert len(fig.data) == 8  # 2 panels x (store, finetune) x (class, task)
    head = [t for t in fig.data if t.name == "fine-tuned head, class-incremental"][0]
    want = [100 * r["accuracy_seen"] for r in sorted(rows, key=lambda r: r["task"])
            if r["method"] == "finetune" and r["scenario"] == "class"]
    assert list(head.y) == want
