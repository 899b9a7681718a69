"""The app's words for engine errors: each parameter named by the widget that sets it."""
from __future__ import annotations

from ..errors import CachevizError

# Engine parameter -> the widget (or the place) a user of the app changes it with; None: the
# app has no such control, so a fix that needs it is left out of the sentence.
WIDGETS = {
    "dataset": "Dataset", "model": "Model", "layers": "Key layers", "checkpoint": None, "device": "Device",
    "train_limit": "Cache size", "test_limit": None, "val_from_train": None, "val_fraction": None, "grid": None,
    "project_dim": "Projection dimension D", "batch_size": None, "seed": None, "fractions": "Cache sizes",
    "seeds": "Seeds", "combine_top": "Cache3 candidates", "theta": "θ", "lam": "λ",
    "data_dir": "The data directory (CACHEVIZ_DATA_DIR)",
}


def message(exc: BaseException | str) -> str:
    """One sentence for the user of the app."""
    if isinstance(exc, CachevizError):
        return exc.render(WIDGETS)
    return str(exc)
