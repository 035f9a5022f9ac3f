"""Constants of the on-disk delta format v1 (see ``docs/format.md``) and the shard-size parser.

Everything a reader or writer must agree on lives here, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .._dtypes import ST_ITEMSIZES
from ..errors import InvalidArgumentError
from .untrusted import preview

FORMAT_NAME = "deltahub.sparse_delta"
FORMAT_VERSION = "1.1"
# Readers accept any version of this major; a newer major may change the layout and is refused. A newer minor
# version may add storages (1.1 added "gaps" and "bitmap"): a parameter in a storage this reader does not know
# is refused with an upgrade hint, everything else of such a file is still read.
SUPPORTED_MAJOR = 1
SUPPORTED_MINOR = 1

CONFIG_FILE = "delta_config.json"
SINGLE_FILE = "delta.safetensors"
INDEX_FILE = "delta.safetensors.index.json"
CARD_FILE = "README.md"
SHARD_PATTERN = "delta-{index:05d}-of-{total:05d}.safetensors"

INDICES = ".indices"
VALUES = ".values"
DENSE = ".dense"
GAPS = ".gaps"
ESCAPES = ".escapes"
BITMAP = ".bitmap"
SUFFIXES = (INDICES, VALUES, DENSE, GAPS, ESCAPES, BITMAP)

STORAGE_SPARSE = "sparse"
STORAGE_DENSE = "dense"
STORAGE_GAPS = "gaps"
STORAGE_BITMAP = "bitmap"
# The tensors of each storage, and the format minor version that introduced it.
STORAGE_PARTS = {
    STORAGE_SPARSE: (INDICES, VALUES),
    STORAGE_DENSE: (DENSE,),
    STORAGE_GAPS: (GAPS, ESCAPES, VALUES),
    STORAGE_BITMAP: (BITMAP, VALUES),
}
STORAGE_SINCE = {STORAGE_SPARSE: 0, STORAGE_DENSE: 0, STORAGE_GAPS: 1, STORAGE_BITMAP: 1}
STORAGE_HELP = (
    "'.indices' + '.values', '.gaps' + '.escapes' + '.values', '.bitmap' + '.values', or '.dense' alone"
)

FINGERPRINT_METHOD = "samples-v1"
FINGERPRINT_SAMPLES = 8  # per parameter; deltahub.fingerprint.SAMPLES computes them

DEFAULT_MAX_SHARD_SIZE = "5GB"

# The same ceiling safetensors itself enforces; checked before reading the header so a lying length field
# cannot make us allocate more than this (and never more than the file holds).
MAX_HEADER_SIZE = 100_000_000
# Header metadata key of the tensors' SHA-256 digests (a JSON object: tensor key -> 64 hex digits). Optional:
# format 1.1's writer records it and every reader checks it when present, so a flipped bit that leaves positions
# and values in range (and so passes every structural check) is still refused.
CHECKSUM_KEY = "sha256"

# The safetensors dtype codes the format can contain, with their item size (no torch here: the streaming merge
# reads deltas without importing it): a subset of the one table in _dtypes.
ST_ITEMSIZE: dict[str, int] = {
    code: ST_ITEMSIZES[code] for code in ("F32", "BF16", "F16", "I32", "I64", "U8", "U16")
}
# The values' codes and their dtype names.
VALUE_CODES: dict[str, str] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

# Non-finite fingerprint samples are written as these strings because JSON has no NaN or infinity.
NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """A shard size in bytes: an int, or a string with a decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB,
    TiB) unit, case-insensitive. ``"5GB"`` is 5 * 10**9 bytes, ``"2GiB"`` is 2 * 2**30.

    Raises:
        ValueError: for anything else, or a size that is not positive.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InvalidArgumentError(
            f"max_shard_size must be an int (bytes) or a string like '500MB' or '2GiB'; got {size!r}"
        )
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidArgumentError(
                f"max_shard_size {size!r} is not a size; use bytes or a number with one of "
                f"KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '500MB', '2GiB')"
            )
        # Decimal, not float: '1.5GB' must not pick up a binary rounding error.
        value = int(Decimal(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgumentError(f"max_shard_size must be positive; got {size!r}")
    return value


def shard_name(index: int, total: int) -> str:
    """``shard_name(1, 3) == "delta-00001-of-00003.safetensors"`` (``index`` counts from 1)."""
    return SHARD_PATTERN.format(index=index, total=total)


def minor_version(version: str) -> int:
    """The minor number of a checked ``"MAJOR.MINOR"`` string."""
    return int(version.split(".")[1])


def version_problem(fmt: object, version: object, where: str) -> str | None:
    """Why ``(format, format_version)`` read from ``where`` cannot be loaded by this deltahub, or None."""
    if fmt != FORMAT_NAME:
        return (
            f"{where}: 'format' is {preview(fmt, 60)}, not {FORMAT_NAME!r}; this is not a deltahub sparse delta "
            f"(or its config was edited): check the path"
        )
    # At most 6 digits a part: int() of a 5000-digit string raises past Python's 4300-digit limit.
    if not isinstance(version, str) or not re.fullmatch(r"\d{1,6}\.\d{1,6}", version):
        return (
            f"{where}: 'format_version' must be a string 'MAJOR.MINOR' like {FORMAT_VERSION!r}; got "
            f"{preview(version, 60)}"
        )
    major = int(version.split(".")[0])
    if major > SUPPORTED_MAJOR:
        return (
            f"{where}: format_version {version} is newer than this deltahub reads (major {SUPPORTED_MAJOR}); "
            f"upgrade deltahub: pip install -U deltahub"
        )
    if major < SUPPORTED_MAJOR:
        return f"{where}: format_version {version} was never released; re-save the delta with deltahub"
    return None
