"""deltahub: sparse deltas for LLMs as first-class, shareable objects.

Example:
    >>> import deltahub
    >>> delta = deltahub.extract_delta("./base", "./finetuned", density=0.01)
    >>> deltahub.save_delta(delta, "./my-delta")
    >>> model = deltahub.load_model("./base", ["./my-delta"])
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    ArgumentTypeError,
    BaseMismatchError,
    CheckpointError,
    ConversionError,
    DeltaExistsError,
    DeltaFormatError,
    DeltahubError,
    ExtractionError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    InvalidArgumentError,
    InvalidRepoIdError,
    MergeConfigError,
    MethodOptionError,
    MissingExtraError,
    NotADeltaError,
    OutOfSpaceError,
    PathNotFoundError,
    RevertError,
    UnconvertedAdapterError,
    UnknownMethodError,
)

# The rest is imported on first use (PEP 562): most of it needs torch, whose import costs more than a whole
# `cp` of a 1B model, and `deltahub merge` with `sum` never needs it.
_LAZY = {
    "AppliedDeltas": "apply",
    "apply_deltas": "apply",
    "load_model": "apply",
    "Checkpoint": "checkpoint",
    "as_tensor_source": "checkpoint",
    "ParamDelta": "delta",
    "SparseDelta": "delta",
    "convert_adapter": "convert",
    "extract_delta": "extract",
    "load_delta": "loading",
    "save_delta": "format",
    "PushResult": "hub",
    "parse_delta_ref": "hub",
    "pull_delta": "hub",
    "push_delta": "hub",
    "MergeConfig": "merging",
    "MergePlan": "merging",
    "MergeResult": "merging",
    "merge": "merging",
    "MethodOption": "methods",
    "MethodSpec": "methods",
    "available_methods": "methods",
    "combine": "methods",
    "get_method": "methods",
    "register_method": "methods",
    "OverlapReport": "overlap",
    "overlap_report": "overlap",
}

if TYPE_CHECKING:
    from .apply import AppliedDeltas, apply_deltas, load_model
    from .checkpoint import Checkpoint, as_tensor_source
    from .convert import convert_adapter
    from .delta import ParamDelta, SparseDelta
    from .extract import extract_delta
    from .format import save_delta
    from .hub import PushResult, parse_delta_ref, pull_delta, push_delta
    from .loading import load_delta
    from .merging import MergeConfig, MergePlan, MergeResult, merge
    from .methods import MethodOption, MethodSpec, available_methods, combine, get_method, register_method
    from .overlap import OverlapReport, overlap_report


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deltahub' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AppliedDeltas",
    "ArgumentTypeError",
    "BaseMismatchError",
    "Checkpoint",
    "CheckpointError",
    "ConversionError",
    "DeltaExistsError",
    "DeltaFormatError",
    "DeltahubError",
    "ExtractionError",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubRepoNotFoundError",
    "HubRevisionNotFoundError",
    "InvalidArgumentError",
    "InvalidRepoIdError",
    "MergeConfig",
    "MergeConfigError",
    "MergePlan",
    "MergeResult",
    "MethodOption",
    "MethodOptionError",
    "MethodSpec",
    "MissingExtraError",
    "NotADeltaError",
    "OutOfSpaceError",
    "OverlapReport",
    "ParamDelta",
    "PathNotFoundError",
    "PushResult",
    "RevertError",
    "SparseDelta",
    "UnconvertedAdapterError",
    "UnknownMethodError",
    "__version__",
    "apply_deltas",
    "as_tensor_source",
    "available_methods",
    "combine",
    "convert_adapter",
    "extract_delta",
    "get_method",
    "load_delta",
    "load_model",
    "merge",
    "overlap_report",
    "parse_delta_ref",
    "pull_delta",
    "push_delta",
    "register_method",
    "save_delta",
]
