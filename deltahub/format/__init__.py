"""The on-disk delta format v1: a folder of index/value safetensors plus ``delta_config.json``.

See ``docs/format.md`` for the specification.
"""

from .reader import load_delta
from .spec import FORMAT_NAME, FORMAT_VERSION, parse_size
from .writer import save_delta

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_delta", "parse_size", "save_delta"]
