"""Progress reporting: one callback type for inner loops, one reporter type for staged studies.

Inner loops (decoding, extraction, training, the grid) call `ProgressFn(done, total, detail)`.
A study announces its stages by name with `Reporter.stage(name)`, names taken from `Stage`,
and passes `reporter.step` to the loops inside each stage. Front ends implement `Reporter`
(the CLI a terminal line, the app a job on the job board); nobody parses stage names back out
of messages.
"""
from __future__ import annotations

from typing import Callable, Protocol

ProgressFn = Callable[[int, int, str], None]


class Stage:
    """The stage names studies announce (front ends list them before they start)."""

    LOAD = "load data"
    TRAIN_FEATURES = "extract train features"
    TEST_FEATURES = "extract test features"
    TUNE = "grid search"
    TEST = "test"
    LAYERS = "layers"
    SIZES = "cache sizes"
    KEY_SETS = "key sets"
    CACHE_MODEL = "the cache model (theta, lam)"
    SOURCE = "the source network"
    ATTACK = "attack"
    SHOW = "show the images to every model"
    WAITING = "waiting for the same work started elsewhere"


class Reporter(Protocol):
    def stage(self, name: str) -> None:
        """A new stage begins (the previous one, if any, is finished)."""

    def step(self, done: int, total: int, detail: str = "") -> None:
        """Progress inside the current stage."""


class Silent:
    """A reporter that reports nothing."""

    def stage(self, name: str) -> None:
        pass

    def step(self, done: int, total: int, detail: str = "") -> None:
        pass


class Prefixed:
    """Stages of one part of a larger job, named `"{label} · {stage}"` (several models in one job)."""

    def __init__(self, inner: Reporter, label: str):
        self.inner, self.label = inner, label

    def stage(self, name: str) -> None:
        self.inner.stage(prefixed(self.label, name))

    def step(self, done: int, total: int, detail: str = "") -> None:
        self.inner.step(done, total, detail)


def prefixed(label: str, stage: str) -> str:
    return f"{label} · {stage}" if label else stage


def reporter(progress: Reporter | ProgressFn | None) -> Reporter:
    """Accept a reporter, a bare `ProgressFn` (stages arrive as `(0, 1, name)` ticks) or None."""
    if progress is None:
        return Silent()
    if hasattr(progress, "stage") and hasattr(progress, "step"):
        return progress  # type: ignore[return-value]
    return _FromFn(progress)  # type: ignore[arg-type]


class _FromFn:
    def __init__(self, fn: ProgressFn):
        self.fn = fn
        self.current = ""

    def stage(self, name: str) -> None:
        self.current = name
        self.fn(0, 1, name)

    def step(self, done: int, total: int, detail: str = "") -> None:
        self.fn(done, total, f"{self.current}: {detail}" if detail else self.current)
