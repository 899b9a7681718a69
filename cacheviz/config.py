"""Frozen, hashable descriptions of an experiment: they key persisted results and app caches."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import CachevizError

# A finer theta x lam grid than this is refused: it costs time and tunes nothing more.
MAX_GRID = 101
# Cache3 combines the N best single layers in pairs and triples (6: all of ResNet20's stage 3).
COMBINE_TOP = 6
# Seeds feed torch generators and the projection's seed arithmetic: 31 bits keep both exact.
MAX_SEED = 2**31 - 1
# The grid's theta starts at 10 (the paper's lower end); its top may be raised up to MAX_THETA
# (similarities are at most 1, and exp(theta * (s - max s)) is computed safely at any theta).
MIN_THETA_MAX, MAX_THETA = 10.0, 10000.0
# The author's CIFAR protocol tunes on this many held-out training items (and their flips).
PAPER_VAL_ITEMS = 5000

# The model a dataset gets when none is named.
DEFAULT_MODEL = {"digits": "digits-cnn", "cifar10": "resnet20"}


@dataclass(frozen=True)
class Setup:
    """Everything that determines an `evaluate` result (device and batch size do not)."""

    dataset: str = "digits"
    model: str = "digits-cnn"
    layers: tuple[str, ...] = ()  # empty: the model's default key layers
    checkpoint: str | None = None
    flip: bool = False  # also store horizontal flips of the cache items (the author's code did)
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    val_from_train: int = 0  # > 0: hold out this many training items for tuning (paper's CIFAR protocol)
    val_fraction: float = 0.5  # else: this share of the test set, stratified, is the validation part
    project_dim: int | None = None  # layers wider than this get a seeded random projection
    n_theta: int = 9
    n_lam: int = 9
    theta_max: float = 90.0  # the grid's theta runs from 10 to this (the paper: 90)
    val_flips: bool = False  # with val_from_train and flip: the held-out items' flips are queried too

    def __post_init__(self):
        for name in ("train_limit", "test_limit", "project_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise CachevizError("give a positive whole number", "leave it unset", param=name, value=v)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise CachevizError(f"give a whole number from 0 to {MAX_SEED}", param="seed", value=self.seed)
        if not isinstance(self.val_from_train, int) or self.val_from_train < 0:
            raise CachevizError("give 0 or a positive number of training items", param="val_from_train",
                                value=self.val_from_train)
        if not 0.0 < self.val_fraction < 1.0:
            raise CachevizError("give a share strictly between 0 and 1", param="val_fraction", value=self.val_fraction)
        if not (1 <= self.n_theta <= MAX_GRID and 1 <= self.n_lam <= MAX_GRID):
            raise CachevizError(f"give 1 to {MAX_GRID} values of theta and of lam", "use e.g. 9x9 (the author used 33x33)",
                                param="grid", value=f"{self.n_theta}x{self.n_lam}")
        # NaN fails the comparison too
        if isinstance(self.theta_max, bool) or not isinstance(self.theta_max, (int, float)) or \
                not MIN_THETA_MAX < self.theta_max <= MAX_THETA:
            raise CachevizError(f"give a largest theta above {MIN_THETA_MAX:g} and at most {MAX_THETA:g}",
                                "use e.g. 180 to look past the paper's 90", param="theta_max", value=self.theta_max)
        object.__setattr__(self, "theta_max", float(self.theta_max))
        if self.val_flips and not (self.flip and self.val_from_train):
            raise CachevizError("querying the held-out items' flips needs held-out training items and flips",
                                "add --val-from-train N and --flip", "or use --protocol paper",
                                param="val_flips", value=True)
        object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def paper_protocol(cls, **fields) -> "Setup":
        """The author's CIFAR protocol: the cache holds every training item and its flip; theta
        and lam are tuned on 5,000 held-out training items and their flips (the other training
        items and flips as the cache) on his 33 x 33 grid; the test-time cache holds them all."""
        fields = {"flip": True, "val_from_train": PAPER_VAL_ITEMS, "val_flips": True, "n_theta": 33, "n_lam": 33,
                  **fields}
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What determines results besides the files read: everything but the checkpoint's path
        (results are keyed by the SHA-256 of the weights themselves, wherever they lie)."""
        d = self.to_dict()
        d.pop("checkpoint")
        return d

    def replace(self, **changes) -> "Setup":
        return dataclasses.replace(self, **changes)
