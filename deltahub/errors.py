"""Every error deltahub raises on purpose.

Each class also inherits the builtin a caller would naturally catch (``ValueError``, ``KeyError``,
``RuntimeError``), so ``except ValueError`` keeps working for code that does not know deltahub. Messages say
what is wrong, the offending value, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable


class DeltahubError(Exception):
    """Base class of every deltahub error."""


def _bulleted(problems: Iterable[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


class InvalidArgumentError(DeltahubError, ValueError):
    """An argument has a value the function cannot take (a bad size, dtype, weight, path...); the message names
    the keyword argument, the value and the expected form."""


class ArgumentTypeError(DeltahubError, TypeError):
    """An argument of the wrong type (a path where a delta was expected, say); the message names both."""


class PathNotFoundError(DeltahubError, FileNotFoundError):
    """A file or folder given as input does not exist (and, for a delta, is not a Hub id either)."""


class InvalidRepoIdError(InvalidArgumentError):
    """A Hub repo id or ``org/name@revision`` reference that breaks the Hub's naming rules."""


class DeltaFormatError(DeltahubError, ValueError):
    """A delta file or folder breaks the format contract (see ``docs/format.md``).

    All problems found are collected and reported at once, each naming the parameter or file and the fix.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(
            f"invalid deltahub delta at {self.source}: {n} problem{'s' if n != 1 else ''}:\n"
            + _bulleted(self.problems)
        )


class DeltaExistsError(DeltahubError, FileExistsError):
    """Writing would replace an existing, non-empty file or folder; pass ``overwrite=True`` to replace it."""


class MergeConfigError(InvalidArgumentError):
    """A ``merge.yaml`` that cannot be read or breaks its schema; every problem is listed."""


class BaseMismatchError(DeltahubError, ValueError):
    """A delta does not belong to the base model it is applied to (or two deltas disagree about their base)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = f"{message}\n{_bulleted(self.problems)}"
        super().__init__(message)


class UnknownMethodError(DeltahubError, ValueError):
    """A combination method name that is not in the registry."""


class MethodOptionError(DeltahubError, ValueError):
    """A combination method got an option it does not take, or a value outside its range."""


class RevertError(DeltahubError, RuntimeError):
    """Reverting applied deltas would not restore the base exactly."""


class ExtractionError(DeltahubError, ValueError):
    """A fine-tune cannot be expressed as a sparse delta of the given base."""


class CheckpointError(DeltahubError, ValueError):
    """A model folder cannot be read as a safetensors checkpoint (no safetensors weights, a broken index, a
    missing or unreadable shard)."""


class HubError(DeltahubError, RuntimeError):
    """A Hub operation failed. The message names the repo and revision, what went wrong and what to do.

    The subclasses below say why; this class itself covers the rest (a server error, an incomplete cache).
    ``repo_id`` and ``revision`` are kept as attributes. Messages never contain a token.
    """

    def __init__(self, message: str, *, repo_id: str | None = None, revision: str | None = None):
        self.repo_id = repo_id
        self.revision = revision
        super().__init__(message)


class HubAuthError(HubError, PermissionError):
    """The token was rejected (invalid or expired), missing where one is needed, or lacks write access."""


class HubRepoNotFoundError(HubError, LookupError):
    """The repo does not exist, or it is private and the token used cannot see it."""


class HubRevisionNotFoundError(HubError, LookupError):
    """The repo exists but has no such branch, tag or commit."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub endpoint could not be reached (and, for a pull, the cache holds no copy), or offline mode is on
    and the cache holds no copy."""


class NotADeltaError(HubError, ValueError):
    """The Hub repo (at that revision) holds no ``delta_config.json``: it is not a deltahub delta."""


class OutOfSpaceError(DeltahubError, OSError):
    """The disk holding an output filled up (or would, by the planned output size)."""


class UnconvertedAdapterError(DeltahubError, ValueError):
    """The path or repo holds another tool's adapter (the SFT fork of peft, a peft LoRA, composable-sft), not a
    deltahub delta: ``deltahub convert`` turns it into one. The message names the exact command."""


class ConversionError(DeltahubError, ValueError):
    """An adapter cannot be converted into a delta (an unsupported layout, a pickle that is not weights-only,
    parts that replace weights rather than add to them, a base that does not fit)."""


class OutputNotWritableError(DeltahubError, OSError):
    """An output cannot be written where it was asked for: a read-only filesystem, a file-size limit, or no
    permission. Nothing is left behind."""


class MissingExtraError(DeltahubError, ImportError):
    """An optional dependency (an extra such as ``deltahub[plot]``) is not installed; the message says what
    to install."""
