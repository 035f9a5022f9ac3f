"""Writing a :class:`~deltahub.SparseDelta` as a format-1.1 folder (see ``docs/format.md``)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._atomic import atomic_folder, check_output
from .._dtypes import dtype_name
from ..errors import ArgumentTypeError, InvalidArgumentError
from . import encoding
from .config import build_config, config_text, dumps
from .spec import (
    BITMAP,
    CARD_FILE,
    CHECKSUM_KEY,
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_SIZE,
    DENSE,
    ESCAPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    GAPS,
    INDEX_FILE,
    INDICES,
    SINGLE_FILE,
    ST_ITEMSIZE,
    STORAGE_BITMAP,
    STORAGE_DENSE,
    STORAGE_GAPS,
    VALUES,
    parse_size,
    shard_name,
)

# torch is imported by the functions that need it: format.__init__ and the fast merge import this package.
if TYPE_CHECKING:
    import torch

    from ..delta import ParamDelta, SparseDelta

_VALUE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class _Encoded:
    """One parameter as it will be written: its storage and its tensors ``{suffix: (code, shape, array)}``."""

    storage: str
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]
    values_dtype: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, _, a in self.tensors.values())


def _raw(values: torch.Tensor) -> np.ndarray:
    import torch

    values = values.detach().cpu().contiguous().reshape(-1)
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)  # numpy has no bfloat16: keep the bits
    return values.numpy()


def _encode(name: str, p: ParamDelta, values_dtype: torch.dtype | None) -> _Encoded:
    import torch

    values = p.values if values_dtype is None else p.values.to(values_dtype)
    if values_dtype is not None and not bool(torch.isfinite(values).all()):
        biggest = float(p.values.abs().max())
        raise InvalidArgumentError(
            f"values of {name} do not fit {dtype_name(values_dtype)} (largest magnitude {biggest:.4g}); keep "
            "their own dtype (values_dtype=None) or choose a wider one"
        )
    code = _VALUE_CODES[dtype_name(values.dtype)]
    raw = _raw(values)
    numel = p.numel
    positions = p.indices.detach().cpu().numpy()
    storage, main = encoding.choose_storage(positions, numel)
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]
    if storage == STORAGE_DENSE:
        tensors = {DENSE: (code, p.shape, raw)}
    elif storage == STORAGE_GAPS:
        gaps, escapes = encoding.encode_gaps(positions, numel, main)
        tensors = {
            GAPS: (main, gaps.shape, gaps),
            ESCAPES: (encoding.index_code(numel), escapes.shape, escapes),
            VALUES: (code, raw.shape, raw),
        }
    elif storage == STORAGE_BITMAP:
        bitmap = encoding.encode_bitmap(positions, numel)
        tensors = {BITMAP: ("U8", bitmap.shape, bitmap), VALUES: (code, raw.shape, raw)}
    else:
        indices = positions.astype(encoding.index_dtype(numel), copy=False)
        tensors = {INDICES: (main, indices.shape, indices), VALUES: (code, raw.shape, raw)}
    return _Encoded(storage, tensors, dtype_name(values.dtype))


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Parameter names per shard: in order, greedily filled up to ``max_bytes`` of tensor data.

    A parameter never straddles shards; one larger than ``max_bytes`` gets a shard of its own.
    """
    if sum(sizes.values()) <= max_bytes:
        return [list(sizes)]
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    return shards


