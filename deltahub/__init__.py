"""deltahub: sparse deltas for LLMs as first-class, shareable objects.

Example:
    >>> import deltahub
    >>> delta = deltahub.extract_delta("./base", "./finetuned", density=0.01)
    >>> deltahub.save_delta(delta, "./my-delta")
    >>> model = deltahub.load_model("./base", ["./my-delta"])
"""

from ._version import __version__
from .apply import AppliedDeltas, apply_deltas, load_model
from .checkpoint import Checkpoint, as_tensor_source
from .convert import convert_adapter
from .delta import ParamDelta, SparseDelta
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
from .extract import extract_delta
from .format import save_delta
from .hub import PushResult, parse_delta_ref, pull_delta, push_delta
from .loading import load_delta
from .merging import MergeConfig, MergePlan, MergeResult, merge
from .methods import MethodOption, MethodSpec, available_methods, combine, get_method, register_method
from .overlap import OverlapReport, overlap_report

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
