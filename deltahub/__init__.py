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
from .delta import ParamDelta, SparseDelta
from .errors import (
    BaseMismatchError,
    CheckpointError,
    DeltaExistsError,
    DeltaFormatError,
    DeltahubError,
    ExtractionError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    MethodOptionError,
    NotADeltaError,
    OutOfSpaceError,
    RevertError,
    UnknownMethodError,
)
from .extract import extract_delta
from .format import load_delta, save_delta
from .hub import PushResult, load_hub_delta, parse_delta_ref, pull_delta, push_delta
from .merging import MergePlan, MergeResult, merge
from .methods import MethodOption, MethodSpec, available_methods, combine, get_method, register_method
from .overlap import OverlapReport, overlap_report

__all__ = [
    "AppliedDeltas",
    "BaseMismatchError",
    "Checkpoint",
    "CheckpointError",
    "DeltaExistsError",
    "DeltaFormatError",
    "DeltahubError",
    "ExtractionError",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubRepoNotFoundError",
    "HubRevisionNotFoundError",
    "MergePlan",
    "MergeResult",
    "MethodOption",
    "MethodOptionError",
    "MethodSpec",
    "NotADeltaError",
    "OutOfSpaceError",
    "OverlapReport",
    "ParamDelta",
    "PushResult",
    "RevertError",
    "SparseDelta",
    "UnknownMethodError",
    "__version__",
    "apply_deltas",
    "as_tensor_source",
    "available_methods",
    "combine",
    "extract_delta",
    "get_method",
    "load_delta",
    "load_hub_delta",
    "load_model",
    "merge",
    "overlap_report",
    "parse_delta_ref",
    "pull_delta",
    "push_delta",
    "register_method",
    "save_delta",
]
