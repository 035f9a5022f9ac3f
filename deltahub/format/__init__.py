"""The on-disk delta format v1: a folder of safetensors files plus ``delta_config.json``.

See ``docs/format.md`` for the specification. Reading (``read_delta``) needs no torch; ``load_delta`` and
``save_delta`` import it when first used, so the streaming merge can read deltas without paying for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .reader import load_delta, read_delta
from .spec import FORMAT_NAME, FORMAT_VERSION, parse_size

if TYPE_CHECKING:
    from .writer import save_delta

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_delta", "parse_size", "read_delta", "save_delta"]


def __getattr__(name: str) -> Any:
    if name == "save_delta":
        from .writer import save_delta

        return save_delta
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
