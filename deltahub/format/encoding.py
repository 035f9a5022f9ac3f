"""How format 1.1 stores a parameter's positions: the storages, their exact sizes, and their checks.

Every function here works on numpy arrays and never imports torch, so the streaming merge can read deltas
without paying for torch's import. Positions are flat row-major, strictly increasing, in ``[0, numel)``.

* ``sparse`` (format 1.0): ``indices``, the positions themselves, int32 (int64 from 2**31 elements).
* ``gaps``: ``gaps[i] = positions[i] - positions[i - 1]`` (with ``positions[-1] = -1``, so every gap is >= 1)
  in uint8 or uint16. A gap too large for that type is stored as 0 (free as a marker, since real gaps are
  >= 1) and its full value goes, in order, into ``escapes`` (int32; int64 from 2**31 elements). At 1% density
  uint8 gaps cost about 1.3 bytes per position.
* ``bitmap``: bit ``j`` of byte ``b`` (least significant first) is set when position ``8 * b + j`` is stored;
  ``ceil(numel / 8)`` bytes, cheaper than any gap list above ~1/8 density.
* ``dense`` (format 1.0): every position, so no position data at all.

Checks never allocate in proportion to a claimed size: they run over the arrays read from the file (whose
sizes the header check already bounded by the file's size), and a bitmap's length is checked against the
declared shape before it is decoded.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

SPARSE, DENSE, GAPS, BITMAP = "sparse", "dense", "gaps", "bitmap"
# The largest gap each gap dtype holds (0 is the escape marker).
GAP_LIMITS = {"U8": 255, "U16": 65535}
INT32_LIMIT = 2**31
# Positions per block when building or decoding a bitmap: bounds the temporary boolean mask at 8 MiB.
_BITMAP_BLOCK = 1 << 23
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def index_code(numel: int) -> str:
    """The safetensors dtype of positions and escapes for a parameter of ``numel`` elements."""
    return "I32" if numel < INT32_LIMIT else "I64"


def index_dtype(numel: int) -> np.dtype:
    return np.dtype(np.int32 if numel < INT32_LIMIT else np.int64)


# ---------------------------------------------------------------------------------------------------------
# Choosing and encoding


def gap_values(positions: np.ndarray) -> np.ndarray:
    """``positions[i] - positions[i - 1]`` with ``positions[-1] = -1``, as int64 (every entry >= 1)."""
    gaps = np.empty(positions.size, dtype=np.int64)
    if positions.size:
        gaps[0] = int(positions[0]) + 1
        np.subtract(positions[1:], positions[:-1], out=gaps[1:], dtype=np.int64)
    return gaps


def storage_sizes(positions: np.ndarray, numel: int) -> dict[tuple[str, str], int]:
    """Bytes of position data each storage would take, keyed by ``(storage, dtype of its main tensor)``."""
    nnz = positions.size
    wide = 4 if numel < INT32_LIMIT else 8
    gaps = gap_values(positions)
    sizes = {(SPARSE, index_code(numel)): nnz * wide}
    for code, limit in GAP_LIMITS.items():
        itemsize = 1 if code == "U8" else 2
        sizes[(GAPS, code)] = nnz * itemsize + int(np.count_nonzero(gaps > limit)) * wide
    sizes[(BITMAP, "U8")] = -(-numel // 8)
    return sizes


def choose_storage(positions: np.ndarray, numel: int) -> tuple[str, str]:
    """The smallest storage for these positions: ``(storage, main tensor dtype)``.

    ``dense`` exactly when every position is stored (its positions would be ``arange(numel)``); otherwise the
    smallest of sparse, gaps (uint8 or uint16) and bitmap, the first of those on a tie (so an empty parameter
    stays ``sparse``, readable by format 1.0).
    """
    if numel > 0 and positions.size == numel:
        return DENSE, ""
    sizes = storage_sizes(positions, numel)
    return min(sizes, key=sizes.__getitem__)  # dicts keep insertion order: ties go to the first


def encode_gaps(positions: np.ndarray, numel: int, code: str) -> tuple[np.ndarray, np.ndarray]:
    """``(gaps, escapes)`` of sorted unique ``positions``, gaps in ``code`` (``"U8"`` or ``"U16"``)."""
    limit = GAP_LIMITS[code]
    gaps = gap_values(positions)
    big = gaps > limit
    escapes = gaps[big].astype(index_dtype(numel))
    gaps[big] = 0
    return gaps.astype(np.uint8 if code == "U8" else np.uint16), escapes


def encode_bitmap(positions: np.ndarray, numel: int) -> np.ndarray:
    """The ``ceil(numel / 8)``-byte bitmap of sorted unique ``positions``, least significant bit first."""
    out = np.zeros(-(-numel // 8), dtype=np.uint8)
    cuts = np.searchsorted(positions, np.arange(0, numel + _BITMAP_BLOCK, _BITMAP_BLOCK))
    for block, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        if lo == hi:
            continue
        start = block * _BITMAP_BLOCK
        mask = np.zeros(min(_BITMAP_BLOCK, numel - start), dtype=bool)
        mask[positions[lo:hi] - start] = True
        packed = np.packbits(mask, bitorder="little")
        out[start // 8 : start // 8 + packed.size] = packed
    return out


# ---------------------------------------------------------------------------------------------------------
# Checking (what a reader does before trusting anything)


def sparse_problems(indices: np.ndarray, shape: tuple[int, ...]) -> list[str]:
    """What is wrong with format-1.0 ``indices`` of a parameter of this shape."""
    numel = math.prod(shape)
    if indices.dtype == np.int32 and numel > INT32_LIMIT:
        return [f"int32 indices cannot address {numel} elements; use int64"]
    if not indices.size:
        return []
    problems = []
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        problems.append(
            f"indices must lie in [0, {numel}) for shape {list(shape)}; found {lo if lo < 0 else hi}"
        )
    steps = np.diff(indices.astype(np.int64, copy=False))
    if steps.size and not bool((steps > 0).all()):
        at = int(np.flatnonzero(steps <= 0)[0])
        problems.append(
            f"indices must be strictly increasing (sorted, unique); position {at + 1} holds "
            f"{int(indices[at + 1])} after {int(indices[at])}: sort them and merge duplicates"
        )
    return problems


def gaps_problems(gaps: np.ndarray, gap_code: str, escapes: np.ndarray, numel: int) -> list[str]:
    """What is wrong with a ``gaps`` storage: escapes matching the markers, large, and every position in range."""
    limit = GAP_LIMITS[gap_code]
    markers = int(np.count_nonzero(gaps == 0))
    if markers != escapes.size:
        return [
            f"{markers} gaps are 0 (the escape marker) but there are {escapes.size} escapes; each marker needs "
            "exactly one escape, in order"
        ]
    problems = []
    if escapes.size:
        lo, hi = int(escapes.min()), int(escapes.max())
        if lo <= limit:
            problems.append(
                f"escape {lo} fits the {gap_code} gaps (at most {limit}); escapes hold only gaps larger than that"
            )
        if hi > numel:
            problems.append(f"escape {hi} exceeds the parameter's {numel} elements")
    if problems:
        return problems
    # The last position is sum(gaps) - 1. Each escape is <= numel here, so an int64 sum cannot overflow unless
    # numel * count is beyond 2**62 (no real parameter): then sum exactly in Python.
    total = int(gaps.sum(dtype=np.int64))
    if escapes.size and numel * escapes.size < 2**62:
        total += int(escapes.sum(dtype=np.int64))
    elif escapes.size:
        total += sum(int(e) for e in escapes.tolist())
    if total > numel:
        return [f"the gaps add up to position {total - 1}, outside the parameter's {numel} elements"]
    return []


def bitmap_problems(bitmap: np.ndarray, numel: int, nnz: int) -> list[str]:
    """What is wrong with a ``bitmap`` storage of a parameter with ``numel`` elements and ``nnz`` entries."""
    want = -(-numel // 8)
    if bitmap.size != want:
        return [
            f"bitmap has {bitmap.size} bytes; a parameter of {numel} elements needs ceil({numel} / 8) = {want}"
        ]
    if numel % 8 and int(bitmap[-1]) >> (numel % 8):
        return [f"bitmap sets bits past the parameter's {numel} elements (in its last byte); they must be 0"]
    count = popcount(bitmap)
    if count != nnz:
        return [f"bitmap marks {count} positions but there are {nnz} values"]
    return []


def popcount(bitmap: np.ndarray) -> int:
    total = 0
    for start in range(0, bitmap.size, _BITMAP_BLOCK):
        total += int(_POPCOUNT[bitmap[start : start + _BITMAP_BLOCK]].sum(dtype=np.int64))
    return total


def values_problems(values: np.ndarray, code: str) -> list[str]:
    """Non-finite values (``BF16`` values arrive as their raw uint16 bits: numpy has no bfloat16)."""
    if code == "BF16":
        bad = int(np.count_nonzero((values & 0x7F80) == 0x7F80))
    else:
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return [f"{bad} values are NaN or infinite; every value must be finite"] if bad else []


# ---------------------------------------------------------------------------------------------------------
# Decoding (after the checks above passed)


def decode_gaps(gaps: np.ndarray, escapes: np.ndarray, numel: int) -> np.ndarray:
    """Positions from checked gaps: widen, fill the escapes in, running sum, minus one."""
    dtype = index_dtype(numel)
    positions = gaps.astype(dtype)
    if escapes.size:
        positions[gaps == 0] = escapes
    np.cumsum(positions, out=positions)  # checked: the total is <= numel, which fits dtype
    positions -= 1
    return positions


def decode_bitmap(bitmap: np.ndarray, numel: int, nnz: int) -> np.ndarray:
    """Positions from a checked bitmap, one block of bits at a time."""
    out = np.empty(nnz, dtype=index_dtype(numel))
    done = 0
    step = _BITMAP_BLOCK // 8
    for start in range(0, bitmap.size, step):
        # As bool: flatnonzero over a bool array is several times faster than over the same bytes as uint8.
        bits = np.unpackbits(bitmap[start : start + step], bitorder="little").view(bool)
        found = np.flatnonzero(bits)
        part = out[done : done + found.size]
        part[...] = found
        part += start * 8
        done += found.size
    return out


def dense_positions(numel: int) -> np.ndarray:
    return np.arange(numel, dtype=index_dtype(numel))
