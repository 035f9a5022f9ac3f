"""Reading model weights lazily, one tensor at a time, from a transformers folder, a module or a state dict.

:class:`Checkpoint` reads a folder written by ``save_pretrained`` (``model.safetensors``, or shards named by
``model.safetensors.index.json``) through safetensors' memory maps: names, shapes and dtypes come from the file
headers, and a tensor's bytes are read only when :meth:`Checkpoint.get` asks for it. :func:`as_tensor_source`
gives modules, state dicts and folders that same interface, so extraction and the streaming merge need only
one code path and never hold a whole model in memory.

Only safetensors are read: pickle checkpoints (``pytorch_model.bin``) can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ._dtypes import SAFETENSORS_DTYPES
from ._tensors import storage_key
from .errors import ArgumentTypeError, CheckpointError, PathNotFoundError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONVERT_HINT = (
    "deltahub reads only safetensors, because pickle files can run arbitrary code when loaded. Convert once, "
    "in an environment you trust: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
    "safe_serialization=True)`"
)


@runtime_checkable
class TensorSource(Protocol):
    """What extraction and merging read weights through: names, metadata without data, one tensor at a time."""

    model_id: str | None

    def keys(self) -> Any: ...

    def get(self, name: str) -> torch.Tensor | None: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazy mapping from state-dict names to tensors of a safetensors checkpoint.

    Args:
        path: a folder with ``model.safetensors`` or ``model.safetensors.index.json`` and its shards, or the
            path of one ``.safetensors`` file or of an index JSON.
        device: where :meth:`get` puts tensors.

    Attributes:
        path: the folder (or file) given.
        files: ``{file name: [tensor names]}``, files sorted by name (shard order), names in storage order.
        config: the parsed ``config.json`` next to the weights, or None.
        model_id: the config's ``_name_or_path`` when set, else the path.

    Example:
        >>> with Checkpoint("out/llama") as ckpt:
        ...     ckpt.shape("model.embed_tokens.weight"), ckpt.get("model.norm.weight").dtype
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = str(device)
        folder, weight_map = _locate(self.path)
        self.folder = folder
        self.files: dict[str, list[str]] = {}
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        wanted: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            wanted.setdefault(file, set()).add(name)
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.path} is incomplete: its index names {len(missing)} shard(s) that are not in "
                f"{folder}: {sorted(missing)}. Download or copy the missing shards (an interrupted download "
                "leaves exactly this)"
            )
        problems = []
        for file, names in sorted(wanted.items()):
            handle = self._open(file)
            stored = list(getattr(handle, "offset_keys", handle.keys)())
            absent = sorted(names.difference(stored))
            if absent:
                problems.append(
                    f"{file} lacks {len(absent)} tensor(s) the index puts there, e.g. {absent[:3]}"
                )
            # Storage order keeps reads sequential within a shard; tensors the index does not name are not
            # part of the model (transformers ignores them too).
            self.files[file] = [n for n in stored if n in names]
            for n in self.files[file]:
                sl = handle.get_slice(n)
                self._where[n] = file
                self._meta[n] = (tuple(int(s) for s in sl.get_shape()), sl.get_dtype())
        if problems:
            self.close()
            raise CheckpointError(
                f"checkpoint {self.path} does not match its index:\n  - " + "\n  - ".join(problems)
            )
        config_path = folder / CONFIG_NAME
        self.config: dict[str, Any] | None = None
        if config_path.is_file():
            try:
                self.config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise CheckpointError(f"cannot parse {config_path}: {err}") from err
        self.model_id: str | None = ((self.config or {}).get("_name_or_path") or None) or str(self.path)

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(self.folder / file), framework="pt", device=self.device)
            except (SafetensorError, OSError) as err:
                self.close()
                raise CheckpointError(f"cannot read {self.folder / file} as safetensors: {err}") from err
            self._handles[file] = handle
        return handle

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._where[name]  # KeyError for unknown names, as a Mapping should
        return self._open(file).get_tensor(name)

    # Mapping's default would load the tensor just to test membership.
    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (no data is read)."""
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype, from the file header (no data is read)."""
        code = self._meta[name][1]
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{name} in {self._where[name]} has dtype {code}, which this torch cannot hold"
            )
        return SAFETENSORS_DTYPES[code]

    def close(self) -> None:
        """Release the memory maps (tensors already returned stay valid; a later :meth:`get` reopens)."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)}, files={len(self.files)})"