def write_safetensors(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]], metadata: dict[str, str]
) -> int:
    """A standard safetensors file of raw little-endian arrays; returns the bytes of tensor data.

    Written directly rather than through ``safetensors``: numpy has no bfloat16 (its values travel as raw
    uint16 bits under the ``BF16`` code), and the file then honours the umask like any file the user creates.
    Wider items come first (stable), so every tensor starts at a multiple of its item size, as safetensors'
    own writer guarantees. ``metadata`` gains each tensor's SHA-256 under ``spec.CHECKSUM_KEY``.
    """
    order = sorted(tensors, key=lambda k: -ST_ITEMSIZE[tensors[k][0]])
    arrays = {key: np.ascontiguousarray(tensors[key][2]) for key in order}
    digests = {key: hashlib.sha256(memoryview(arrays[key]).cast("B")).hexdigest() for key in order}
    header: dict[str, object] = {
        "__metadata__": {**metadata, CHECKSUM_KEY: json.dumps(digests, separators=(",", ":"))}
    }
    offset = 0
    for key in order:
        code, shape, _ = tensors[key]
        nbytes = arrays[key].nbytes
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            if arrays[key].nbytes:
                f.write(memoryview(arrays[key]).cast("B"))
    return offset


def _write_files(delta: SparseDelta, folder: Path, max_bytes: int, values_dtype: torch.dtype | None) -> None:
    encoded = {name: _encode(name, p, values_dtype) for name, p in delta.items()}
    storages = {n: e.storage for n, e in encoded.items()}
    value_names = {n: e.values_dtype for n, e in encoded.items()}
    shards = plan_shards({n: e.nbytes for n, e in encoded.items()}, max_bytes)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, names in enumerate(shards, start=1):
        fname = SINGLE_FILE if len(shards) == 1 else shard_name(i, len(shards))
        tensors = {name + suffix: t for name in names for suffix, t in encoded[name].tensors.items()}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "delta_config": dumps(build_config(delta, storages, value_names, names), separators=(",", ":")),
        }
        total_size += write_safetensors(folder / fname, tensors, metadata)
        weight_map.update(dict.fromkeys(tensors, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(dumps(index, indent=2) + "\n", encoding="utf-8")
    config = config_text(build_config(delta, storages, value_names))
    (folder / CONFIG_FILE).write_text(config, encoding="utf-8")
    from ..card import model_card

    (folder / CARD_FILE).write_text(model_card(delta), encoding="utf-8")


def save_delta(
    delta: SparseDelta,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    values_dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``delta`` as a format-1.1 folder at ``path``, atomically.

    The files are written into a hidden sibling folder and renamed into place at the end, so an interrupted
    save never leaves anything that looks like a finished delta. Each parameter's positions are stored in the
    smallest of the format's storages (``docs/format.md``): about 1.3 bytes per position at 1% density.

    Args:
        delta: the delta to save.
        path: the folder to create.
        max_shard_size: bytes per file before sharding: an int or a string like ``"500MB"`` or ``"2GiB"``.
        overwrite: replace an existing non-empty ``path``.
        values_dtype: store the values in this dtype (``"bfloat16"``, ``"float16"``, ``"float32"``) instead of
            their own: bfloat16 halves the bytes of float32 values at the cost of one extra rounding of each
            value (relative error at most 2**-8; see ``docs/format.md`` for what that does to applied weights).
            Default None: exact.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DeltaExistsError: ``path`` exists, is not empty, and ``overwrite`` is False.
        ValueError: a bad ``max_shard_size`` or ``values_dtype``, values that overflow ``values_dtype``, or
            provenance that is not JSON.

    Example:
        >>> save_delta(delta, "out/my-delta", max_shard_size="2GB")
        PosixPath('out/my-delta')
    """
    from .._dtypes import VALUE_DTYPES, parse_dtype
    from ..delta import SparseDelta

    if not isinstance(delta, SparseDelta):
        raise ArgumentTypeError(f"save_delta expects a SparseDelta; got {type(delta).__name__}")
    max_bytes = parse_size(max_shard_size)
    cast = (
        None if values_dtype is None else parse_dtype(values_dtype, allowed=VALUE_DTYPES, what="values_dtype")
    )
    target = check_output(path, overwrite=overwrite, keyword="path")
    dumps(delta.provenance)  # provenance that is not JSON fails before anything is created
    with atomic_folder(target, overwrite=overwrite) as tmp:
        _write_files(delta, tmp, max_bytes, cast)
    return target
