"""Applying deltas to a live model or state dict in place, and reverting them exactly.

``W' = W + sum_i w_i * D_i``: the combination is accumulated in float32 at the touched positions, added to the
base values in float32 and rounded once to the parameter's dtype. Only touched positions are read or written
(O(nnz) work and memory), so untouched weights stay bit-identical and hot-swapping deltas costs O(nnz).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import native
from ._tensors import check_tied, storage_key, tied_groups
from .basecheck import BaseView, _TensorsView, check_base, common_base
from .checkpoint import StoredTensor, file_mappings, is_mapped_at, read_elements, stored_tensors
from .delta import ParamDelta, SparseDelta
from .errors import ArgumentTypeError, CheckpointError, InvalidArgumentError, PathNotFoundError, RevertError
from .fingerprint import sample_positions
from .inputs import DeltaInputs, DeltaSource, validate_inputs
from .methods import combine_inputs, combine_param, get_method

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _target_tensors(target: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every name a delta may use for a tensor of ``target``, tied aliases included."""
    if isinstance(target, nn.Module):
        named = dict(target.named_parameters(remove_duplicate=False))
        named.update(target.named_buffers(remove_duplicate=False))
        return {k: v.data if isinstance(v, nn.Parameter) else v for k, v in named.items()}
    if isinstance(target, Mapping):
        return dict(target)
    raise ArgumentTypeError(f"apply_deltas needs an nn.Module or a state dict; got {type(target).__name__}")


@dataclass
class _Saved:
    tensor: torch.Tensor
    # (positions, base values there) pairs: one pair of the union (torch path) or one per input delta (native
    # sum: each delta's own positions, no union array); revert writes every pair back.
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    checksum: int  # of the values written, to notice later changes before reverting


