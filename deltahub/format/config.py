"""``delta_config.json``: building it from a delta, writing it, and validating one read from a file.

The same structure, restricted to one file's parameters, is the ``delta_config`` entry of each safetensors
header; see ``docs/format.md``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .._dtypes import BASE_DTYPES, VALUE_DTYPES, dtype_name
from .._version import __version__
from ..delta import ParamDelta, SparseDelta
from ..errors import InvalidArgumentError
from ..fingerprint import SAMPLES
from .spec import (
    FINGERPRINT_METHOD,
    FORMAT_NAME,
    FORMAT_VERSION,
    NONFINITE,
    STORAGE_DENSE,
    STORAGE_SPARSE,
)
from .untrusted import MAX_NAME, as_float, is_int, preview, shape_problem

RESAVE = "re-save the delta with deltahub.save_delta"


def stored_densely(p: ParamDelta) -> bool:
    # nnz == numel means the indices are exactly arange(numel): storing them would only double the bytes.
    return p.numel > 0 and p.nnz == p.numel


def _sample_json(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _values_dtype_name(params: list[ParamDelta]) -> str | None:
    dtypes = {p.values.dtype for p in params}
    if not dtypes:
        return None
    return dtype_name(dtypes.pop()) if len(dtypes) == 1 else "mixed"


def build_config(delta: SparseDelta, names: list[str] | None = None) -> dict[str, Any]:
    """The ``delta_config.json`` content for ``delta``, or for the subset ``names`` (a shard's own config)."""

    names = list(delta) if names is None else names
    params = [delta[n] for n in names]
    nnz = sum(p.nnz for p in params)
    numel = sum(p.numel for p in params)
    entries: dict[str, Any] = {}
    for name, p in zip(names, params, strict=True):
        entry: dict[str, Any] = {
            "shape": list(p.shape),
            "dtype": dtype_name(p.dtype),
            "nnz": p.nnz,
            "storage": STORAGE_DENSE if stored_densely(p) else STORAGE_SPARSE,
        }
        if name in delta.fingerprint:
            entry["base_samples"] = [_sample_json(x) for x in delta.fingerprint[name]]
        entries[name] = entry
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "deltahub_version": __version__,
        "base_model": delta.base_model,
        "base_revision": delta.base_revision,
        "values_dtype": _values_dtype_name(params),
        "nnz": nnz,
        "numel": numel,
        "density": nnz / numel if numel else 0.0,
        "parameters": entries,
        "fingerprint": (
            {"method": FINGERPRINT_METHOD, "samples_per_parameter": SAMPLES} if delta.fingerprint else None
        ),
        "provenance": delta.provenance,
    }


def dumps(obj: Any, **kwargs: Any) -> str:
    try:
        # allow_nan=False: NaN is not JSON, and our own reader rejects it.
        return json.dumps(obj, allow_nan=False, ensure_ascii=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"delta metadata cannot be written as JSON ({e}); provenance must hold only JSON values "
            "(str, int, finite float, bool, None, lists and dicts with string keys)"
        ) from e


def config_text(config: dict[str, Any]) -> str:
    """``delta_config.json`` text: indented, but one line per parameter so large models stay readable."""
    items = []
    for key, value in config.items():
        if key == "parameters" and value:
            rows = ",\n".join(f"    {dumps(name)}: {dumps(entry)}" for name, entry in value.items())
            text = "{\n" + rows + "\n  }"
        else:
            text = dumps(value, indent=2).replace("\n", "\n  ")
        items.append(f"  {dumps(key)}: {text}")
    return "{\n" + ",\n".join(items) + "\n}\n"


# Reading: everything below treats the input as untrusted JSON.


