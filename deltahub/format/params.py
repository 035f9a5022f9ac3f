"""One delta file's tensors: reading them (bounded by the checked header, verified against the SHA-256 digests its
header records) and checking and decoding one parameter's tensors into a :class:`RawParam`. The folder-level
checks (config, index, which file holds what) are :mod:`deltahub.format.reader`'s."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._dtypes import VALUE_DTYPE_NAMES
from . import encoding
from .config import RESAVE, ParamSpec
from .header import Header, TensorEntry, parse_json
from .spec import (
    BITMAP,
    CHECKSUM_KEY,
    DENSE,
    ESCAPES,
    GAPS,
    INDICES,
    STORAGE_BITMAP,
    STORAGE_DENSE,
    STORAGE_GAPS,
    STORAGE_PARTS,
    STORAGE_SPARSE,
    VALUE_CODES,
    VALUES,
)
from .untrusted import open_regular, preview

# Safetensors codes as little-endian numpy dtypes; bfloat16 values stay raw uint16 bits (numpy has no bfloat16).
_NUMPY = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
}


@dataclass
class RawParam:
    """One parameter as read and checked: positions and raw values, no torch.

    Attributes:
        positions: sorted unique flat positions, int32 (int64 from 2**31 elements).
        values: the stored values, float32/float16, or the raw uint16 bits of bfloat16 values.
        values_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        shape: the base parameter's shape.
        dtype: the base parameter's dtype name.
        storage: how the file stored it (``sparse``, ``gaps``, ``bitmap`` or ``dense``).
    """

    positions: np.ndarray
    values: np.ndarray
    values_dtype: str
    shape: tuple[int, ...]
    dtype: str
    storage: str

    @property
    def nnz(self) -> int:
        return int(self.positions.size)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def checksums(header: Header, label: str, problems: list[str]) -> dict[str, str] | None:
    """The header's per-tensor SHA-256 digests (``spec.CHECKSUM_KEY``), or None where the writer recorded none
    (format 1.0, other writers). When present they must name exactly the file's tensors."""
    text = header.metadata.get(CHECKSUM_KEY)
    if text is None:
        return None
    bad = f"{label}: header metadata {CHECKSUM_KEY!r} must be a JSON object mapping each tensor to 64 hex digits"
    try:
        digests = parse_json(text)
    except (ValueError, RecursionError):
        problems.append(f"{bad}; it is not valid JSON: {RESAVE}")
        return None
    if not isinstance(digests, dict) or not all(
        isinstance(v, str) and _SHA256.fullmatch(v) for v in digests.values()
    ):
        problems.append(f"{bad}; {RESAVE}")
        return None
    if set(digests) != set(header.tensors):
        missing, extra = (
            sorted(set(header.tensors) - set(digests)),
            sorted(set(digests) - set(header.tensors)),
        )
        said = "; ".join(
            f"{what} {preview(names[:3])}{' and more' if len(names) > 3 else ''}"
            for what, names in (("none for", missing), ("digests of absent tensors", extra))
            if names
        )
        problems.append(
            f"{label}: header metadata {CHECKSUM_KEY!r} does not match the tensors ({said}); {RESAVE}"
        )
        return None
    return digests


class TensorFile:
    """An open tensor file whose header passed :func:`read_header`: reads one tensor's bytes at a time."""

    def __init__(self, path: Path, header: Header, label: str):
        self.label = label
        self.header = header
        self._fd = open_regular(path)  # not os.open alone: a FIFO swapped in since the header was read blocks
        self._data_start = header.data_start
        self._digests = checksums(header, label, [])  # checked (and reported) by _header_agrees already

    def read(self, key: str) -> np.ndarray | str:
        """The tensor as a 1-D numpy array (reshape with :meth:`shape`), or why it could not be read."""
        entry: TensorEntry = self.header.tensors[key]
        out = np.empty(math.prod(entry.shape), dtype=_NUMPY[entry.dtype])
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self._fd, [view[done:]], self._data_start + entry.begin + done)
            except OSError as e:
                return f"tensor {key!r} cannot be read ({e.strerror or e}); re-download or {RESAVE}"
            if got == 0:
                return f"file shrank while tensor {key!r} was read; re-download or {RESAVE}"
            done += got
        if self._digests is not None and hashlib.sha256(view).hexdigest() != self._digests[key]:
            return (
                f"tensor {key!r} does not match the SHA-256 its writer recorded: the file was damaged or altered "
                f"after it was saved; re-download it or {RESAVE}"
            )
        return out

    def code(self, key: str) -> str:
        return self.header.tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header.tensors[key].shape

    def close(self) -> None:
        os.close(self._fd)


