"""The overlap report: where several deltas touch the same positions, and where they pull in opposite directions.

Run it before deploying a merge: overlapping positions are where methods differ (``sum`` adds, ``ties`` elects a
sign), and sign conflicts are where a plain sum partly cancels. Sparse throughout: one sort of the concatenated
indices per parameter, never a dense tensor.

Example:
    >>> print(overlap_report([math_delta, code_delta], weights=[1.0, -1.0]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .delta import SparseDelta, common_base
from .sparse_ops import union

if TYPE_CHECKING:
    from .inputs import DeltaInputs, DeltaSource


@dataclass(frozen=True)
class ParamOverlap:
    """Overlap statistics of one parameter.

    Attributes:
        name: the state-dict key.
        numel: the parameter's element count.
        nnz: stored entries per delta, in input order (0 where a delta does not touch the parameter).
        overlap: positions touched by two or more deltas.
        sign_conflicts: overlapping positions whose non-zero weighted values do not all share a sign.
    """

    name: str
    numel: int
    nnz: tuple[int, ...]
    overlap: int
    sign_conflicts: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "numel": self.numel,
            "nnz": list(self.nnz),
            "overlap": self.overlap,
            "sign_conflicts": self.sign_conflicts,
        }


@dataclass(frozen=True)
class OverlapReport:
    """Per-parameter and total overlap of several deltas; ``str()`` is a table, ``to_dict()`` is JSON-able."""

    weights: tuple[float, ...]
    params: tuple[ParamOverlap, ...]
    method: str = "sum"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_deltas(self) -> int:
        return len(self.weights)

    @property
    def nnz(self) -> tuple[int, ...]:
        """Stored entries per delta over all parameters."""
        return tuple(sum(p.nnz[i] for p in self.params) for i in range(self.num_deltas))

    @property
    def overlap(self) -> int:
        return sum(p.overlap for p in self.params)

    @property
    def sign_conflicts(self) -> int:
        return sum(p.sign_conflicts for p in self.params)

    def __getitem__(self, name: str) -> ParamOverlap:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no parameter {name!r} in this overlap report")

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_deltas": self.num_deltas,
            "weights": list(self.weights),
            "method": self.method,
            "options": dict(self.options),
            "params": {p.name: p.to_dict() for p in self.params},
            "totals": {
                "params": len(self.params),
                "params_with_overlap": sum(1 for p in self.params if p.overlap),
                "nnz": list(self.nnz),
                "overlap": self.overlap,
                "sign_conflicts": self.sign_conflicts,
            },
        }

    def __str__(self) -> str:
        return self.table()

    def table(self, *, per_param: bool = True) -> str:
        """The report as text: a row per overlapping parameter (unless ``per_param=False``) and the totals."""
        opts = "".join(f", {k}={v:g}" for k, v in self.options.items())
        how = "" if self.method == "sum" else f", for {self.method}{opts}"
        head = (
            f"overlap of {self.num_deltas} deltas (weights {', '.join(f'{w:g}' for w in self.weights)}{how}) "
            f"over {len(self.params)} parameters"
        )
        if self.overlap == 0:
            return f"{head}: no overlapping positions"
        shown = [p for p in self.params if p.overlap]
        header = [
            "parameter",
            *(f"nnz[{i}]" for i in range(self.num_deltas)),
            "overlap",
            "sign conflicts",
            "conflict %",
        ]
        rows = [
            [
                p.name,
                *map(str, p.nnz),
                str(p.overlap),
                str(p.sign_conflicts),
                f"{100 * p.sign_conflicts / p.overlap:.1f}",
            ]
            for p in shown
        ]
        rows.append(
            [
                f"total ({len(shown)} of {len(self.params)} parameters overlap)",
                *map(str, self.nnz),
                str(self.overlap),
                str(self.sign_conflicts),
                f"{100 * self.sign_conflicts / self.overlap:.1f}",
            ]
        )
        widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

        def line(row: list[str]) -> str:
            # Names left-aligned, numbers right-aligned so digits line up.
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(header))
        body = [*map(line, rows[:-1]), rule] if per_param else []
        return "\n".join([head, line(header), rule, *body, line(rows[-1])])


def _param_overlap(name: str, deltas: Sequence[SparseDelta], weights: Sequence[float]) -> ParamOverlap:
    touching = [(d[name], w) for d, w in zip(deltas, weights, strict=True) if name in d]
    nnz = tuple(d[name].nnz if name in d else 0 for d in deltas)
    numel = touching[0][0].numel
    if len(touching) < 2:
        return ParamOverlap(name, numel, nnz, 0, 0)
    positions, slots = union([p.indices for p, _ in touching])
    slot = torch.cat(slots)
    # Signs, not products: w * v could underflow to 0 and hide a conflict.
    signs = torch.cat(
        [torch.sign(p.values).to(torch.int8) * (1 if w > 0 else -1 if w < 0 else 0) for p, w in touching]
    )
    n = positions.numel()
    touches = torch.bincount(slot, minlength=n)
    positive = torch.bincount(slot[signs > 0], minlength=n)
    negative = torch.bincount(slot[signs < 0], minlength=n)
    overlap = int((touches >= 2).sum())
    conflicts = int(((positive > 0) & (negative > 0)).sum())
    return ParamOverlap(name, numel, nnz, overlap, conflicts)


def overlap_report(
    deltas: Sequence[DeltaSource] | DeltaSource,
    *,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
) -> OverlapReport:
    """How much several deltas overlap, per parameter touched by any of them.

    Args:
        deltas: deltas of the same base (SparseDelta objects, folders, files or Hub ids; checked with
            :func:`deltahub.delta.common_base`).
        weights: one finite weight per delta (default 1 each). Only their signs matter: a negative weight flips
            the delta's signs, so subtracting an identical delta shows as a conflict. A zero weight still
            touches positions but has no sign.
        method, method_options: the combination the report is for (validated, and shown in its header): the
            overlap is that of the inputs, which is where the methods differ.
        force: report on deltas whose base fingerprints disagree.

    Returns:
        An OverlapReport with one ParamOverlap per parameter, in first-seen order.
    """
    from .inputs import validate_inputs

    return overlap_inputs(
        validate_inputs(deltas, weights=weights, method=method, method_options=method_options, force=force)
    )


def overlap_inputs(inputs: DeltaInputs) -> OverlapReport:
    """:func:`overlap_report` on inputs already checked by :func:`deltahub.inputs.validate_inputs`."""
    deltas, weights = inputs.deltas, inputs.weights
    common_base(deltas, force=inputs.force)  # overlap between deltas of different bases means nothing
    names: dict[str, None] = {}
    for d in deltas:
        names.update(dict.fromkeys(d))
    return OverlapReport(
        tuple(weights),
        tuple(_param_overlap(name, deltas, weights) for name in names),
        inputs.method,
        dict(inputs.options),
    )
