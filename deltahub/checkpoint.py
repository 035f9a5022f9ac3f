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
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from safetensors import SafetensorError, safe_open

from . import _dtypes
from .errors import ArgumentTypeError, CheckpointError, PathNotFoundError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading headers and byte ranges needs none
    import torch
    from torch import nn


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


class Checkpoint(Mapping[str, "torch.Tensor"]):
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
        check_shards_present(self.path, folder, wanted)
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
        self.config = read_model_config(folder)
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
        dtypes = _dtypes.SAFETENSORS_DTYPES
        code = self._meta[name][1]
        if code not in dtypes:
            raise CheckpointError(
                f"{name} in {self._where[name]} has dtype {code}, which this torch cannot hold"
            )
        return dtypes[code]

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


def check_shards_present(path: Path, folder: Path, files: Iterable[str]) -> None:
    """Raise with the fix when shard files the index of checkpoint ``path`` names are not in ``folder``."""
    missing = sorted(f for f in files if not (folder / f).is_file())
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: its index names {len(missing)} shard(s) that are not in "
            f"{folder}: {missing}. Download or copy the missing shards (an interrupted download leaves exactly "
            "this)"
        )


def read_model_config(folder: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` next to a checkpoint's weights, or None where there is none."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot parse {path}: {err}") from err


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
            return path.parent, read_index(path)
        if path.suffix == ".safetensors":
            return path.parent, dict.fromkeys(_header_names(path), path.name)
        if path.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{path} is a pickle checkpoint. {_CONVERT_HINT}")
        raise CheckpointError(f"{path} is not a .safetensors file or a safetensors index JSON")
    if (path / INDEX_NAME).is_file():
        return path, read_index(path / INDEX_NAME)
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


def read_index(index: Path) -> dict[str, str]:
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


def read_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``{name: (absolute start, byte length)}`` from a safetensors header, read by the format's one parser
    (every check a delta's header gets, with every safetensors dtype allowed)."""
    from .format.header import read_header

    header, problems = read_header(path, path.name, dtypes=_dtypes.ST_ITEMSIZES)
    if header is None:
        raise CheckpointError(f"cannot read the shard {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return {k: (header.data_start + t.begin, t.end - t.begin) for k, t in header.tensors.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a checkpoint lies: its file, the absolute offset of its first byte, and its metadata."""

    path: Path
    start: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype this torch cannot hold

    def read(self) -> torch.Tensor:
        """The tensor in fresh memory, read with ``pread``: no memory map, so no page of the file is mapped into
        this process (a map's touched pages count in its resident set for as long as it lives)."""
        import torch

        if self.dtype is None:
            raise CheckpointError(f"{self.path}: a tensor of a dtype this torch cannot hold")
        out = torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if self.nbytes else memoryview(b"")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < self.nbytes:
                got = os.preadv(fd, [view[done:]], self.start + done)
                if got == 0:
                    raise CheckpointError(
                        f"{self.path} ended early while reading a tensor (was it modified?)"
                    )
                done += got
        finally:
            os.close(fd)
        return out


def read_elements(stored: StoredTensor, positions: list[int]) -> torch.Tensor:
    """The tensor's elements at these flat positions, read with ``pread`` (no memory map: see ``read``)."""
    import torch

    if stored.dtype is None:
        raise CheckpointError(f"{stored.path}: a tensor of a dtype this torch cannot hold")
    size = stored.dtype.itemsize
    fd = os.open(stored.path, os.O_RDONLY)
    try:
        raw = b"".join(os.pread(fd, size, stored.start + pos * size) for pos in positions)
    finally:
        os.close(fd)
    if len(raw) != size * len(positions):
        raise CheckpointError(f"{stored.path} ended early while reading a tensor (was it modified?)")
    return torch.frombuffer(bytearray(raw), dtype=stored.dtype) if raw else torch.empty(0, dtype=stored.dtype)


def file_mappings() -> list[tuple[int, int, int, int, str]]:
    """This process's file-backed memory maps from ``/proc/self/maps``: ``(start address, end address, file
    offset, inode, path)``; empty without procfs. Read once, then ask :func:`mapped_address`."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, int(fields[2], 16), int(fields[4]), fields[5]))
    return out


def is_mapped_at(
    mappings: list[tuple[int, int, int, int, str]], path: Path, offset: int, address: int
) -> bool:
    """Whether byte ``offset`` of the file at ``path`` is mapped at ``address`` in this process (by any of its
    maps: a process that loaded a file twice may hold two). Lets a caller recognise a tensor that is the file's
    bytes without touching (and so faulting in) any of its pages."""
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return False
    for lo, hi, start, ino, name in mappings:
        if ino == inode and start <= offset < start + (hi - lo) and lo + offset - start == address:
            try:
                return os.path.samefile(name, path)
            except OSError:
                return False
    return False


def stored_tensors(folder: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors checkpoint in ``folder`` with its byte range (headers only are read)."""
    with Checkpoint(folder) as ckpt:  # validates the index and every shard's header
        out = {}
        for file, names in ckpt.files.items():
            offsets = read_offsets(ckpt.folder / file)
            for name in names:
                start, nbytes = offsets[name]
                code = ckpt._meta[name][1]
                shape = ckpt.shape(name)
                dtype = _dtypes.SAFETENSORS_DTYPES.get(code)
                if dtype is not None and math.prod(shape) * dtype.itemsize != nbytes:
                    dtype = None
                out[name] = StoredTensor(ckpt.folder / file, start, nbytes, shape, dtype)
    return out


class StateDictSource(Mapping[str, "torch.Tensor"]):
    """In-memory tensors behind the :class:`TensorSource` interface, tied aliases collapsed.

    Names that are views of the same memory with the same shape and strides (GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``) are one tensor: only the first name is kept, as ``save_pretrained`` does,
    so a delta touches a tied weight once.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, model_id: str | None = None):
        import torch

        from ._tensors import storage_key

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
    from torch import nn

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
