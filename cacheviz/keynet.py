"""Learned key networks (seed 003's "hash" functions): a small CNN that maps an image straight
into the cache's key space at layer l of the teacher network, so a query skips the teacher.

Trained in two stages on the training images: (1) regress the teacher's unit-norm keys at l
(loss 1 - cosine), (2) fine-tune on the labels with a triplet or an N-pair loss on the
normalised outputs. It then answers with the same cache (the teacher's keys of the training
items), cache-only p_mem at a theta tuned on the validation part. The trained weights are stored
with their recipe (safetensors + JSON, keyed like every result) and reused.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import CacheMemory
from .config import Setup
from .data import balanced_subset
from .errors import CachevizError
from .features import list_layers
from .progress import Stage
from .study import Run, Study, rounded
from .tuning import accuracy, default_grid

LOSSES = ("triplet", "npair")
MARGIN = 0.2  # triplet margin, in cosine distance
WIDTH = (16, 32, 32, 64, 64, 64)  # channels of the six convolutions


def default_layer(model: str) -> str:
    """The deepest default exit whose keys are a spatial map (a key network reproduces it with
    convolutions): a CIFAR ResNet's last block — its cache-only answer is the most accurate of
    the exits (ResNet20's layer3.2 with a 2.5% cache is level with the network on the shared
    CIFAR-10), and a key network's cost does not depend on how deep its teacher's layer is —
    and the digits CNN's pooled map."""
    from .early import architecture, default_exit_layers

    spec = architecture(model)
    if spec is None:
        raise CachevizError(f"{model} cannot have a key network here: its forward pass is not a chain of steps",
                            "use a CIFAR ResNet or digits-cnn", param="model", value=model)
    shapes = {i.name: i.shape for i in list_layers(spec)}
    return [n for n in default_exit_layers(spec) if len(shapes[n]) == 3][-1]


