"""The base a converted adapter is for: where its shapes, dtypes and fingerprint come from, and how it is named."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint, TensorSource, as_tensor_source
from ..errors import ConversionError
from ..identity import model_identity, parse_model_id

BaseLike = str | os.PathLike | nn.Module | Mapping[str, torch.Tensor] | TensorSource


@dataclass
class OpenBase:
    """A base opened for conversion: its tensors (lazily) and the identity a delta should record."""

    source: TensorSource
    model_id: str | None
    revision: str | None
    owned: bool  # opened here, so closed here

    def close(self) -> None:
        if self.owned and isinstance(self.source, Checkpoint):
            self.source.close()

    def __enter__(self) -> OpenBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_base(base: BaseLike | None, recorded: tuple[str | None, str | None], what: str) -> OpenBase:
    """Open ``base``; None means the base the adapter records (``recorded``: id or path, and revision).

    A Hub id (``org/name[@rev]``) is downloaded (safetensors and configs only) through the HF cache.
    """
    from ..merging.base import resolve_model

    if base is None:
        name, revision = recorded
        if not name:
            raise ConversionError(
                f"{what} does not record its base model; pass the base it was trained on (base=, --base): a model "
                "folder or a Hub id 'org/name[@rev]'"
            )
        base = f"{name}@{revision}" if revision and not os.path.exists(name) else name
    if isinstance(base, (str, os.PathLike)):
        if not os.path.exists(base):
            parse_model_id(os.fspath(base))  # a clear error for what is neither a folder nor an id
        folder, model_id, revision = resolve_model(base)
        return OpenBase(Checkpoint(folder), model_id, revision, owned=True)
    source = as_tensor_source(base)
    if isinstance(base, nn.Module):
        config = getattr(base, "config", None)
        model_id, revision = model_identity(
            getattr(base, "name_or_path", None) or None, getattr(config, "_commit_hash", None)
        )
        return OpenBase(source, model_id, revision, owned=False)
    return OpenBase(source, getattr(source, "model_id", None), None, owned=False)


def base_tensor(base: OpenBase, name: str, what: str) -> torch.Tensor:
    """One base tensor by state-dict name, with an error naming the adapter when the base lacks it."""
    if name not in base.source.keys():  # noqa: SIM118  (a TensorSource promises keys(), not `in`)
        raise ConversionError(
            f"{what} changes {name}, which the base {base.model_id or ''} does not have; pass the base the adapter "
            "was trained on"
        )
    tensor = base.source.get(name)
    if tensor is None or not tensor.dtype.is_floating_point:
        raise ConversionError(f"{what} changes {name}, which is not a floating-point tensor in the base")
    return tensor
