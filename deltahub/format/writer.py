"""Writing a :class:`~deltahub.SparseDelta` as a format-v1 folder (see ``docs/format.md``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._atomic import atomic_folder, check_output
from .._dtypes import index_dtype_for
from ..card import model_card
from ..delta import ParamDelta, SparseDelta
from ..errors import ArgumentTypeError
from .config import build_config, config_text, dumps, stored_densely
from .spec import (
    CARD_FILE,
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_SIZE,
    DENSE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    INDICES,
    SINGLE_FILE,
    VALUES,
    parse_size,
    shard_name,
)


def _param_tensors(name: str, p: ParamDelta) -> dict[str, torch.Tensor]:
    if stored_densely(p):
        return {name + DENSE: p.values.reshape(p.shape)}
    return {name + INDICES: p.indices.to(index_dtype_for(p.numel)), name + VALUES: p.values}


def _param_bytes(p: ParamDelta) -> int:
    if stored_densely(p):
        return p.numel * p.values.element_size()
    return p.nnz * (torch.empty(0, dtype=index_dtype_for(p.numel)).element_size() + p.values.element_size())


def plan_shards(delta: SparseDelta, max_bytes: int) -> list[list[str]]:
    """Parameter names per shard: in order, greedily filled up to ``max_bytes`` of tensor data.

    A parameter never straddles shards; one larger than ``max_bytes`` gets a shard of its own.
    """
    sizes = {n: _param_bytes(p) for n, p in delta.items()}
    if sum(sizes.values()) <= max_bytes:
        return [list(delta)]
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


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (values sliced from one buffer, say): copy those.
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[key] = t
    return out


def _write_files(delta: SparseDelta, folder: Path, config: str, max_bytes: int) -> None:
    shards = plan_shards(delta, max_bytes)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, names in enumerate(shards, start=1):
        fname = SINGLE_FILE if len(shards) == 1 else shard_name(i, len(shards))
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensors.update(_param_tensors(name, delta[name]))
        tensors = _storable(tensors)
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "delta_config": dumps(build_config(delta, names), separators=(",", ":")),
        }
        save_file(tensors, str(folder / fname), metadata=metadata)
        for key, t in tensors.items():
            weight_map[key] = fname
            total_size += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / CONFIG_FILE).write_text(config, encoding="utf-8")
    (folder / CARD_FILE).write_text(model_card(delta), encoding="utf-8")


def save_delta(
    delta: SparseDelta,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write ``delta`` as a format-v1 folder at ``path``, atomically.

    The files are written into a hidden sibling folder and renamed into place at the end, so an interrupted
    save never leaves anything that looks like a finished delta.

    Args:
        delta: the delta to save; values are written in their own dtype.
        path: the folder to create.
        max_shard_size: bytes per file before sharding: an int or a string like ``"500MB"`` or ``"2GiB"``.
        overwrite: replace an existing non-empty ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DeltaExistsError: ``path`` exists, is not empty, and ``overwrite`` is False.
        ValueError: a bad ``max_shard_size``, or provenance that is not JSON.

    Example:
        >>> save_delta(delta, "out/my-delta", max_shard_size="2GB")
        PosixPath('out/my-delta')
    """
    if not isinstance(delta, SparseDelta):
        raise ArgumentTypeError(f"save_delta expects a SparseDelta; got {type(delta).__name__}")
    max_bytes = parse_size(max_shard_size)
    target = check_output(path, overwrite=overwrite, keyword="path")
    text = config_text(build_config(delta))
    with atomic_folder(target, overwrite=overwrite) as tmp:
        _write_files(delta, tmp, text, max_bytes)
    return target
