"""Frozen, hashable descriptions of an experiment: they key persisted results and app caches."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import CachevizError

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

    def __post_init__(self):
        for name in ("train_limit", "test_limit", "project_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise CachevizError(f"{name.replace('_', '-')} must be a positive whole number; got {v}.")
        if self.val_from_train < 0:
            raise CachevizError(f"val-from-train must be 0 or a positive number of items; got {self.val_from_train}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise CachevizError(f"val-fraction must be between 0 and 1; got {self.val_fraction}.")
        if self.n_theta < 1 or self.n_lam < 1:
            raise CachevizError("The theta x lam grid needs at least one value each; use e.g. --grid 9x9.")
        object.__setattr__(self, "layers", tuple(self.layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Setup":
        return dataclasses.replace(self, **changes)
