"""The app's words for engine errors: each parameter named by the widget that sets it; and what
no browser may see in them (credentials, the server's absolute paths)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CachevizError

from ..kdb import redact

# Engine parameter -> the widget (or the place) a user of the app changes it with; None: the
# app has no such control, so a fix that needs it is left out of the sentence.
WIDGETS = {
    "dataset": "Dataset", "model": "Model", "layers": "Key layers", "checkpoint": None, "device": "Device",
    "train_limit": "Cache size", "test_limit": None, "val_from_train": None, "val_fraction": None, "grid": None,
    "project_dim": "Projection dimension D", "batch_size": None, "seed": None, "fractions": "Cache sizes",
    "seeds": "Seeds", "combine_top": "Cache3 candidates", "theta": "θ", "lam": "λ",
    "data_dir": "The data directory (CACHEVIZ_DATA_DIR)",
}


_MARKDOWN = set("\\`*_{}[]<>()#+-.!|~$:")


def markdown_text(text: str) -> str:
    """`text` shown literally where Streamlit renders Markdown (labels, captions, messages)."""
    return "".join("\\" + c if c in _MARKDOWN else c for c in text)


def upload_name(name: str, most: int = 60) -> str:
    """A user's file name for display: no folders, no control characters, short, Markdown-safe."""
    base = str(name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip() or "upload"
    if len(base) > most:
        base = base[: most - 1] + "…"
    return markdown_text(base)


def _data_dir() -> Path:
    # as state.data_dir (which imports this module): the env on every call, else ./data
    return Path(os.environ.get("CACHEVIZ_DATA_DIR") or "data").expanduser()


def shown(text: str) -> str:
    """`text` as a browser may see it: passwords and the Milvus token masked (kdb.redact), and the
    data directory's absolute path said as "the data directory" -- the app is open to a whole
    class, and a server's layout and credentials are nobody's business there."""
    text = redact(str(text))
    where = _data_dir()
    for root in {str(where.resolve()), str(where.absolute())} - {"/"}:
        text = re.sub(re.escape(root) + r"(?:(/[^\s`'\")]*)|(?![\w-]))",
                      lambda m: f"the data directory's {m.group(1)[1:]}" if m.group(1) and len(m.group(1)) > 1
                      else "the data directory", text)
    return text


def message(exc: BaseException | str) -> str:
    """One sentence for the user of the app, shown as a browser may see it (`shown`)."""
    if isinstance(exc, CachevizError):
        return shown(exc.render(WIDGETS))
    return shown(str(exc))
