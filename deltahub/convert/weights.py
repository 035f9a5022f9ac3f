"""Reading another tool's tensors without ever running its code: safetensors, or ``torch.load(weights_only=True)``.

A weights-only load uses torch's restricted unpickler: only tensors, containers and plain values can be built,
so a pickle that would call arbitrary code (``os.system`` in a ``__reduce__``) is refused before it runs.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError

_RESAVE = (
    "deltahub never unpickles code. If you trust the file, re-save its tensors in an environment you trust, e.g. "
    "`safetensors.torch.save_file(torch.load(path), 'adapter_model.safetensors')`"
)


def load_weights_only(path: Path, safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``safe_globals`` allow-lists a few more plain-data
    constructors (numpy's scalar, say). ConversionError naming the offending global otherwise."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        why = f"it needs {match.group(1)}, which is code, not data" if match else str(err).splitlines()[0]
        raise ConversionError(f"{path} is not a weights-only pickle ({why}); {_RESAVE}") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ConversionError(f"{path} cannot be read as a torch file: {str(err).splitlines()[0]}") from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a ``.safetensors`` file or a weights-only ``.bin``."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{path} cannot be read as safetensors: {err}") from err
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path} must hold a state dict (names to tensors); got {type(state).__name__}")
    return state
