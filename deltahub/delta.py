"""``SparseDelta``: the one in-memory type every stage of deltahub passes around.

A delta is, per touched parameter of a base model (keyed by its state-dict name), a set of flat row-major
positions and the offsets to add there. This module is pure tensor code: no files, no models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._dtypes import BASE_DTYPES, VALUE_DTYPES, dtype_name, index_dtype_for
from .errors import ArgumentTypeError, BaseMismatchError, InvalidArgumentError
from .fingerprint import samples_match
from .sparse_ops import weighted_sum


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True, eq=False)
class ParamDelta:
    """The change to one parameter: ``W.view(-1)[indices] += values``.

    Attributes:
        indices: 1-D, strictly increasing flat positions in ``[0, numel)``; int32 (int64 for 2**31+ elements).
        values: 1-D float32/bfloat16/float16, same length as ``indices``.
        shape: the base parameter's shape.
        dtype: the base parameter's dtype (the delta is rounded into it once, when applied).
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        problems = _param_problems(self.indices, self.values, shape, self.dtype)
        if problems:
            raise InvalidArgumentError("invalid ParamDelta: " + "; ".join(problems))
        want = index_dtype_for(_numel(shape))
        if self.indices.dtype != want:
            object.__setattr__(self, "indices", self.indices.to(want))

    @classmethod
    def _trusted(
        cls, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> ParamDelta:
        """Build without the O(nnz) checks, for results deltahub itself computed from valid inputs."""
        self = object.__new__(cls)
        want = index_dtype_for(_numel(shape))
        object.__setattr__(self, "indices", indices if indices.dtype == want else indices.to(want))
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype", dtype)
        return self

    @classmethod
    def from_dense(cls, diff: torch.Tensor, *, dtype: torch.dtype | None = None) -> ParamDelta:
        """The non-zero entries of a dense difference tensor (values keep ``diff``'s float dtype)."""
        flat = diff.detach().reshape(-1)
        positions = torch.nonzero(flat, as_tuple=True)[0]
        return cls(positions, flat[positions], tuple(diff.shape), dtype or diff.dtype)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    def dense(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The delta as a dense tensor of the parameter's shape (zeros where untouched)."""
        out = torch.zeros(self.numel, dtype=dtype, device=device or self.values.device)
        out[self.indices.to(out.device, torch.int64)] = self.values.to(out.device, dtype)
        return out.view(self.shape)

    def scaled(self, weight: float) -> ParamDelta:
        """``weight * self`` with float32 values."""
        return ParamDelta._trusted(
            self.indices, self.values.to(torch.float32) * float(weight), self.shape, self.dtype
        )

    def with_values_dtype(self, dtype: torch.dtype) -> ParamDelta:
        return ParamDelta._trusted(self.indices, self.values.to(dtype), self.shape, self.dtype)

    def equal(self, other: ParamDelta) -> bool:
        """Bit-exact equality of positions, values (including their dtype), shape and base dtype."""
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and self.values.dtype == other.values.dtype
            and torch.equal(self.indices.to(torch.int64), other.indices.to(torch.int64))
            and torch.equal(self.values.view(-1).cpu(), other.values.view(-1).cpu())
        )

    def __repr__(self) -> str:
        return (
            f"ParamDelta(shape={list(self.shape)}, dtype={dtype_name(self.dtype)}, nnz={self.nnz}, "
            f"density={self.density:.4g}, values_dtype={dtype_name(self.values.dtype)})"
        )


def _param_problems(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> list[str]:
    """What is wrong with one parameter's arrays (empty when valid). Shared with the file reader."""
    problems = []
    if any(s < 0 for s in shape):
        problems.append(f"shape {list(shape)} has a negative dimension")
    if dtype not in BASE_DTYPES.values():
        problems.append(f"base dtype {dtype} is not a floating dtype ({', '.join(BASE_DTYPES)})")
    if indices.dim() != 1 or values.dim() != 1:
        problems.append(
            f"indices and values must be 1-D; got indices of shape {list(indices.shape)} and values of shape "
            f"{list(values.shape)}"
        )
        return problems
    if indices.dtype not in (torch.int32, torch.int64):
        problems.append(f"indices dtype must be int32 or int64; got {dtype_name(indices.dtype)}")
        return problems
    if values.dtype not in VALUE_DTYPES.values():
        problems.append(
            f"values dtype must be one of {', '.join(VALUE_DTYPES)}; got {dtype_name(values.dtype)}"
        )
        return problems
    if indices.numel() != values.numel():
        problems.append(
            f"{indices.numel()} indices but {values.numel()} values; they must have the same length"
        )
        return problems
    numel = _numel(shape)
    if indices.dtype == torch.int32 and numel > 2**31:
        problems.append(f"int32 indices cannot address {numel} elements; use int64")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            problems.append(
                f"indices must lie in [0, {numel}) for shape {list(shape)}; found {lo if lo < 0 else hi}"
            )
        steps = indices[1:].to(torch.int64) - indices[:-1].to(torch.int64)
        if steps.numel() and not bool((steps > 0).all()):
            at = int(torch.nonzero(steps <= 0)[0])
            problems.append(
                f"indices must be strictly increasing (sorted, unique); position {at + 1} holds "
                f"{int(indices[at + 1])} after {int(indices[at])}: sort them and merge duplicates"
            )
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            problems.append(f"{bad} values are NaN or infinite; every value must be finite")
    return problems


class SparseDelta(Mapping[str, ParamDelta]):
    """A sparse change to a base model: a read-only mapping from state-dict names to :class:`ParamDelta`.

    Args:
        params: ``{name: ParamDelta}``; order is kept (it is the order files are written in).
        base_model: the base's Hub id or path, e.g. ``"HuggingFaceTB/SmolLM2-135M"``.
        base_revision: the base's revision (branch, tag or commit), if known.
        fingerprint: ``{name: samples}`` of base values, used by ``apply_deltas`` to refuse a wrong base
            (see :mod:`deltahub.fingerprint`).
        provenance: JSON-serialisable facts about how the delta was made (algorithm, hyper-parameters, steps).
        origin: where it was loaded from (path, repo id, resolved commit); informational.

    Example:
        >>> delta = SparseDelta({"w": ParamDelta(torch.tensor([0, 5]), torch.tensor([0.5, -1.0]), (2, 3), torch.float32)})
        >>> (delta - delta).nnz
        2
    """

    def __init__(
        self,
        params: Mapping[str, ParamDelta] | Iterable[tuple[str, ParamDelta]],
        *,
        base_model: str | None = None,
        base_revision: str | None = None,
        fingerprint: Mapping[str, tuple[float, ...]] | None = None,
        provenance: Mapping[str, Any] | None = None,
        origin: Mapping[str, str] | None = None,
    ):
        self._params: dict[str, ParamDelta] = dict(params.items() if isinstance(params, Mapping) else params)
        for name, p in self._params.items():
            if not isinstance(p, ParamDelta):
                raise ArgumentTypeError(
                    f"SparseDelta params must be ParamDelta objects; {name!r} is {type(p).__name__}"
                )
        self.base_model = base_model
        self.base_revision = base_revision
        self.fingerprint: dict[str, tuple[float, ...]] = {
            k: tuple(v) for k, v in (fingerprint or {}).items() if k in self._params
        }
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.origin: dict[str, str] = dict(origin or {})

    # Mapping protocol: iteration yields parameter names in order.
    def __getitem__(self, name: str) -> ParamDelta:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    @property
    def nnz(self) -> int:
        """Stored entries over all parameters."""
        return sum(p.nnz for p in self._params.values())

    @property
    def numel(self) -> int:
        """Elements of the touched parameters."""
        return sum(p.numel for p in self._params.values())

    @property
    def density(self) -> float:
        """``nnz / numel`` over the touched parameters (not the whole model: a delta does not know it)."""
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def values_dtype(self) -> torch.dtype | None:
        """The values' dtype when all parameters share one, else None."""
        dtypes = {p.values.dtype for p in self._params.values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta of one parameter (for inspection and tests; never needed to apply)."""
        return self._params[name].dense(dtype)

    def _metadata(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "fingerprint": self.fingerprint,
            "origin": self.origin,
        }

    def replace(self, **changes: Any) -> SparseDelta:
        """A copy with some of ``params``, ``base_model``, ``base_revision``, ``fingerprint``, ``provenance``,
        ``origin`` replaced."""
        fields = {"params": self._params, "provenance": self.provenance, **self._metadata()}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ArgumentTypeError(f"unknown SparseDelta fields {sorted(unknown)}; valid: {sorted(fields)}")
        fields.update(changes)
        return SparseDelta(fields.pop("params"), **fields)

    def to(self, values_dtype: torch.dtype) -> SparseDelta:
        """The same delta with values cast to ``values_dtype`` (float32, bfloat16 or float16)."""
        return self.replace(params={n: p.with_values_dtype(values_dtype) for n, p in self._params.items()})

    def scale(self, weight: float) -> SparseDelta:
        """``weight * self`` (float32 values); a negative weight turns adding into subtracting."""
        prov = {"operation": "scale", "weight": float(weight), "input": self.provenance}
        return self.replace(params={n: p.scaled(weight) for n, p in self._params.items()}, provenance=prov)

    def __mul__(self, weight: float) -> SparseDelta:
        return self.scale(weight)

    __rmul__ = __mul__

    def __neg__(self) -> SparseDelta:
        return self.scale(-1.0)

    def __add__(self, other: SparseDelta) -> SparseDelta:
        return add_deltas([self, other], [1.0, 1.0])

    def __sub__(self, other: SparseDelta) -> SparseDelta:
        return add_deltas([self, other], [1.0, -1.0])

    def equal(self, other: SparseDelta) -> bool:
        """Bit-exact equality of every parameter and of the base identity (not provenance or origin)."""
        return (
            list(self) == list(other)
            and all(self[n].equal(other[n]) for n in self)
            and (self.base_model, self.base_revision, self.fingerprint)
            == (other.base_model, other.base_revision, other.fingerprint)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseDelta) and self.equal(other)

    __hash__ = None  # type: ignore[assignment]  # mutable metadata, tensor contents

    def __repr__(self) -> str:
        vd = self.values_dtype
        return (
            f"SparseDelta(params={len(self)}, nnz={self.nnz}, density={self.density:.4g}, "
            f"values_dtype={dtype_name(vd) if vd else 'mixed'}, base_model={self.base_model!r})"
        )


def common_base(deltas: Iterable[SparseDelta], *, force: bool = False) -> dict[str, Any]:
    """The base identity several deltas share: base_model, base_revision and the union of fingerprints.

    Deltas belong to the same base when they agree on what they can see of it: the shape of every parameter
    two of them touch, and the fingerprint samples both recorded for it (compared as
    :func:`deltahub.fingerprint.samples_match` does: exactly in one dtype, within one rounding across dtypes).
    The ``base_model`` strings are information, never the test: ``./models/base``, an HF-cache snapshot path
    and ``alice/tiny-base`` name the same weights when the fingerprints say so. The result names the first
    recorded base that looks like a Hub id (with that delta's revision), else the first recorded one.

    Args:
        deltas: the deltas to combine.
        force: skip the fingerprint comparison (shapes are always compared: a sum of mismatched shapes is
            meaningless).

    Raises:
        BaseMismatchError: naming every parameter whose shape or fingerprint differs between two deltas.
    """
    from .identity import is_hub_id  # lazy: identity imports card, which imports this module

    deltas = list(deltas)
    named = [(d.base_model, d.base_revision) for d in deltas if d.base_model]
    hub_named = [(m, r) for m, r in named if is_hub_id(m)]
    base_model, base_revision = (hub_named or named or [(None, None)])[0]
    fingerprint: dict[str, tuple[float, ...]] = {}
    seen: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}  # name -> shape, base dtype, first delta
    shape_problems, value_problems = [], []
    for i, d in enumerate(deltas):
        for name, p in d.items():
            if name not in seen:
                seen[name] = (p.shape, p.dtype, i)
            elif seen[name][0] != p.shape:
                shape_problems.append(
                    f"{name}: delta {i} has shape {list(p.shape)}, delta {seen[name][2]} has {list(seen[name][0])}"
                )
        for name, samples in d.fingerprint.items():
            if name not in fingerprint:
                fingerprint[name] = samples
                continue
            first_dtype, first = seen[name][1], seen[name][2]
            if not force and not samples_match(fingerprint[name], samples, first_dtype, d[name].dtype):
                value_problems.append(
                    f"{name}: delta {i} was made on base values {[round(s, 6) for s in samples[:3]]}..., "
                    f"delta {first} on {[round(s, 6) for s in fingerprint[name][:3]]}..."
                )
    if shape_problems:
        raise BaseMismatchError(
            "these deltas were made for different models (parameter shapes differ):", shape_problems
        )
    if value_problems:
        raise BaseMismatchError(
            f"these deltas were made on different base weights ({len(value_problems)} parameters differ); "
            "combine deltas of one base, or pass force=True (--force) to combine anyway:",
            value_problems,
        )
    return {"base_model": base_model, "base_revision": base_revision, "fingerprint": fingerprint}


def add_deltas(deltas: list[SparseDelta], weights: list[float]) -> SparseDelta:
    """``sum_i weights[i] * deltas[i]`` as one delta: union of positions, overlapping entries summed in float32."""
    base = common_base(deltas)
    names: dict[str, None] = {}
    for d in deltas:
        names.update(dict.fromkeys(d))
    params = {}
    for name in names:
        pairs = [(d[name], w) for d, w in zip(deltas, weights, strict=True) if name in d]
        first = pairs[0][0]
        idx, vals = weighted_sum([(p.indices, p.values) for p, _ in pairs], [w for _, w in pairs])
        params[name] = ParamDelta._trusted(idx, vals, first.shape, first.dtype)
    prov = {
        "operation": "sum",
        "inputs": [
            {"weight": float(w), "provenance": d.provenance} for d, w in zip(deltas, weights, strict=True)
        ],
    }
    return SparseDelta(params, provenance=prov, **base)
