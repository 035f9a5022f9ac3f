"""deltahub's own cache root: where the compiled CPU kernel and the demo's converted model live.

Separate from the Hugging Face cache (``HF_HOME``), which holds pulled deltas and downloaded bases.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DELTAHUB_CACHE"


def cache_dir() -> Path:
    """``$DELTAHUB_CACHE``, else ``~/.cache/deltahub`` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "deltahub")
