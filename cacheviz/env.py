"""Settings read from environment variables, parsed when they are used rather than at import.

A value read at import breaks every page and command that imports its module, with a
traceback naming neither the variable nor a value that would work. Read here, a bad value
costs one sentence that names both, and only where the setting matters.
"""
from __future__ import annotations

import math
import os

from .errors import CachevizError

FEATURE_BUDGET_VAR = "CACHEVIZ_FEATURE_BUDGET_GB"
FEATURE_BUDGET_DEFAULT_GB = 16


def feature_budget_bytes() -> int:
    """Bytes the stored features may take: $CACHEVIZ_FEATURE_BUDGET_GB gigabytes (default 16)."""
    text = os.environ.get(FEATURE_BUDGET_VAR, "").strip()
    if not text:
        return FEATURE_BUDGET_DEFAULT_GB * 2**30
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb >= 0):
        raise CachevizError(
            f"{FEATURE_BUDGET_VAR}={text!r} is not a number of gigabytes",
            f"set it to one, e.g. {FEATURE_BUDGET_VAR}={FEATURE_BUDGET_DEFAULT_GB}",
            f"unset it for {FEATURE_BUDGET_DEFAULT_GB} GB",
        )
    return int(gb * 2**30)


def check() -> None:
    """Refuse a bad setting before any work (the command line calls this first)."""
    feature_budget_bytes()
