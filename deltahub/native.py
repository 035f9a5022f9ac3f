"""The fused sparse sum in C (``csrc/sparse_sum.c``): merge, weighted float32 sum, add in place, one pass.

Adding deltas with ``sum`` through torch means sorting the union of their positions (``torch.unique``), then
gathering, adding and scattering: about 60 ns per nonzero on this project's CPUs, most of it the sort. Each
delta's positions are already sorted, so a k-way merge needs no sort at all: this kernel walks the k lists once,
sums each position's weighted values in list order and rounds the result into the tensor in place, about 5 ns
per nonzero, with no temporary array of the union. It computes exactly what ``sparse_ops.weighted_sum`` then
``apply.add_in_place`` compute (the tests compare the bits), which remain the reference and the fallback.

The library is built once per machine with the system C compiler (well under a second) into ``kernels/`` of
deltahub's cache (``$DELTAHUB_CACHE``, else ``~/.cache/deltahub``) and called through ``ctypes``. Where no
compiler works, or with ``DELTAHUB_NATIVE=0``, :func:`library` returns None and callers use torch. No torch
here: the streaming merge calls it on numpy arrays without importing torch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._cbuild import build_library, find_compiler

SOURCE = Path(__file__).with_name("csrc") / "sparse_sum.c"
# -ffp-contract=off: a fused multiply-add would round once where torch rounds twice (product, then sum).
FLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
MAX_LISTS = 64  # the kernel's fixed cursor array

# Tensor and value dtype codes of the kernel, by name.
DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built (callers then use torch)."""
    if os.environ.get("DELTAHUB_NATIVE", "1") == "0":
        return None
    compiler = find_compiler()
    if compiler is None:
        return None
    try:
        lib = build_library(SOURCE, compiler, FLAGS, libs=("-lm",))
    except (OSError, subprocess.CalledProcessError):
        return None
    fn = lib.deltahub_sum_apply
    fn.restype = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.deltahub_sum_stream.restype = ctypes.c_int64
    lib.deltahub_sum_stream.argtypes = [
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    lib.deltahub_checksum.restype = ctypes.c_int64
    lib.deltahub_checksum.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_int64,
    ]
    lib.deltahub_scatter.restype = None
    lib.deltahub_scatter.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def _lists(
    lists: Sequence[tuple[int, int, str, int, int, int]], weights: Sequence[float], lo: int, numel: int
) -> tuple[int, Any, Any, Any, Any, Any]:
    """The kernel's list arguments as ctypes arrays, after checking every list's positions lie in [lo, numel)."""
    k = len(lists)
    if not 0 < k <= MAX_LISTS:
        raise ValueError(f"the native sum takes 1 to {MAX_LISTS} lists; got {k}")
    for _, _, _, count, first, last in lists:
        if count and not (lo <= first <= last < numel):
            raise ValueError(f"positions [{first}, {last}] outside elements [{lo}, {numel}) of the tensor")
    return (
        k,
        (ctypes.c_void_p * k)(*(p for p, *_ in lists)),
        (ctypes.c_void_p * k)(*(v for _, v, *_ in lists)),
        (ctypes.c_int32 * k)(*(DTYPES[d] for _, _, d, *_ in lists)),
        (ctypes.c_int64 * k)(*(c for *_, c, _, _ in lists)),
        (ctypes.c_float * k)(*(float(x) for x in weights)),
    )


def sum_apply(
    lib: ctypes.CDLL,
    tensor: int,
    dtype: str,
    numel: int,
    lists: Sequence[tuple[int, int, str, int, int, int]],
    weights: Sequence[float],
    *,
    wide: bool,
    zero_start: bool,
    originals: Sequence[int] | None,
    lo: int = 0,
) -> tuple[int, int, int]:
    """Add ``sum_i weights[i] * list_i`` to the contiguous tensor at address ``tensor`` in place.

    Args:
        lib: :func:`library`'s result.
        tensor, dtype, numel: the tensor's data address, dtype name and element count.
        lists: per input ``(positions address, values address, values dtype name, count, first, last)``;
            positions strictly increasing (int64 when ``wide``, else int32); ``first``/``last`` are the first
            and last positions, checked against ``numel`` here so the C code can trust them.
        weights: one per list (rounded to float32, as torch's ``alpha`` is).
        zero_start: False only for combine's shortcut (one delta of weight 1: its values are the sums).
        originals: per list, where to write the tensor's elements at its positions before the change, or None.
        lo: ``tensor`` holds elements ``[lo, numel)`` only (one chunk of a larger tensor): positions must lie
            there.

    Returns:
        ``(union positions, checksum of the new elements, sums that overflowed float32)``; with overflowed sums
        the tensor holds infinities there, and the caller restores it from ``originals``.
    """
    k, ptrs, vals, vdtypes, counts, w = _lists(lists, weights, lo, numel)
    orig = None if originals is None else (ctypes.c_void_p * k)(*originals)
    checksum, nonfinite = ctypes.c_int64(0), ctypes.c_int64(0)
    unions = lib.deltahub_sum_apply(
        k, ptrs, int(wide), vals, vdtypes, counts, w, int(zero_start), tensor - lo * ITEMSIZE[dtype], DTYPES[dtype], orig,
        ctypes.byref(checksum), ctypes.byref(nonfinite),
    )  # fmt: skip
    if unions < 0:
        raise RuntimeError("the native sum refused its arguments")
    return unions, checksum.value, nonfinite.value


def sum_stream(
    lib: ctypes.CDLL,
    dtype: str,
    numel: int,
    src: tuple[int, int],
    dst: tuple[int, int],
    lists: Sequence[tuple[int, int, str, int, int, int]],
    weights: Sequence[float],
    *,
    wide: bool,
    zero_start: bool,
    buffer: tuple[int, int],
) -> int:
    """:func:`sum_apply` on a tensor that is in a file, streamed: the ``numel`` elements at ``src = (fd, byte
    offset)`` are written to ``dst = (fd, byte offset)`` with the sum added, through ``buffer = (address,
    bytes)``, one chunk at a time (read, add the entries that fall in it, write), without the GIL. ``lists`` as
    for :func:`sum_apply`. Returns the number of sums that overflowed float32. Raises OSError for a failed read
    or write, EOFError when the source ends early."""
    k, ptrs, vals, vdtypes, counts, w = _lists(lists, weights, 0, numel)
    nonfinite = ctypes.c_int64(0)
    rc = lib.deltahub_sum_stream(
        k, ptrs, int(wide), vals, vdtypes, counts, w, int(zero_start), DTYPES[dtype], src[0], src[1], dst[0],
        dst[1], numel, buffer[0], buffer[1], ctypes.byref(nonfinite),
    )  # fmt: skip
    if rc == -1:
        raise EOFError("the source ended early")
    if rc == -2:
        raise RuntimeError("the native sum refused its arguments")
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return nonfinite.value


def checksum(lib: ctypes.CDLL, tensor: int, itemsize: int, positions: int, wide: bool, count: int) -> int:
    """``sum_j bits(tensor[positions[j]]) * (positions[j] + 1)`` (64-bit wrap-around), as ``sum_apply`` returns
    it; positions already checked against the tensor by the ``sum_apply`` that produced them."""
    return lib.deltahub_checksum(tensor, itemsize, positions, int(wide), count)


def scatter(
    lib: ctypes.CDLL, tensor: int, itemsize: int, positions: int, wide: bool, count: int, values: int
) -> None:
    """``tensor[positions[j]] = values[j]`` for raw elements of ``itemsize`` bytes."""
    lib.deltahub_scatter(tensor, itemsize, positions, int(wide), count, values)