def _checksum(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    # Position-weighted sum of the raw bits: cheap, exact (integer arithmetic wraps deterministically on any
    # device and in any reduction order), and it changes when any written value is overwritten.
    bits = values.contiguous().view(_BITS[values.element_size()]).to(torch.int64)
    return (bits * (indices.to(torch.int64) + 1)).sum()


def _wrap64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


def _native_pairs(t: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the native kernel can read and write ``t`` at these pairs' positions (CPU, contiguous)."""
    return (
        native.library() is not None
        and t.device.type == "cpu"
        and t.is_contiguous()
        and t.element_size() in (2, 4, 8)
        and all(
            i.device.type == "cpu" and i.dtype in (torch.int32, torch.int64) and i.is_contiguous()
            for i, _ in pairs
        )
    )


def _pairs_checksum(t: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    if _native_pairs(t, pairs):
        lib = native.library()
        return _wrap64(
            sum(
                native.checksum(
                    lib, t.data_ptr(), t.element_size(), i.data_ptr(), i.dtype == torch.int64, i.numel()
                )
                for i, _ in pairs
            )
        )
    return _wrap64(sum(int(_checksum(_gather(t, idx), idx)) for idx, _ in pairs))


def _restore(t: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if _native_pairs(t, pairs) and all(o.is_contiguous() and o.dtype == t.dtype for _, o in pairs):
        lib = native.library()
        for i, o in pairs:
            native.scatter(
                lib,
                t.data_ptr(),
                t.element_size(),
                i.data_ptr(),
                i.dtype == torch.int64,
                i.numel(),
                o.data_ptr(),
            )
        return
    for idx, original in pairs:
        _scatter(t, idx, original)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t.view(-1).index_select(0, idx)
    return t[torch.unravel_index(idx.to(torch.int64), t.shape)]


def _scatter(t: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    if t.is_contiguous():
        t.view(-1).index_put_((idx,), values)  # int32 or int64 positions alike
    else:
        t.index_put_(torch.unravel_index(idx.to(torch.int64), t.shape), values)


def add_in_place(t: torch.Tensor, p: ParamDelta, *, revertible: bool = True) -> _Saved | None:
    """``t += p`` at p's positions: float32 sum (float64 for float64 tensors), rounded once to t's dtype.

    The one definition of the arithmetic, shared by load-time application and the streaming merge so both give
    bit-identical weights (the native sum, :func:`add_sum`, computes the same bits). Returns what a revert
    needs, or None with ``revertible=False`` (the merge writes the tensor out and never reverts, so it skips
    the checksum pass).
    """
    idx = p.indices.to(t.device, torch.int64)
    original = _gather(t, idx)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    new = (original.to(acc) + p.values.to(t.device, acc)).to(t.dtype)
    _scatter(t, idx, new)
    return _Saved(t, [(idx, original)], _wrap64(int(_checksum(new, idx)))) if revertible else None


_NATIVE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NATIVE_TENSORS = {**_NATIVE_DTYPES, torch.float64: "float64"}


def add_sum(
    t: torch.Tensor,
    parts: Sequence[tuple[ParamDelta, float]],
    *,
    shortcut: bool,
    revertible: bool = True,
    name: str = "the tensor",
) -> _Saved | None:
    """``t += sum_i w_i * D_i`` for the ``(D_i, w_i)`` touching ``t``: exactly ``combine(method="sum")`` then
    :func:`add_in_place`, in one pass of the native kernel where it applies (CPU, contiguous), else through them.

    ``shortcut`` is combine's own: one delta of weight 1 in the whole call adds its values as they are (no
    ``0 +``, which would turn a stored -0.0 into +0.0). Weights so large that a sum overflows float32 raise
    ValueError as ``combine`` does, with ``t`` unchanged.
    """
    lib = native.library()
    usable = (
        lib is not None
        and t.device.type == "cpu"
        and t.is_contiguous()
        and t.dtype in _NATIVE_TENSORS
        and len(parts) <= native.MAX_LISTS
        and all(p.values.device.type == "cpu" and p.values.dtype in _NATIVE_DTYPES for p, _ in parts)
    )
    if not usable:
        if shortcut:
            change = parts[0][0].with_values_dtype(torch.float32)
        else:
            from .sparse_ops import weighted_sum

            first = parts[0][0]
            idx, vals = weighted_sum([(p.indices, p.values) for p, _ in parts], [w for _, w in parts])
            change = ParamDelta._trusted(idx, vals, first.shape, first.dtype)
        return add_in_place(t, change, revertible=revertible)
    wide = any(p.indices.dtype == torch.int64 for p, _ in parts)
    lists, keep = [], []
    for p, _ in parts:
        idx = p.indices.to(torch.int64 if wide else torch.int32).contiguous()
        vals = p.values.contiguous()
        keep.append((idx, vals))
        first, last = (int(idx[0]), int(idx[-1])) if idx.numel() else (0, 0)
        lists.append((idx.data_ptr(), vals.data_ptr(), _NATIVE_DTYPES[vals.dtype], idx.numel(), first, last))
    # Originals are kept even when not asked for, to undo an overflowing sum.
    originals = [torch.empty(idx.numel(), dtype=t.dtype) for idx, _ in keep]
    _, checksum, overflowed = native.sum_apply(
        lib,
        t.data_ptr(),
        _NATIVE_TENSORS[t.dtype],
        t.numel(),
        lists,
        [w for _, w in parts],
        wide=wide,
        zero_start=not shortcut,
        originals=[o.data_ptr() for o in originals],
    )
    saved = _Saved(t, [(idx, o) for (idx, _), o in zip(keep, originals, strict=True)], checksum)
    if overflowed:
        _restore(t, saved.pairs)
        raise InvalidArgumentError(
            f"combination method 'sum' gave an invalid result for {name}: {overflowed} values are NaN or "
            "infinite (the weighted sum overflows float32); use smaller weights"
        )
    return saved if revertible else None


class AppliedDeltas:
    """What ``apply_deltas`` did, and how to undo it: ``revert()`` restores the base bit-exactly.

    Also a context manager: ``with apply_deltas(model, [d]): ...`` reverts on exit. Handles applied on top of
    each other are reverted in reverse order; a handle whose positions were overwritten since (by a later,
    still-applied delta or by training) refuses to revert rather than silently corrupt the base.

    Attributes:
        deltas: the input deltas; weights, method, options: how they were combined;
        combined: the single SparseDelta that was added (computed again on first access: applying never holds
            the combination of more than one parameter at a time).
    """

    def __init__(self, inputs: DeltaInputs, saved: dict[str, _Saved]):
        self.deltas: list[SparseDelta] = list(inputs.deltas)
        self.weights: list[float] = list(inputs.weights)
        self.method: str = inputs.method
        self.options: dict[str, Any] = dict(inputs.options)
        self._inputs = inputs
        self._saved = saved
        self._combined: SparseDelta | None = None
        self.active = True

    @property
    def combined(self) -> SparseDelta:
        if self._combined is None:
            self._combined = combine_inputs(self._inputs)
        return self._combined

    @property
    def nbytes(self) -> int:
        """Memory held to make the revert exact (original values, and positions not shared with the deltas)."""
        shared = {p.indices.data_ptr() for d in self.deltas for p in d.values()}
        return sum(
            o.nbytes + (0 if i.data_ptr() in shared else i.nbytes)
            for s in self._saved.values()
            for i, o in s.pairs
        )

    def revert(self, *, force: bool = False) -> None:
        """Restore the base values at every touched position.

        Raises RevertError if already reverted, or if touched values changed since applying (revert later
        handles first; ``force=True`` restores the saved originals anyway).
        """
        if not self.active:
            raise RevertError("these deltas were already reverted; apply them again to use them")
        if not force:
            changed = [
                name for name, s in self._saved.items() if _pairs_checksum(s.tensor, s.pairs) != s.checksum
            ]
            if changed:
                raise RevertError(
                    f"{len(changed)} parameters changed since these deltas were applied (e.g. {changed[:3]}): "
                    "revert deltas applied later first (reverse order of applying), or call revert(force=True) "
                    "to write back the saved base values anyway"
                )
        with torch.no_grad():
            for s in self._saved.values():
                _restore(s.tensor, s.pairs)
        self._saved = {}
        self.active = False

    def __enter__(self) -> AppliedDeltas:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return (
            f"AppliedDeltas({len(self.deltas)} deltas, weights={self.weights}, method={self.method!r}, "
            f"parameters={len(self._saved)}, {state})"
        )


def apply_deltas(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    deltas: DeltaSource | Sequence[DeltaSource],
    *,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
) -> AppliedDeltas:
    """Add the combination of ``deltas`` to a model's (or state dict's) tensors in place.

    Args:
        model_or_state_dict: a ``torch.nn.Module`` (any device, any floating dtype) or a ``{name: tensor}`` dict.
        deltas: one or more SparseDelta objects, delta folders or files, or Hub ids ``org/name[@rev]``.
        weights: one per delta (default 1.0); negative subtracts.
        method: a combination method (``deltahub.methods.available_methods()``); ``sum`` is task arithmetic.
        method_options: the method's options, e.g. ``{"density": 0.5}`` for ``ties``.
        force: skip the base fingerprint checks (names and shapes are always checked).

    Returns:
        An :class:`AppliedDeltas` handle; ``handle.revert()`` restores the base bit-exactly.

    Example:
        >>> handle = apply_deltas(model, ["./math-delta", "acme/code-delta@v1"], weights=[1.0, 0.5])
        >>> handle.revert()
    """
    inputs = validate_inputs(
        deltas, weights=weights, method=method, method_options=method_options, force=force
    )
    return apply_inputs(model_or_state_dict, inputs)


def apply_inputs(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    inputs: DeltaInputs,
    own: _Owner | None = None,
) -> AppliedDeltas:
    """:func:`apply_deltas` on inputs already checked by :func:`deltahub.inputs.validate_inputs`. ``own``, when
    given, replaces each touched tensor just before it is changed (load_model reads it from the checkpoint into
    fresh memory), so it is still in the CPU's caches when the deltas are added."""
    delta_list, weight_list = list(inputs.deltas), list(inputs.weights)
    spec, options = get_method(inputs.method), inputs.options
    tensors = _target_tensors(model_or_state_dict)
    check_base(delta_list, tensors if own is None else own.view(tensors), force=inputs.force)
    names = list(dict.fromkeys(n for d in delta_list for n in d))

    def change_of(name: str) -> ParamDelta:
        return combine_param(spec, options, name, delta_list, weight_list)

    # Tied parameters: several names, one tensor. Apply once; two different deltas for one tensor is an error.
    groups = tied_groups((name, tensors[name]) for name in names)
    check_tied(groups, change_of)
    # One parameter at a time: its combined entries exist only while it is being changed.
    shortcut = len(delta_list) == 1 and weight_list[0] == 1.0
    saved: dict[str, _Saved] = {}
    with torch.no_grad():
        try:
            for name, *_ in groups:
                tensor = tensors[name] if own is None else own(tensors[name])
                if spec.name == "sum":
                    parts = [(d[name], w) for d, w in zip(delta_list, weight_list, strict=True) if name in d]
                    saved[name] = add_sum(tensor, parts, shortcut=shortcut, name=name)
                else:
                    saved[name] = add_in_place(tensor, change_of(name))
        except BaseException:
            # All or nothing, as when everything was combined before the first write: undo the tensors done.
            for s in saved.values():
                _restore(s.tensor, s.pairs)
            raise
    return AppliedDeltas(inputs, saved)


class _Owner:
    """Gives the tensors the deltas touch their own memory, one at a time, just before they are changed.

    transformers memory-maps safetensors checkpoints, so a fresh model's weights are copy-on-write views of the
    file. Writing to them faults one page at a time (about 5x slower than copying once), and copying them
    (``clone``) faults every page of the map in, where it stays resident next to the copy: that is what made
    composing cost 1.68x a plain load's peak memory. So a touched tensor that is exactly the file's bytes (it
    sits where the file is mapped, at that tensor's offset: checked in ``/proc/self/maps``, without touching a
    page; even reading a few elements would fault in whole page-cache folios) is read from the checkpoint into
    fresh memory with ``pread`` instead. Any other tensor (a Hub id's cache, a dtype converted or a key renamed
    by ``from_pretrained``, no procfs) is cloned. Only safe in load_model, where nobody else holds references
    to these tensors.
    """

    def __init__(self, model: nn.Module, base: str | os.PathLike):
        stored: dict[str, StoredTensor] = {}
        if isinstance(base, (str, os.PathLike)) and Path(base).is_dir():
            try:
                stored = stored_tensors(base)
            except (CheckpointError, OSError, ValueError):
                stored = {}
        self._mappings = file_mappings() if stored else []
        self._stored = stored
        self._params: dict[object, list[tuple[str, nn.Parameter]]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._params.setdefault(storage_key(param.data) or ("alone", name), []).append((name, param))

    def file_of(self, tensor: torch.Tensor) -> StoredTensor | None:
        """Where ``tensor``'s bytes are in the checkpoint, when it is exactly those bytes, mapped."""
        for name, _ in self._params.get(storage_key(tensor), ()):
            s = self._stored.get(name)
            if (
                s is not None
                and s.nbytes
                and s.dtype == tensor.dtype
                and s.shape == tuple(tensor.shape)
                and tensor.is_contiguous()
                and is_mapped_at(self._mappings, s.path, s.start, tensor.data_ptr())
            ):
                return s
        return None

    def view(self, tensors: Mapping[str, torch.Tensor]) -> BaseView:
        """check_base's view of the model, reading fingerprint samples of mapped tensors with ``pread``: eight
        reads through the map would fault in whole page-cache folios (85 MB over a 100M model, measured)."""
        owner = self

        class View(_TensorsView):
            def samples(self, name: str) -> tuple[float, ...]:
                s = owner.file_of(self._tensors[name])
                if s is None:
                    return super().samples(name)
                positions = sample_positions(name, math.prod(s.shape))
                return tuple(float(v) for v in read_elements(s, positions).to(torch.float32).tolist())

        return View(tensors)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        group = self._params.get(storage_key(tensor))
        if group is None or tensor.device.type != "cpu":
            return tensor  # a buffer, empty, or on an accelerator: written in place as apply_deltas would
        s = self.file_of(tensor)
        owned = s.read() if s is not None else tensor.clone()
        for _, param in group:
            param.data = owned
        return owned


def load_model(
    base: str | os.PathLike[str] | None = None,
    deltas: DeltaSource | Sequence[DeltaSource] = (),
    *,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
    model_class: Any = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a transformers model and apply deltas at load time.

    The deltas are read and validated before the base is loaded, so a bad delta fails fast. The returned model
    carries the handle as ``model.applied_deltas`` (call ``model.applied_deltas.revert()`` to get the base back).

    Args:
        base: a local model folder or Hub id for ``from_pretrained``. None: the base the deltas record (its id
            and revision, as ``AutoPeftModelForCausalLM`` does), verified against their fingerprints like any.
        deltas, weights, method, method_options, force: as in :func:`apply_deltas`.
        model_class: the class whose ``from_pretrained`` loads the base (default ``AutoModelForCausalLM``).
        **from_pretrained_kwargs: passed through (``dtype=torch.bfloat16``, ``device_map=...``).

    Example:
        >>> model = load_model("./smollm2", ["./shakespeare-delta"], dtype=torch.bfloat16)
        >>> model = load_model(deltas=["acme/shakespeare-delta@v1"])  # the base it records, from the Hub
    """
    inputs = validate_inputs(
        deltas, weights=weights, method=method, method_options=method_options, force=force, allow_empty=True
    )
    if base is None:
        base, revision = recorded_base(inputs.deltas)
        if revision is not None and from_pretrained_kwargs.setdefault("revision", revision) != revision:
            raise InvalidArgumentError(
                f"revision={from_pretrained_kwargs['revision']!r} conflicts with the revision {revision!r} "
                f"the deltas record for their base {base}; pass base= explicitly"
            )
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(base, **from_pretrained_kwargs)
    handle = None
    if inputs.deltas:
        handle = apply_inputs(model, inputs, _Owner(model, base))
    model.applied_deltas = handle
    return model


def recorded_base(deltas: Sequence[SparseDelta]) -> tuple[str, str | None]:
    """The base the deltas record (``common_base``'s choice: a Hub id first), for loading it by name.

    Raises:
        ValueError: no delta records a base, or the one recorded is a local path that does not exist here.
    """
    if not deltas:
        raise InvalidArgumentError("load_model needs a base, or deltas that record theirs")
    base = common_base(deltas, force=True)  # which name to load; the fingerprints are checked after loading
    name, revision = base["base_model"], base["base_revision"]
    if not name:
        raise InvalidArgumentError(
            "none of the deltas records its base model; pass base= (a model folder or a Hub id 'org/name')"
        )
    from .identity import is_hub_id

    if not is_hub_id(name) and not os.path.exists(name):
        raise PathNotFoundError(
            f"the deltas record their base as {name!r}, a local path that does not exist here; pass base= (a "
            "model folder or a Hub id 'org/name')"
        )
    return name, revision