def _locate(path: Path) -> tuple[Path, dict[str, str]]:
    """The folder holding the weights and ``{tensor name: file name}``; raises with the fix when unreadable."""
    if not path.exists():
        hint = ""
        if not path.is_absolute() and str(path).count("/") == 1:
            hint = (
                "; Checkpoint reads local folders only: for a Hub model download it first, e.g. "
                f"`huggingface_hub.snapshot_download({str(path)!r}, allow_patterns=['*.safetensors', '*.json'])`"
            )
        raise PathNotFoundError(f"no checkpoint at {str(path)!r}{hint}")
    if path.is_file():
        if path.name.endswith(".json"):
            return path.parent, _read_index(path)
        if path.suffix == ".safetensors":
            return path.parent, dict.fromkeys(_header_names(path), path.name)
        if path.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{path} is a pickle checkpoint. {_CONVERT_HINT}")
        raise CheckpointError(f"{path} is not a .safetensors file or a safetensors index JSON")
    if (path / INDEX_NAME).is_file():
        return path, _read_index(path / INDEX_NAME)
    if (path / WEIGHTS_NAME).is_file():
        return path, dict.fromkeys(_header_names(path / WEIGHTS_NAME), WEIGHTS_NAME)
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise CheckpointError(
            f"{path} has no {WEIGHTS_NAME} or {INDEX_NAME}, but holds {others}: pass the file itself "
            f"(e.g. Checkpoint({str(path / others[0])!r})) if it holds the model's weights"
        )
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} has no safetensors weights, only pickle files {pickles}. {_CONVERT_HINT}"
        )
    raise CheckpointError(
        f"{path} has no model weights: expected {WEIGHTS_NAME}, or {INDEX_NAME} with its shards "
        "(what `model.save_pretrained(dir)` writes)"
    )


def _header_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {file} as safetensors: {err}") from err


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot parse the index {index}: {err}") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index} is not a safetensors index: expected {{'weight_map': {{tensor name: shard file}}}}"
        )
    escaping = sorted({v for v in weight_map.values() if Path(v).name != v})
    if escaping:
        # An index from a stranger must not make us open files outside its folder.
        raise CheckpointError(f"{index} names shard files outside its folder: {escaping[:3]}")
    return weight_map


class StateDictSource(Mapping[str, torch.Tensor]):
    """In-memory tensors behind the :class:`TensorSource` interface, tied aliases collapsed.

    Names that are views of the same memory with the same shape and strides (GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``) are one tensor: only the first name is kept, as ``save_pretrained`` does,
    so a delta touches a tied weight once.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, model_id: str | None = None):
        self.model_id = model_id or None
        self._tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple] = set()
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ArgumentTypeError(
                    f"a state dict must map names to tensors; {name!r} is {type(tensor).__name__}"
                )
            ident = storage_key(tensor)
            if ident is not None:
                if ident in seen:
                    continue
                seen.add(ident)
            self._tensors[name] = tensor.detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def __repr__(self) -> str:
        return f"StateDictSource(tensors={len(self)}, model_id={self.model_id!r})"


def as_tensor_source(
    x: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike | TensorSource,
) -> TensorSource:
    """One lazy interface (``keys()``, ``get(name)``, ``shape(name)``, ``dtype(name)``, ``model_id``) over
    a module (its state dict), a state dict, or a checkpoint folder (a :class:`Checkpoint`, opened here: close
    it when done).

    Tied aliases in modules and state dicts collapse to their first name. ``model_id`` is the module's
    ``name_or_path`` (None when empty), the folder's config ``_name_or_path`` or its path, or None for a plain
    state dict.
    """
    if isinstance(x, nn.Module):
        return StateDictSource(x.state_dict(), model_id=getattr(x, "name_or_path", None))
    if isinstance(x, (str, os.PathLike)):
        return Checkpoint(x)
    if isinstance(x, TensorSource):
        return x
    if isinstance(x, Mapping):
        return StateDictSource(x)
    raise ArgumentTypeError(
        f"expected an nn.Module, a state dict (Mapping[str, Tensor]) or a checkpoint folder path; "
        f"got {type(x).__name__}"
    )
