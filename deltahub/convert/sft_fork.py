"""Adapters saved by the SFT fork of peft (``AlanAnsell/peft``): ``adapter_config.json`` with ``peft_type: SFT``
and ``adapter_model.safetensors`` (or ``.bin``).

Its state dict holds, per tuned linear module, ``base_model.model.<module>.sft_delta.indices`` (int32 or int64,
flat row-major positions into the module's weight, in slot order: unsorted after RigL reselection) and
``...sft_delta.values`` (the offsets, usually float32). The fork's forward adds them with a scatter-sum, so a
position listed twice counts twice; we sort the positions and sum repeats, which gives the same weight. The
weight's shape is not stored: it comes from the base.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..delta import ParamDelta, SparseDelta
from ..errors import ConversionError
from ..fingerprint import tensor_samples
from .base import BaseLike, base_tensor, open_base
from .peft_files import read_adapter

_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+?)\.sft_delta(?:\.(?P<adapter>[^.]+))?\.(?P<part>indices|values)"
)


def sorted_sum(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions sorted and made unique, repeats summed in float32 (the fork's scatter-sum); and how many repeats."""
    idx = indices.to(torch.int64)
    unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    if unique.numel() == idx.numel():
        order = torch.argsort(idx)
        return idx[order], values[order], 0
    summed = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, values.to(torch.float32))
    return unique, summed.to(values.dtype), idx.numel() - unique.numel()


def convert_sft_fork(
    folder: Path, *, base: BaseLike | None, drop_head: bool, values_dtype: torch.dtype | None
) -> SparseDelta:
    what = f"the SFT-fork adapter {folder}"
    config, parts, replaced = read_adapter(folder, _KEY, what, drop_head=drop_head, kept="the sparse deltas")
    incomplete = sorted(m for m, p in parts.items() if set(p) != {"indices", "values"})
    if incomplete:
        raise ConversionError(f"{what}: modules {incomplete[:5]} have indices or values but not both")
    if not parts:
        raise ConversionError(f"{what} holds no '<module>.sft_delta.indices' / '.values' tensors")
    recorded = (config.get("base_model_name_or_path") or None, config.get("revision") or None)
    params: dict[str, ParamDelta] = {}
    fingerprint: dict[str, tuple[float, ...]] = {}
    repeats = 0
    with open_base(base, recorded, what) as opened:
        for module, p in parts.items():
            name = f"{module}.weight"
            weight = base_tensor(opened, name, what)
            indices, values = p["indices"].reshape(-1), p["values"].reshape(-1)
            problems = []
            if indices.dtype not in (torch.int32, torch.int64):
                problems.append(f"indices are {indices.dtype}, not int32/int64")
            if not values.dtype.is_floating_point:
                problems.append(f"values are {values.dtype}, not floating point")
            if indices.numel() != values.numel():
                problems.append(f"{indices.numel()} indices but {values.numel()} values")
            if not problems and indices.numel():
                lo, hi = int(indices.min()), int(indices.max())
                if lo < 0 or hi >= weight.numel():
                    problems.append(
                        f"positions must lie in [0, {weight.numel()}) for shape {list(weight.shape)}; found {lo if lo < 0 else hi}"
                    )
            if problems:
                raise ConversionError(
                    f"{what}: {module}: " + "; ".join(problems) + "; is this the right base?"
                )
            idx, vals, n = sorted_sum(indices, values)
            repeats += n
            if values_dtype is not None:
                vals = vals.to(values_dtype)
            try:
                params[name] = ParamDelta(idx, vals, tuple(weight.shape), weight.dtype)
            except ValueError as err:
                raise ConversionError(f"{what}: {module}: {err}") from None
            fingerprint[name] = tensor_samples(name, weight)
        provenance: dict[str, Any] = {
            "method": "convert",
            "source_format": "sft-fork",
            "algorithm": config.get("selection_algorithm"),
            "adapter_config": {k: v for k, v in config.items() if k not in ("base_model_name_or_path",)},
            "repeated_positions_summed": repeats,
            "dropped": replaced,
        }
        return SparseDelta(
            params,
            base_model=opened.model_id,
            base_revision=opened.revision,
            fingerprint=fingerprint,
            provenance=provenance,
        )
