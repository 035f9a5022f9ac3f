"""Errors of the training subsystem; each is also a deltahub error and the builtin callers would catch."""

from deltahub.errors import DeltahubError, InvalidArgumentError


class SftConfigError(InvalidArgumentError):
    """An SftConfig field (or an argument that depends on the model) is outside its allowed range."""


class SftStateError(DeltahubError, RuntimeError):
    """The model is not (or already) prepared for sparse fine-tuning, or saved state does not fit it."""
