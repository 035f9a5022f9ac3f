"""The merge plan: every output tensor with its shard and size, decided from headers before anything is
written."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._dtypes import dtype_name
from ..checkpoint import WEIGHTS_NAME
from ..overlap import OverlapReport
from .base import SHARD_PATTERN, BaseFiles
from .config import MergeConfig

# --------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from and goes, and which delta names change it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # in the output
    nbytes: int  # in the output
    shard: str
    deltas: tuple[str, ...] = ()  # names the deltas use for it (itself, or a tied alias)

    @property
    def touched(self) -> bool:
        return bool(self.deltas)


@dataclass(frozen=True)
class DeltaInfo:
    """One input delta as the plan and the model card describe it."""

    source: str
    revision: str | None
    weight: float
    params: int
    nnz: int


@dataclass
class MergePlan:
    """What a merge will write (``merge(..., dry_run=True)`` returns it without writing anything).

    Attributes:
        base, base_revision: the base model id or path, and its revision when known.
        deltas: per input delta: source, revision, weight, touched parameters, entries.
        method, options: the combination method and its resolved options.
        dtype: the output dtype of floating tensors (None: each keeps the base's).
        tensors: every output tensor in writing order, with its shard.
        shards: ``{file name: bytes of tensor data}`` in order.
        overlap: the overlap report of two or more deltas (sign conflicts included), else None.
        out: the folder to be written.
    """

    base: str
    base_revision: str | None
    deltas: list[DeltaInfo]
    method: str
    options: dict[str, Any]
    dtype: torch.dtype | None
    tensors: list[TensorPlan]
    shards: dict[str, int]
    out: Path
    overlap: OverlapReport | None = None
    config: MergeConfig | None = None  # what reproduces this merge: the merged folder's merge.yaml

    @property
    def total_size(self) -> int:
        return sum(self.shards.values())

    @property
    def touched(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.touched]

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "base_revision": self.base_revision,
            "deltas": [vars(d) for d in self.deltas],
            "method": self.method,
            "options": self.options,
            "dtype": dtype_name(self.dtype) if self.dtype else None,
            "out": str(self.out),
            "total_size": self.total_size,
            "shards": self.shards,
            "touched": [t.name for t in self.touched],
            "tensors": len(self.tensors),
            "overlap": self.overlap.to_dict() if self.overlap else None,
        }

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [
            f"base: {self.base}" + (f" @ {self.base_revision}" if self.base_revision else ""),
            f"method: {self.method}" + (f" ({opts})" if opts else ""),
        ]
        for i, d in enumerate(self.deltas):
            rev = f" @ {d.revision}" if d.revision else ""
            lines.append(
                f"delta {i}: {d.source}{rev}  weight {d.weight:g}  {d.params} parameters, nnz {d.nnz:,}"
            )
        touched = self.touched
        lines.append(f"touched tensors: {len(touched)} of {len(self.tensors)}")
        lines += [f"  {t.name} {list(t.shape)}" for t in touched]
        if self.overlap is not None:
            lines.append(str(self.overlap))
        dtype = dtype_name(self.dtype) if self.dtype else "as the base"
        lines.append(
            f"output: {self.out}  {human(self.total_size)} in {len(self.shards)} file(s), dtype {dtype}"
        )
        return "\n".join(lines)


@dataclass
class MergeResult:
    """What :func:`merge` did: the plan, the folder written (None for a dry run), and the entries changed."""

    plan: MergePlan
    out: Path | None
    nnz: dict[str, int] = field(default_factory=dict)  # combined entries added, per output tensor

    @property
    def dry_run(self) -> bool:
        return self.out is None


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def shard_layout(
    base: BaseFiles, out_dtype: torch.dtype | None, max_bytes: int, users: Mapping[str, list[str]]
) -> tuple[list[TensorPlan], dict[str, int]]:
    """Greedy shards in the base's storage order (reads and writes stay sequential), as transformers cuts them:
    a new shard starts when the next tensor would overflow ``max_bytes``; a bigger tensor gets its own."""
    groups: list[list[tuple[str, torch.dtype, int]]] = [[]]
    used = 0
    for name, s in base.tensors.items():
        dtype = out_dtype if out_dtype is not None and s.dtype.is_floating_point else s.dtype
        nbytes = math.prod(s.shape) * dtype.itemsize
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, nbytes))
        used += nbytes
    total = len(groups)
    tensors, shards = [], {}
    for i, group in enumerate(groups, start=1):
        file = WEIGHTS_NAME if total == 1 else SHARD_PATTERN.format(index=i, total=total)
        # Largest items first (stable): every tensor then starts at a multiple of its item size, as
        # safetensors' own writer guarantees, so readers may view the bytes without copying.
        group.sort(key=lambda item: -item[1].itemsize)
        for name, dtype, nbytes in group:
            shape = base.tensors[name].shape
            tensors.append(TensorPlan(name, shape, dtype, nbytes, file, tuple(users.get(name, ()))))
        shards[file] = sum(item[2] for item in group)
    return tensors, shards
