"""deltahub: sparse deltas for LLMs as first-class, shareable objects.

Example:
    >>> import deltahub
    >>> delta = deltahub.extract_delta("./base", "./finetuned", density=0.01)
    >>> deltahub.save_delta(delta, "./my-delta")
    >>> model = deltahub.load_model("./base", ["./my-delta"])
"""

__version__ = "0.1.0"

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
    MethodOptionError,
    RevertError,
    UnknownMethodError,
)
from .extract import extract_delta
from .format import load_delta, save_delta
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
    "MethodOption",
    "MethodOptionError",
    "MethodSpec",
    "OverlapReport",
    "ParamDelta",
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
    "load_model",
    "overlap_report",
    "register_method",
    "save_delta",
]
