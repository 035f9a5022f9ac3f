"""The one safetensors header parser: validation of a raw header before the file is handed to safetensors.

A safetensors file is ``N`` (8 bytes, little-endian), an ``N``-byte JSON header, then the data region. The
header describes each tensor's dtype, shape and ``[begin, end)`` byte range inside the data region. We check
all of it against the real file size first, so a header that lies about sizes can never make us (or
safetensors) allocate or map memory in proportion to its claims, and every problem is reported in words
instead of a library exception. The delta reader allows the format's dtypes only; the streaming merge reads a
base checkpoint's headers with every safetensors dtype (``dtypes=SAFETENSORS_DTYPES``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .spec import MAX_HEADER_SIZE, ST_DTYPES
from .untrusted import MAX_NAME, MAX_RANK, is_int, open_regular, preview, shape_problem

_REPAIR = "the file is truncated, corrupted or not a safetensors file: re-download it or re-save the delta"
_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it (already checked against the file)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in header order, and ``__metadata__`` (empty when absent)."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int = 0  # absolute file offset of the data region (8 + header length)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are ambiguous (parsers disagree about which one wins), so they are an error, not a choice.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity. Raises ValueError (or RecursionError) on bad input."""
    return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constants)


# A base checkpoint (read by the streaming merge) may hold tensors of any rank a model uses; still bounded, so a
# header of 100,000 dimensions costs a comparison.
MAX_CHECKPOINT_RANK = 32


def read_header(
    path: Path, label: str, *, dtypes: Mapping[str, Any] = ST_DTYPES
) -> tuple[Header | None, list[str]]:
    """Read and validate the header of the safetensors file at ``path``.

    Args:
        path: the file.
        label: how problems name the file (usually its name inside the delta folder).
        dtypes: the safetensors dtype codes allowed (default: a delta's), each mapped to a torch dtype or to a
            ``(torch dtype, item size)`` pair.

    Returns:
        ``(header, [])`` when valid, else ``(None, problems)``.
    """
    try:
        # Not open(path): a FIFO would block forever and /dev/zero would never end; this refuses both.
        with open(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                return None, [f"{label}: {size} bytes is too short for a safetensors file; {_REPAIR}"]
            n = int.from_bytes(prefix, "little")
            if n == 0 or n > size - 8:
                return None, [
                    f"{label}: header length field says {n} bytes but the file has {size - 8} bytes after it; "
                    f"{_REPAIR}"
                ]
            if n > MAX_HEADER_SIZE:
                return None, [
                    f"{label}: header of {n} bytes exceeds the {MAX_HEADER_SIZE}-byte limit; {_REPAIR}"
                ]
            raw = f.read(n)
    except OSError as e:
        return None, [f"{label}: cannot be read ({e.strerror or e}); check the file's permissions"]
    if len(raw) != n:
        return None, [f"{label}: file shrank while being read; {_REPAIR}"]
    try:
        text = raw.decode("utf-8")
        # safetensors requires the header to open with '{' (trailing spaces are its alignment padding).
        if not text.startswith("{"):
            raise ValueError("it does not start with '{'")
        obj = parse_json(text)
    except (ValueError, RecursionError) as e:
        return None, [f"{label}: header is not valid UTF-8 JSON ({str(e)[:200]}); {_REPAIR}"]
    # Starting with '{' and parsing means obj is a dict.
    header, problems = _check_entries(obj, size - 8 - n, label, dtypes)
    return (replace(header, data_start=8 + n) if header else None), problems


def _itemsize(entry: Any) -> int:
    return entry[1] if isinstance(entry, tuple) else entry.itemsize


def _check_entries(
    obj: dict[str, Any], data_len: int, label: str, dtypes: Mapping[str, Any]
) -> tuple[Header | None, list[str]]:
    problems: list[str] = []
    metadata = obj.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append(f"{label}: header '__metadata__' must map strings to strings; {_REPAIR}")
        metadata = {}
    tensors: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        if name == "__metadata__":
            continue
        where = f"{label}: tensor {preview(name, 200)}"
        if len(name) > MAX_NAME:
            problems.append(f"{where}: a name of {len(name)} characters is not a tensor name; {_REPAIR}")
            continue
        if not isinstance(info, dict) or set(info) != _KEYS:
            problems.append(f"{where}: header entry must have exactly the keys {sorted(_KEYS)}; {_REPAIR}")
            continue
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        bad = []
        if not isinstance(dtype, str) or dtype not in dtypes:
            allowed = "F32, BF16, F16 values; I32, I64 indices" if dtypes is ST_DTYPES else ", ".join(dtypes)
            what = "in a delta" if dtypes is ST_DTYPES else "here"
            bad.append(f"dtype {preview(dtype, 20)} is not allowed {what} ({allowed})")
        # Rank and size before any product: a shape of 100,000 dimensions would otherwise cost quadratic time.
        shape_bad = shape_problem(shape, "shape", MAX_RANK if dtypes is ST_DTYPES else MAX_CHECKPOINT_RANK)
        if shape_bad:
            bad.append(shape_bad)
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            bad.append(
                f"data_offsets must be [begin, end] with 0 <= begin <= end, got {preview(offsets, 60)}"
            )
        if bad:
            problems.append(f"{where}: {'; '.join(bad)}; {_REPAIR}")
            continue
        begin, end = offsets
        nbytes = math.prod(shape) * _itemsize(dtypes[dtype])
        if end - begin != nbytes:
            problems.append(
                f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span "
                f"{preview(end - begin, 40)}; "
                f"{_REPAIR}"
            )
        elif end > data_len:
            problems.append(
                f"{where}: data_offsets end at byte {preview(end, 40)} but the data region has only {data_len} "
                f"bytes; {_REPAIR}"
            )
        else:
            tensors[name] = TensorEntry(dtype, tuple(shape), begin, end)
    if problems:
        return None, problems
    # Tensors must tile the data region exactly: overlaps would alias two tensors, gaps hide unchecked bytes.
    covered = 0
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != covered:
            kind = (
                "overlaps the previous tensor" if entry.begin < covered else f"leaves a gap at byte {covered}"
            )
            problems.append(
                f"{label}: tensor {name!r} at bytes [{entry.begin}, {entry.end}) {kind}; {_REPAIR}"
            )
            break
        covered = entry.end
    else:
        if covered != data_len:
            problems.append(
                f"{label}: tensors cover {covered} bytes but the data region has {data_len}; {_REPAIR}"
            )
    if problems:
        return None, problems
    return Header(tensors, dict(metadata)), []