class KeyNet(nn.Module):
    """Six 3x3 convolutions (batch norm, ReLU), every other one strided while the teacher's layer
    is smaller than the image, then a 1x1 convolution to the teacher layer's channels (a spatial layer) or a
    pooled linear map to its width (a flat one)."""

    def __init__(self, in_channels: int, in_size: int, out_shape: tuple[int, ...], width=WIDTH):
        super().__init__()
        self.out_shape = tuple(int(v) for v in out_shape)
        spatial = len(self.out_shape) == 3
        target = self.out_shape[1] if spatial else 1
        downs = 0 if not spatial else max(0, round(math.log2(in_size / target)))
        if spatial and (in_size // (2 ** downs) != target or 2 * downs > len(width)):
            raise CachevizError(f"a key network cannot reach a {target}x{target} layer from {in_size}x{in_size} images",
                                "choose a layer whose size divides the image's by a power of 2", param="layer")
        # downsample early (convs 2, 4, ...): at full resolution six convs would cost as much as
        # the teacher itself (ResNet20's 41M multiply-adds), and a key network must be cheaper
        stride_at = {1 + 2 * i for i in range(downs)}
        layers, c = [], in_channels
        for i, w in enumerate(width):
            layers += [nn.Conv2d(c, w, 3, stride=2 if i in stride_at else 1, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = (nn.Conv2d(c, self.out_shape[0], 1) if spatial
                     else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, self.out_shape[0])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm keys (N, d) for normalised images x."""
        return F.normalize(self.head(self.body(x)).flatten(1), dim=1, eps=1e-12)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Losses (on unit-norm embeddings)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float = MARGIN) -> torch.Tensor:
    """mean max(0, d(a, p) - d(a, n) + margin), d = 1 - cosine."""
    d_ap = 1 - (anchor * positive).sum(1)
    d_an = 1 - (anchor * negative).sum(1)
    return F.relu(d_ap - d_an + margin).mean()


def npair_loss(anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Sohn's N-pair loss: pairs (anchor_i, positive_i) of N different classes; for each i,
    log(1 + sum_{j != i} exp(a_i . p_j - a_i . p_i)), averaged: a softmax cross-entropy over the
    N positives with the right one as target."""
    logits = anchor @ positive.T
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


def _triplets(y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch of labels: each item as an anchor with a random positive (same class, another
    item where there is one) and a random negative (another class)."""
    n = len(y)
    same = y[:, None] == y[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    pos_w = (same & ~eye).float()
    pos_w[pos_w.sum(1) == 0] = eye[pos_w.sum(1) == 0].float()  # a lone item is its own positive
    neg_w = (~same).float()
    ok = neg_w.sum(1) > 0
    a = torch.arange(n)[ok]
    p = torch.multinomial(pos_w[ok], 1, generator=g).squeeze(1)
    q = torch.multinomial(neg_w[ok], 1, generator=g).squeeze(1)
    return a, p, q


def _npairs(y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One (anchor, positive) pair per class present twice or more in the batch."""
    a, p = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).squeeze(1)
        if len(idx) >= 2:
            pick = idx[torch.randperm(len(idx), generator=g)[:2]]
            a.append(pick[0])
            p.append(pick[1])
    return torch.stack(a) if a else torch.zeros(0, dtype=torch.long), torch.stack(p) if p else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Recipe:
    layer: str
    loss: str
    epochs_regress: int
    epochs_metric: int
    lr: float = 2e-3
    batch: int = 128
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def train(spec, images: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, recipe: Recipe, device,
          progress=None) -> tuple[KeyNet, dict]:
    """A KeyNet for `spec`'s layer, trained on uint8 `images` (N, H, W, C) with the teacher's
    unit-norm `keys` (N, d) and `labels`; returns it (eval mode) and the training log."""
    shape = next(i.shape for i in list_layers(spec) if i.name == recipe.layer)
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    net = KeyNet(spec.in_channels, spec.input_size[0], shape).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    n = len(images)
    log = {"regress": [], "metric": [], "seconds": 0.0}
    t0 = time.perf_counter()
    total = recipe.epochs_regress + recipe.epochs_metric
    steps_per_epoch = -(-n // recipe.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(1, total * steps_per_epoch))
    for epoch in range(total):
        stage = "regress" if epoch < recipe.epochs_regress else "metric"
        net.train()
        order = torch.randperm(n, generator=g)
        run_loss, seen = 0.0, 0
        for s in range(0, n, recipe.batch):
            idx = order[s:s + recipe.batch]
            x = spec.preprocess(images[idx].to(device))
            target = keys[idx].to(device)
            out = net(x)
            if stage == "regress":
                loss = (1 - (out * target).sum(1)).mean()
            else:
                y = labels[idx]
                if recipe.loss == "triplet":
                    a, p, q = _triplets(y, g)
                    loss = triplet_loss(out[a], out[p], out[q])
                else:
                    a, p = _npairs(y, g)
                    if len(a) < 2:
                        continue
                    loss = npair_loss(out[a], out[p])
                # and stay near the teacher's keys: the cache holds those
                loss = loss + (1 - (out * target).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch < sched.total_steps - 1:
                sched.step()
            run_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
        log[stage].append(run_loss / max(1, seen))
        if progress:
            progress(epoch + 1, total, f"{stage} epoch {epoch + 1 - (0 if stage == 'regress' else recipe.epochs_regress)}")
    log["seconds"] = time.perf_counter() - t0
    net.eval()
    return net, log


def student_keys(net: KeyNet, spec, images: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out.append(net(spec.preprocess(images[s:s + batch].to(device))))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The study: train (or reuse), then the seed's table remade

FGSM_EPS = (0.05, 0.1)  # in the normalised input space, as the robustness lab's
CORRUPTION_FACTORS = (0.5, 1.5)
ROBUST_IMAGES = 1000


class _LogPMem(nn.Module):
    """images -> log p_mem of the key network's query against the cache (differentiable)."""

    def __init__(self, net: KeyNet, memory: CacheMemory, theta: float):
        super().__init__()
        self.net, self.memory, self.theta = net, memory, float(theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .cache import p_mem_from_sims

        q = self.net(x).to(self.memory.device)
        p = p_mem_from_sims(q @ self.memory.keys.T, self.memory.values, self.theta).to(x.device)
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


class _LogSoftmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(x), dim=1)


def _predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s:s + batch]).argmax(1).cpu() for s in range(0, len(x), batch)])


@dataclass(frozen=True)
class KeyNetStudy(Study):
    """Train a key network for `layer` of the setup's network (or reuse the stored one) and remake
    seed 003's table. Rows: model (`network`, `keynet`, `truncated` — the teacher run up to
    `layer` with the same cache), accuracy, ms_per_image, params, n_cache, theta; then one row per
    model and robustness condition (`condition`: clean — the robustness images unchanged —, fgsm
    0.05, fgsm 0.1, brightness 0.5, ...,
    `accuracy`). The trained weights are this result's tensors."""

    version: ClassVar[int] = 3  # 2: a clean row; 3: class-balanced robustness and timing images

    setup: Setup
    layer: str = "layer3.2"
    loss: str = "triplet"
    fraction: float = 0.025
    epochs_regress: int = 6
    epochs_metric: int = 3
    timing_images: int = 1000
    reps: int = 3
    kind = "keynet"
    stages = (Stage.LOAD, Stage.TRAIN_FEATURES, Stage.TEST_FEATURES, "training", "testing", "robustness")

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise CachevizError(f"the key network's loss is {' or '.join(LOSSES)}", param="loss", value=self.loss)
        if not 0 < float(self.fraction) <= 1:
            raise CachevizError("the cache is a fraction of the training set", "give a value in (0, 1], e.g. 0.025",
                                param="fraction", value=self.fraction)
        if int(self.epochs_regress) < 1 or int(self.epochs_metric) < 0:
            raise CachevizError("give at least one regression epoch", param="epochs", value=self.epochs_regress)
        if self.setup.project_dim:
            raise CachevizError("a key network learns the layer's full keys", "drop the projection (--project-dim)",
                                param="project_dim", value=self.setup.project_dim)

    @property
    def setups(self) -> tuple[Setup, ...]:
        return (self.setup,)

    def recipe(self) -> Recipe:
        return Recipe(self.layer, self.loss, int(self.epochs_regress), int(self.epochs_metric), seed=self.setup.seed)

    def options(self) -> dict:
        return {"setup": self.setup.identity(), "recipe": self.recipe().to_dict(), "width": list(WIDTH),
                "fraction": float(self.fraction), "timing_images": int(self.timing_images), "reps": int(self.reps)}

    def compute(self, run: Run) -> list[dict]:
        from . import attacks as A
        from .early import Exit, full_answer, timed, truncated_answer
        from .features import make_keys
        from .workspace import ExperimentData

        ws = run.prepare(self.setup)
        spec, dev = ws.spec, ws.device
        if self.layer not in {i.name for i in list_layers(spec)}:
            raise CachevizError(f"{spec.name} has no layer {self.layer!r}", "see `python -m cacheviz layers`",
                                param="layers", value=self.layer)
        data = ExperimentData(ws, [self.layer], run.progress)
        n_u = len(data.train_u)
        keys = make_keys(data.tf, [self.layer], rows=torch.arange(n_u)).cpu()
        images = ws.ds.train_x[data.train_u]
        labels = ws.ds.train_y[data.train_u]
        run.progress.stage("training")
        net, log = train(spec, images, keys, labels, self.recipe(), dev, progress=run.progress.step)
        del keys

        run.progress.stage("testing")
        subset = balanced_subset(labels, max(len(ws.ds.classes), int(round(self.fraction * n_u))), self.setup.seed)
        mem_val = data.memory([self.layer], "val", subset)
        # the test-time cache is the tuning one unless validation items come from the training set
        mem = data.memory([self.layer], "test", subset) if data.from_train else mem_val
        thetas, _ = default_grid(self.setup.n_theta, 1, self.setup.theta_max)
        sp = ws.split
        val_x = (ws.ds.train_x if sp.val_part == "train" else ws.ds.test_x)[sp.val_idx]
        val_y = (ws.ds.train_y if sp.val_part == "train" else ws.ds.test_y)[sp.val_idx]
        theta = _best_theta(mem_val, student_keys(net, spec, val_x, dev), val_y, thetas)
        # the teacher truncated at the same layer, with the same cache: its theta from the same grid
        q_val_t = make_keys(data.qf, [self.layer])[data.vrows.to(data.qf[self.layer].device)] \
            if sp.val_part == "test" else make_keys(data.tf, [self.layer], rows=data.vrows)
        theta_t = _best_theta(mem_val, q_val_t, val_y, thetas)
        data.release()
        test_x = ws.ds.test_x[sp.test_idx]
        y = ws.ds.test_y[sp.test_idx]
        x = spec.preprocess(test_x.to(dev))
        student = _LogPMem(net, mem, theta).eval()
        network = _LogSoftmax(spec.net).eval()
        ex = Exit(self.layer, mem, theta_t, theta_t, 1.0)
        acc = {"network": float((_predict(network, x) == y).float().mean()),
               "keynet": float((_predict(student, x) == y).float().mean()),
               "truncated": float((truncated_answer(spec, ex, x).argmax(1) == y).float().mean())}
        n_t = min(int(self.timing_images), len(x))
        xt = x[balanced_subset(y, n_t, self.setup.seed)]

        def keynet_answer():
            with torch.inference_mode():
                for s in range(0, n_t, 256):
                    mem.p_mem(net(xt[s:s + 256]).to(mem.device), theta)

        fns = {"network": lambda: full_answer(spec, xt), "keynet": keynet_answer,
               "truncated": lambda: truncated_answer(spec, ex, xt)}
        ms = {k: 1e3 * t / n_t for k, t in timed(fns, dev, int(self.reps)).items()}
        params = {"network": n_params(spec.net), "keynet": n_params(net), "truncated": None}
        common = {"layer": self.layer, "loss": self.loss, "n_cache": len(mem), "net": spec.name,
                  "dataset": self.setup.dataset, "seed": self.setup.seed, "device": run.device_name,
                  "timing_images": n_t, "n_test": len(y), "train_seconds": round(log["seconds"], 1)}
        rows = [{**common, "model": m, "condition": None, "accuracy": acc[m], "ms_per_image": float(f"{ms[m]:.4g}"),
                 "params": params[m], "theta": {"network": None, "keynet": theta, "truncated": theta_t}[m]}
                for m in ("network", "keynet", "truncated")]

        run.progress.stage("robustness")
        n_r = min(ROBUST_IMAGES, len(x))
        # class-balanced: the test folder is stored class by class, so the first n are two classes
        keep = balanced_subset(y, n_r, self.setup.seed)
        xr, yr = x[keep], y[keep]
        lo = spec.normalize(torch.zeros(1, spec.in_channels, 1, 1, device=dev))
        hi = spec.normalize(torch.ones(1, spec.in_channels, 1, 1, device=dev))
        conds = [("clean", "clean", None)] + [(f"fgsm {e:g}", "fgsm", e) for e in FGSM_EPS] + \
                [(f"{k} {f:g}", k, f) for k in ("brightness", "contrast", "gamma") for f in CORRUPTION_FACTORS]
        for i, (name, kind, v) in enumerate(conds):
            for m, model in (("network", network), ("keynet", student)):
                if kind == "clean":  # the same images unchanged: what each condition is compared to
                    xa = xr
                elif kind == "fgsm":
                    target = _predict(model, xr).to(dev)  # the model's own answer, as the lab attacks
                    xa = torch.cat([torch.maximum(torch.minimum(
                        xr[s:s + 128] + v * A.fgsm_direction(model, xr[s:s + 128], target[s:s + 128]), hi), lo)
                        for s in range(0, n_r, 128)])
                else:
                    xa = A.corrupt(spec, xr, kind, v)
                rows.append({**common, "model": m, "condition": name,
                             "accuracy": float((_predict(model, xa) == yr).float().mean()), "ms_per_image": None,
                             "params": None, "theta": None})
            run.progress.step(i + 1, len(conds), name)
        run.tensors = {f"keynet.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
        return [rounded(r) for r in rows]


def _best_theta(mem: CacheMemory, q: torch.Tensor, y: torch.Tensor, thetas) -> float:
    """The theta of the grid with the best cache-only accuracy of queries q on labels y."""
    q = q.to(mem.device)
    return max(thetas, key=lambda t: accuracy(mem.p_mem(q, t).cpu(), y))


def load_keynet(study: KeyNetStudy, data_dir, spec) -> KeyNet | None:
    """The stored trained key network of `study` (None until it has run)."""
    from . import store

    key = study.key(data_dir)
    hit = None if key is None else store.load_tensors(study.path(data_dir, key).with_suffix(".safetensors"), key)
    if hit is None:
        return None
    shape = next(i.shape for i in list_layers(spec) if i.name == study.layer)
    net = KeyNet(spec.in_channels, spec.input_size[0], shape)
    net.load_state_dict({k[len("keynet."):]: v for k, v in hit[0].items()})
    return net.eval()


def stored_keynets(setup: Setup, data_dir) -> list[KeyNetStudy]:
    """The key networks trained for `setup` (any layer, loss, cache or epochs) whose results are
    stored in `data_dir` and still valid (same data and weights), newest first."""
    import json
    from pathlib import Path

    ident = setup.replace(layers=()).identity()
    found = []
    for path in sorted(Path(data_dir, "results").glob("keynet-*.json"), key=lambda p: -p.stat().st_mtime):
        try:
            opts = json.loads(path.read_text())["key"]["options"]
            if opts["setup"] != json.loads(json.dumps(ident, default=str)):
                continue
            r = opts["recipe"]
            study = KeyNetStudy(setup.replace(layers=()), layer=r["layer"], loss=r["loss"], fraction=opts["fraction"],
                                epochs_regress=r["epochs_regress"], epochs_metric=r["epochs_metric"],
                                timing_images=opts["timing_images"], reps=opts["reps"])
        except (OSError, ValueError, KeyError, TypeError, CachevizError):
            continue  # another version's file, or a damaged one: not offered
        if study.lookup(data_dir, max_age=5.0) is not None:
            found.append(study)
    return found


def keynet_query(net: KeyNet, spec, index, image, p_net):
    """The retrieval `Query` of one image (H, W, C) uint8 when the key network makes its key: its
    similarity to every row of `index` (the teacher's keys at the key network's layer); `p_net`
    is the network's answer, shown beside it."""
    from .retrieval import Query, as_batch

    x = spec.preprocess(as_batch(image).to(next(net.parameters()).device))
    with torch.no_grad():
        q = net(x).to(index.memory.device)
        sims = torch.cat([s for _, s in index.memory.iter_similarities(q)], dim=0)[0]
    return Query(list(index.layers), q[0].cpu(), p_net, sims.float().cpu())


def keynet_theta(study: KeyNetStudy, data_dir) -> float | None:
    """The theta tuned for the key network's cache-only answer (None until it has run)."""
    rows = study.lookup(data_dir, max_age=5.0)
    return next((r["theta"] for r in rows or [] if r["model"] == "keynet" and r["condition"] is None), None)