def _dims(file: TensorFile, keys: list[str]) -> str | None:
    if all(len(file.shape(k)) == 1 for k in keys):
        return None
    shapes = " and ".join(f"{k.rsplit('.', 1)[1]} of shape {list(file.shape(k))}" for k in keys)
    return f"{', '.join(k.rsplit('.', 1)[1] for k in keys)} must be 1-D; got {shapes}"


def _values_code(file: TensorFile, key: str, what: str = "values") -> str | None:
    code = file.code(key)
    if code in VALUE_CODES:
        return None
    return f"{what} dtype must be one of {', '.join(VALUE_DTYPE_NAMES)}; got {_code_name(code)}"


def _code_name(code: str) -> str:
    return {**VALUE_CODES, "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16"}.get(code, code)


def read_param(
    file: TensorFile, name: str, storage: str, spec: ParamSpec, where: str
) -> tuple[RawParam | None, list[str]]:
    """Check one parameter's tensors (dtypes and lengths from the header first, then contents) and decode it."""
    numel = math.prod(spec.shape)
    keys = [name + s for s in STORAGE_PARTS[storage]]
    if storage == STORAGE_DENSE:
        bad = _values_code(file, keys[0], "dense values")
        if bad is None and file.shape(keys[0]) != spec.shape:
            bad = (
                f"dense tensor has shape {list(file.shape(keys[0]))} but the parameter's declared shape is "
                f"{list(spec.shape)}"
            )
        if bad:
            return None, [bad]
    else:
        bad = _dims(file, keys)
        if bad:
            return None, [bad]
        first, values = keys[0], name + VALUES
        want = {STORAGE_SPARSE: ("I32", "I64"), STORAGE_GAPS: ("U8", "U16"), STORAGE_BITMAP: ("U8",)}[storage]
        what = {STORAGE_SPARSE: "indices", STORAGE_GAPS: "gaps", STORAGE_BITMAP: "bitmap"}[storage]
        if file.code(first) not in want:
            names = " or ".join(_code_name(c) for c in want)
            return None, [f"{what} dtype must be {names}; got {_code_name(file.code(first))}"]
        if storage == STORAGE_GAPS and file.code(name + ESCAPES) not in ("I32", "I64"):
            return None, [
                f"escapes dtype must be int32 or int64; got {_code_name(file.code(name + ESCAPES))}"
            ]
        bad = _values_code(file, values)
        if bad:
            return None, [bad]
        count = file.shape(values)[0]
        if storage != STORAGE_BITMAP and file.shape(first)[0] != count:
            return None, [f"{file.shape(first)[0]} {what} but {count} values; they must have the same length"]
        if count != spec.nnz:
            return None, [f"{where} says nnz {spec.nnz} but the file holds {count} entries"]
    arrays = {}
    for key in keys:
        arr = file.read(key)
        if isinstance(arr, str):
            return None, [arr]
        arrays[key[len(name) :]] = arr
    values_key = DENSE if storage == STORAGE_DENSE else VALUES
    values, code = arrays[values_key], file.code(name + values_key)
    if storage == STORAGE_SPARSE:
        problems = encoding.sparse_problems(arrays[INDICES], spec.shape)
        positions = None if problems else arrays[INDICES].astype(encoding.index_dtype(numel), copy=False)
    elif storage == STORAGE_GAPS:
        problems = encoding.gaps_problems(arrays[GAPS], file.code(name + GAPS), arrays[ESCAPES], numel)
        positions = None if problems else encoding.decode_gaps(arrays[GAPS], arrays[ESCAPES], numel)
    elif storage == STORAGE_BITMAP:
        problems = encoding.bitmap_problems(arrays[BITMAP], numel, values.size)
        positions = None if problems else encoding.decode_bitmap(arrays[BITMAP], numel, values.size)
    else:
        problems, positions = [], None
    problems = problems + encoding.values_problems(values, code)
    if problems:
        return None, problems
    if positions is None:  # dense: checked, so build the positions only now
        positions = encoding.dense_positions(numel)
    return RawParam(positions, values, VALUE_CODES[code], spec.shape, spec.dtype, storage), []