@dataclass
class ParamSpec:
    """One parameter's entry in ``delta_config.json``, validated."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    storage: str
    samples: tuple[float, ...] | None


@dataclass
class DeltaConfig:
    """``delta_config.json`` (or a header's ``delta_config``), validated; ``where`` names its source."""

    where: str
    base_model: str | None = None
    base_revision: str | None = None
    values_dtype: str | None = None
    totals: dict[str, Any] = field(default_factory=dict)
    params: dict[str, ParamSpec | None] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def _parse_samples(raw: object, numel: int, per_param: int, where: str, problems: list[str]) -> tuple | None:
    want = per_param if numel > 0 else 0
    if not isinstance(raw, list) or len(raw) != want:
        problems.append(f"{where}: base_samples must be a list of {want} numbers; got {preview(raw)}")
        return None
    out = []
    for x in raw:
        value = as_float(x)  # None for an int beyond float range (10**400), which float() would overflow on
        if value is not None:
            out.append(value)
        elif isinstance(x, str) and x in NONFINITE:
            out.append(NONFINITE[x])
        else:
            problems.append(
                f"{where}: base_samples entry {preview(x, 40)} is not a number or 'nan'/'inf'/'-inf'"
            )
            return None
    return tuple(out)


def _parse_param(
    name: str, raw: object, where: str, per_param: int | None, problems: list[str]
) -> ParamSpec | None:
    at = f"{where}: parameter {preview(name, 200)}"
    if len(name) > MAX_NAME:
        problems.append(f"{at}: a name of {len(name)} characters is not a state-dict key; {RESAVE}")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{at}: entry must be an object with shape, dtype, nnz and storage; {RESAVE}")
        return None
    bad = []
    shape, dtype, nnz, storage = raw.get("shape"), raw.get("dtype"), raw.get("nnz"), raw.get("storage")
    shape_bad = shape_problem(shape)  # rank and size first: math.prod of 100,000 dimensions is quadratic
    if shape_bad:
        bad.append(shape_bad)
    if not isinstance(dtype, str) or dtype not in BASE_DTYPES:
        bad.append(
            f"'dtype' (the base parameter's dtype) must be one of {', '.join(BASE_DTYPES)}, got {dtype!r}"
        )
    if not is_int(nnz) or nnz < 0:
        bad.append(f"'nnz' must be a non-negative integer, got {preview(nnz, 40)}")
    if storage not in (STORAGE_SPARSE, STORAGE_DENSE):
        bad.append(f"'storage' must be {STORAGE_SPARSE!r} or {STORAGE_DENSE!r}, got {preview(storage, 40)}")
    if bad:
        problems.append(f"{at}: {'; '.join(bad)}")
        return None
    numel = math.prod(shape)
    if nnz > numel:
        problems.append(f"{at}: nnz {preview(nnz, 40)} exceeds the {numel} elements of shape {shape}")
        return None
    if storage == STORAGE_DENSE and nnz != numel:
        problems.append(f"{at}: storage is 'dense' so nnz must equal numel {numel}, got {nnz}")
        return None
    samples = None
    if "base_samples" in raw:
        if per_param is None:
            problems.append(
                f"{at}: has base_samples but the config's 'fingerprint' is null; add it or drop them"
            )
        elif per_param > 0:
            samples = _parse_samples(raw["base_samples"], numel, per_param, at, problems)
    return ParamSpec(tuple(shape), BASE_DTYPES[dtype], nnz, storage, samples)


def parse_config(obj: dict[str, Any], where: str, problems: list[str]) -> DeltaConfig:
    cfg = DeltaConfig(where)
    for key in ("base_model", "base_revision"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}: {key!r} must be a string or null, got {preview(value)}")
        else:
            setattr(cfg, key, value)
    vd = obj.get("values_dtype")
    if vd is not None and vd != "mixed" and (not isinstance(vd, str) or vd not in VALUE_DTYPES):
        problems.append(
            f"{where}: 'values_dtype' must be one of {', '.join(VALUE_DTYPES)} or 'mixed', got {preview(vd, 40)}"
        )
    else:
        cfg.values_dtype = vd
    for key in ("nnz", "numel"):
        if key in obj and not (is_int(obj[key]) and obj[key] >= 0):
            problems.append(f"{where}: {key!r} must be a non-negative integer, got {preview(obj[key], 40)}")
        elif key in obj:
            cfg.totals[key] = obj[key]
    density = as_float(obj.get("density"))
    if "density" in obj and (density is None or not 0.0 <= density <= 1.0):
        problems.append(f"{where}: 'density' must be a number in [0, 1], got {preview(obj['density'], 40)}")
    elif "density" in obj:
        cfg.totals["density"] = density
    version = obj.get("deltahub_version")
    if version is not None and not isinstance(version, str):
        problems.append(
            f"{where}: 'deltahub_version' must be a string like '0.1.0' (or null), got {preview(version, 40)}"
        )
    prov = obj.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        problems.append(f"{where}: 'provenance' must be an object or null, got {type(prov).__name__}")
    else:
        cfg.provenance = dict(prov or {})
    fp, per_param = obj.get("fingerprint"), None
    if fp is not None:
        if (
            not isinstance(fp, dict)
            or not is_int(fp.get("samples_per_parameter"))
            or not isinstance(fp.get("method"), str)
        ):
            problems.append(
                f"{where}: 'fingerprint' must be null or {{'method': str, 'samples_per_parameter': int}}"
            )
            per_param = 0  # reported once here, not again for every parameter's base_samples
        elif fp["method"] == FINGERPRINT_METHOD and fp["samples_per_parameter"] != SAMPLES:
            # 0 or a negative count would silently switch the base check off; samples-v1 always has 8.
            problems.append(
                f"{where}: 'fingerprint' method {FINGERPRINT_METHOD!r} has samples_per_parameter {SAMPLES}, got "
                f"{preview(fp['samples_per_parameter'], 40)}; {RESAVE}"
            )
            per_param = 0
        elif fp["method"] != FINGERPRINT_METHOD:
            # A later minor version may add methods; the delta still loads, only the base check is lost.
            warnings.warn(
                f"{where}: unknown fingerprint method {preview(fp['method'], 40)}; loading without a base "
                "fingerprint",
                stacklevel=4,
            )
            per_param = 0
        else:
            per_param = fp["samples_per_parameter"]
    params = obj.get("parameters")
    if not isinstance(params, dict):
        problems.append(
            f"{where}: 'parameters' must be an object mapping state-dict names to entries; {RESAVE}"
        )
        return cfg
    if "values_dtype" in obj and vd is None and params:
        problems.append(
            f"{where}: 'values_dtype' is null but the delta has {len(params)} parameters; set it to their values' "
            f"dtype ({', '.join(VALUE_DTYPES)}) or 'mixed'"
        )
    for name, raw in params.items():
        cfg.params[name] = _parse_param(name, raw, where, per_param, problems)
    return cfg
