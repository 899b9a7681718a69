"""The studies the pages ask for, built from the sidebar's choice, and what they would cost."""
from __future__ import annotations

from pathlib import Path

from ..config import PAPER_VAL_ITEMS, Setup
from ..features import OUTPUTS, LayerInfo
from ..study import StudyGroup
from ..sweeps import LayerSweep, SizeSweep, table1_group
from .state import DATASETS, Choice, test_size, train_size

SWEEP_DIMS = [64, 128, 256, 512, 1024, 2048, 4096]
EXACT_LIMIT_GB = 8.0  # the layer sweep refuses exact keys needing more than this


def sweep_lock(choice: Choice) -> tuple:
    """Sweeps of one dataset run one after another: on a small machine two at once only thrash."""
    return ("sweep", choice.setup.dataset, str(Path(choice.data_dir).resolve()))


def layer_sweep(choice: Choice, models: list[str], project_dim: int | None, retune: bool) -> StudyGroup:
    """Figure 2 for `models` (the first is the sidebar's) with the sidebar's cache and flips."""
    return StudyGroup([(m, LayerSweep(choice.setup.replace(model=m, layers=(), project_dim=project_dim),
                                      retune=bool(retune))) for m in models])


def size_sweep(choice: Choice, fractions: list[float], seeds: list[int]) -> StudyGroup:
    """Figure 3 with the sidebar's setup (its key layers and cache)."""
    return StudyGroup([(choice.setup.model, SizeSweep(choice.setup, fractions=tuple(fractions), seeds=tuple(seeds)))])


def table1_sweep(choice: Choice, models: list[str], sidebar_layers: bool, combine_top: int) -> StudyGroup:
    """Table 1 for `models`: the 'cache' row keyed on each model's own layers or the sidebar's."""
    layers = tuple(choice.setup.layers) if sidebar_layers else ()
    return table1_group([choice.setup.replace(model=m, layers=layers) for m in models], int(combine_top))


def sweep_feature_bytes(choice: Choice, infos: tuple[LayerInfo, ...] | list[LayerInfo],
                        project_dim: int | None) -> int:
    """Float32 features of every layer in `infos` (each projected to at most `project_dim`)
    for the cache items (with flips) and the test items: what a layer sweep holds at once."""
    d = sum(min(i.dim, project_dim) if project_dim else i.dim for i in infos)
    n = choice.setup.train_limit or train_size(choice.setup.dataset, choice.data_dir) or 0
    n = int(n) * (2 if choice.setup.flip else 1) + int(test_size(choice.setup.dataset, choice.data_dir) or 0)
    return d * n * 4


def compare_defaults(choice: Choice) -> tuple[str, str]:
    """Layer A: the first key layer; layer B: the layer of at most 4096 dims farthest from it in depth."""
    infos = [i for i in choice.layer_infos if i.name != "input" and i.name not in OUTPUTS] or list(choice.layer_infos)
    names = [i.name for i in infos]
    a = choice.layers[0] if choice.layers and choice.layers[0] in names else names[-1]
    depth = {i.name: i.depth for i in infos}
    small = [i for i in infos if i.name != a and i.dim <= 4096] or [i for i in infos if i.name != a] or infos
    b = max(small, key=lambda i: abs(i.depth - depth[a])).name
    return a, b


def missing_data_note(choice: Choice) -> str | None:
    """A sentence when the dataset is neither in the data directory nor downloaded before."""
    ds = choice.setup.dataset
    if ds == "digits":
        return None
    local = choice.data_dir / ds
    if (local / "train").is_dir() and (local / "test").is_dir():
        return None
    if any((choice.data_dir / "tensors").glob(f"{ds}-*.safetensors")):  # decoded before (e.g. downloaded)
        return None
    return (
        f"{DATASETS.get(ds, ds)} is not in {local}/{{train,test}}/<class>/; the build will try to download it "
        f"into {choice.data_dir / 'downloads'} — without a network, copy the image-folder tree there first."
    )


def cli_flags(s: Setup) -> str:
    """The command-line options that give `s`'s cache (size, flips), for 'the same numbers as' notes."""
    return (f" --train-limit {s.train_limit}" if s.train_limit else "") + (" --flip" if s.flip else "")


def setup_cli(command: str, s: Setup, layers: bool = True) -> list[str]:
    """The start of the command line that runs `command` on setup `s`: dataset, model, key layers
    (unless the study takes its own), cache limit, protocol and flips — what every page's
    "the same numbers as ..." line shares."""
    parts = [f"python -m cacheviz {command}", f"--dataset {s.dataset}", f"--model {s.model}"]
    if layers and s.layers:
        parts.append(f"--layers {','.join(s.layers)}")
    if s.train_limit:
        parts.append(f"--train-limit {s.train_limit}")
    if s.val_from_train:
        parts.append("--protocol paper")
        if s.val_from_train != PAPER_VAL_ITEMS:
            parts.append(f"--val-from-train {s.val_from_train}")
    elif s.flip:
        parts.append("--flip")
    return parts
