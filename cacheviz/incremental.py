"""The cache as a knowledge store (issue 11): learning new classes without forgetting old ones.

Classes arrive in tasks of equal size, in their index order (CIFAR-10 and digits in 5 tasks:
0,1 | 2,3 | ... | 8,9). After each task the study tests on the test items of every class seen
so far. Two methods, both on a frozen backbone:

* `store`: the knowledge store. The cache holds the keys (the setup's key layers, built by the
  engine's `make_keys`) of every training item of the classes seen so far; a task's items are
  appended, none is ever removed, nothing is trained. It answers with the cache-only p_mem
  (lam = 1) over the classes seen so far. theta is tuned ONCE, after the first task, on the
  validation items of the first task's classes against a cache of that task's items (the
  engine's split: `ws.split`, the grid of `tuning.default_grid`), and kept for every later task.
  Two classes are easy, so several theta often tie on accuracy; the tie goes to the theta with
  the smaller validation log-loss of the true class (not to the grid's smallest theta, which is
  what `GridResult` would pick).
* `finetune`: the usual baseline. A linear head over ALL the dataset's classes (fixed size, so
  later classes' outputs exist from the start, as in the class-incremental literature's single
  head) on the backbone's penultimate features (the input of its last linear layer), randomly
  initialised (seeded; never the network's own head, which has seen every class), trained on
  each task's training items only, starting from the previous task's head, with Adam for
  `FINETUNE_EPOCHS` epochs; no replay. Cross-entropy over all outputs pushes the old classes'
  logits down: catastrophic forgetting in the class-incremental scenario.

Scenarios: `class` (class-incremental: predict among all classes seen so far) and `task`
(task-incremental: the task id is given at test time: predict among that task's classes).
In both, `accuracy_seen` is the share of the test items of the seen classes answered right
(over items, not a mean over tasks; the tasks' test parts are near equal in size, and
`accuracy_per_task` gives each task's own).

Backbone (`backbone_classes`): `all` is the model as given. ResNet20 was trained on all ten
CIFAR-10 classes, so its later "new" classes are not new to its features: the store then
measures what the cache adds on top of features that already separate them. `first` is a
backbone trained on the first task's classes only: digits-cnn retrained on the first task's
digits (`models.digits_cnn_on_classes`); not offered for other models (training a CIFAR ResNet
here is not). Work in progress: no page yet.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import CacheMemory
from .config import Setup
from .errors import CachevizError
from .features import OUTPUTS, make_keys, resolve_layers
from .progress import Stage
from .study import Run, Study, rounded
from .tuning import default_grid, grid_search
from .workspace import ExperimentData

METHODS = ("store", "finetune")
SCENARIOS = ("class", "task")
BACKBONES = ("all", "first")
FINETUNE_EPOCHS = 20
FINETUNE_LR = 1e-3
FINETUNE_BATCH = 64


def penultimate(spec) -> str:
    """The tappable layer whose output feeds the last linear layer (the one before the logits)."""
    names = [n for n, _ in spec.layers if n not in OUTPUTS and n != "input"]
    if not names:
        raise CachevizError(f"{spec.name} has no layer before its logits", param="model", value=spec.name)
    return names[-1]


def task_classes(n_classes: int, tasks: int) -> list[list[int]]:
    """Classes in index order, cut into `tasks` equal tasks."""
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise CachevizError("give a whole number of tasks from 1", "e.g. --tasks 5", param="tasks", value=tasks)
    if n_classes % tasks:
        divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise CachevizError(f"{n_classes} classes do not split into {tasks} equal tasks",
                            f"give one of {', '.join(map(str, divisors))}", param="tasks", value=tasks)
    per = n_classes // tasks
    return [list(range(t * per, (t + 1) * per)) for t in range(tasks)]


def _scores(logits_or_p: torch.Tensor, y: torch.Tensor, task_of: torch.Tensor, tasks: list[list[int]],
            seen: int, scenario: str) -> tuple[int, list[float]]:
    """Correct answers among the seen classes (`class`) or the item's own task's (`task`):
    (number right, accuracy on each seen task's items)."""
    n_classes = logits_or_p.shape[1]
    allowed = torch.zeros(len(y), n_classes, dtype=torch.bool)
    if scenario == "class":
        allowed[:, [c for t in tasks[:seen] for c in t]] = True
    else:
        for t in range(seen):
            rows = task_of == t
            allowed[rows.nonzero().view(-1, 1), torch.tensor(tasks[t]).view(1, -1)] = True
    pred = logits_or_p.masked_fill(~allowed, -math.inf).argmax(1)
    right = pred == y
    per_task = [float(right[task_of == t].float().mean()) for t in range(seen)]
    return int(right.sum()), per_task


def _train_head(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, seed: int,
                epochs: int = FINETUNE_EPOCHS) -> None:
    """Adam on (x, y) for `epochs` epochs, seeded; one thread, as `train_digits_cnn` (OpenMP
    threads on a busy 2-core machine make each step of so small a model ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(head.parameters(), lr=FINETUNE_LR)
        gen = torch.Generator().manual_seed(seed)
        head.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for s in range(0, len(y), FINETUNE_BATCH):
                idx = order[s:s + FINETUNE_BATCH]
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        head.eval()
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Incremental(Study):
    """Rows, one per task, method and scenario: task (1-based), method (`store`/`finetune`),
    scenario (`class`/`task`), classes_seen, accuracy_seen (share of the seen classes' test
    items answered right), accuracy_per_task (each seen task's), n_test, backbone_classes,
    dataset, net, n_store (items in the store; 0 for finetune, which keeps none), theta (the
    store's, tuned on task 1; None for finetune), seconds (wall time to add the task: the new
    items' keys and the grown cache for store, training the head for finetune; testing is not
    counted)."""

    setup: Setup
    tasks: int = 5
    backbone_classes: str = "all"
    scenarios: tuple[str, ...] = SCENARIOS
    kind = "incremental"
    stages = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, Stage.TUNE, "tasks")

    def __post_init__(self):
        if self.backbone_classes not in BACKBONES:
            raise CachevizError(f"unknown backbone {self.backbone_classes!r}", f"choose {' or '.join(BACKBONES)}",
                                param="backbone_classes", value=self.backbone_classes)
        scen = tuple(dict.fromkeys(self.scenarios))
        if not scen or any(s not in SCENARIOS for s in scen):
            raise CachevizError("unknown scenario", "choose class, task or both", param="scenario",
                                value=",".join(self.scenarios))
        object.__setattr__(self, "scenarios", tuple(s for s in SCENARIOS if s in scen))
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 1:
            raise CachevizError("give a whole number of tasks from 1", "e.g. --tasks 5", param="tasks", value=self.tasks)
        if self.backbone_classes == "first" and not (self.setup.dataset == "digits" and self.setup.model == "digits-cnn"
                                                      and self.setup.checkpoint is None):
            raise CachevizError(
                "a backbone trained on the first task's classes only is offered for digits-cnn on digits "
                "(training a CIFAR ResNet on two classes is not)", "use {backbone_classes} all",
                "switch {dataset} to digits", param="backbone_classes", value="first")

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "tasks": self.tasks, "backbone_classes": self.backbone_classes,
                "scenarios": list(self.scenarios),
                "finetune": {"epochs": FINETUNE_EPOCHS, "lr": FINETUNE_LR, "batch": FINETUNE_BATCH}}

    def compute(self, run: Run) -> list[dict]:
        from .models import digits_cnn_on_classes

        ws = run.prepare(self.setup)
        tasks = task_classes(len(ws.ds.classes), self.tasks)
        if self.backbone_classes == "first":
            # the default model's weights stay in the result's key (prepare loaded them); this
            # backbone is a function of the dataset and its recipe, both in the key too
            spec = digits_cnn_on_classes(run.data_dir, tasks[0], seed=self.setup.seed, progress=run.progress.step)
            ws = dataclasses.replace(ws, spec=spec, layers=resolve_layers(spec, list(self.setup.layers) or None))
        layers, pen = ws.layers, penultimate(ws.spec)
        data = ExperimentData(ws, list(dict.fromkeys(layers + [pen])), run.progress)
        n_classes = data.n_classes
        task_id = torch.full((n_classes,), -1, dtype=torch.long)
        for t, cs in enumerate(tasks):
            task_id[cs] = t
        y_train_u = ws.ds.train_y[data.train_u]
        q_val, q_test = data.queries(layers)
        y_test = data.y_test

        # theta from the first task alone: its validation items against a cache of its items
        run.progress.stage(Stage.TUNE)
        first = torch.isin(y_train_u, torch.tensor(tasks[0])).nonzero().view(-1)
        mem1 = data.memory(layers, "val", first)
        vsel = torch.isin(data.y_val, torch.tensor(tasks[0]))
        q1, y1 = q_val[vsel.to(q_val.device)], data.y_val[vsel]
        thetas = default_grid(self.setup.n_theta, 1, self.setup.theta_max)[0]
        # lam = 1: p_net never enters, so zeros stand in for the network's outputs
        grid = grid_search(mem1, q1, torch.zeros(len(y1), n_classes), y1, thetas, [1.0], progress=run.progress.step)
        best = grid.acc_cache_only.max()
        tied = [th for th, a in zip(thetas, grid.acc_cache_only) if a == best]
        nll = {th: float(-mem1.p_mem(q1, th).cpu()[torch.arange(len(y1)), y1].clamp_min(1e-12).log().mean())
               for th in tied}
        theta = min(tied, key=lambda th: nll[th])
        del mem1, q_val, q1

        # finetune's data: penultimate features of the training items (no flips) and test items
        x_train = data.tf[pen][: len(data.train_u)].float().cpu()
        x_test = data.qf[pen][data.trow.to(data.qf[pen].device)].float().cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.setup.seed)
            head = torch.nn.Linear(x_train.shape[1], n_classes)

        # the first optimiser step of a process pays one-time lazy setup (about 1 s here), which
        # is no part of adding a task: spend it on a throwaway head before the clock runs
        _train_head(torch.nn.Linear(x_train.shape[1], n_classes), x_train[:1], y_train_u[:1], 0, epochs=1)

        run.progress.stage("tasks")
        rows: list[dict] = []
        keys, labels = None, None
        base = {"backbone_classes": self.backbone_classes, "dataset": self.setup.dataset, "net": ws.spec.name}
        for t, cs in enumerate(tasks):
            seen_classes = torch.tensor([c for tc in tasks[: t + 1] for c in tc])
            test_sel = torch.isin(y_test, seen_classes)
            yt = y_test[test_sel]
            task_of = task_id[yt]
            n_test = len(yt)

            # store: append the task's items; the cache is grouped by class as CacheMemory wants,
            # and tasks arrive in class order, so appending keeps it grouped
            t0 = time.perf_counter()
            new = torch.isin(y_train_u, torch.tensor(cs)).nonzero().view(-1)
            new_rows = data.cache_rows("test", new)
            new_rows = new_rows[torch.argsort(data.y_cache[new_rows], stable=True)]
            new_keys = make_keys(data.tf, layers, rows=new_rows)
            new_labels = data.y_cache[new_rows]
            keys = new_keys if keys is None else torch.cat([keys, new_keys])
            labels = new_labels if labels is None else torch.cat([labels, new_labels])
            del new_keys
            mem = CacheMemory(keys, labels, n_classes, ws.device)
            store_s = time.perf_counter() - t0
            p_mem = mem.p_mem(q_test[test_sel.to(q_test.device)], theta).cpu()
            del mem

            t0 = time.perf_counter()
            tr = torch.isin(y_train_u, torch.tensor(cs))
            _train_head(head, x_train[tr], y_train_u[tr], self.setup.seed + t)
            ft_s = time.perf_counter() - t0
            with torch.no_grad():
                logits = head(x_test[test_sel])

            for method, out, n_store, secs in (("store", p_mem, len(labels), store_s),
                                               ("finetune", logits, 0, ft_s)):
                for scenario in self.scenarios:
                    right, per_task = _scores(out, yt, task_of, tasks, t + 1, scenario)
                    rows.append({"task": t + 1, "method": method, "scenario": scenario,
                                 "classes_seen": int(len(seen_classes)), "accuracy_seen": right / max(n_test, 1),
                                 "accuracy_per_task": per_task, "n_test": n_test, **base, "n_store": int(n_store),
                                 "theta": theta if method == "store" else None, "seconds": secs})
            run.progress.step(t + 1, len(tasks), f"task {t + 1}")
        return rounded(rows)
