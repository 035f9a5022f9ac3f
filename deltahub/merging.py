"""The deployment merge: a base checkpoint plus sparse deltas, streamed into a standard model folder.

``merge(base, deltas, out=...)`` writes what ``transformers``, vLLM and friends load with no deltahub installed:
sharded safetensors with ``model.safetensors.index.json`` (or one ``model.safetensors``), the base's config,
generation config, tokenizer and chat template, and a ``README.md`` model card recording the base and every delta.

How it streams (see ``docs/merge.md``):

* Everything is validated before the first byte is written: deltas are loaded (they are small), the base is
  read from its safetensors headers only (names, shapes, dtypes, byte ranges), and the fingerprint check reads
  just the 8 sampled elements per touched parameter.
* The output layout is planned up front from header sizes, so the shard count, every shard's header and the index
  are known before writing; each shard is then written front to back, one tensor at a time.
* Every tensor kept in its dtype is copied file to file inside the kernel (``os.copy_file_range``, what ``cp``
  uses), never entering this process. For a touched one the deltas' combined entries for that tensor alone are
  then added in place through a shared map of just its pages in the output file, with
  :func:`deltahub.apply.add_in_place` (the one definition of the arithmetic, so the weights are bit-identical to
  :func:`deltahub.load_model`), and the map is closed before the next tensor. A tensor cast to another dtype is
  read with ``pread`` into a scratch buffer, cast, patched and written. No memory map of the base: pages of a
  mapped file count in the process's RSS until unmapped, so mapping a 14 GB base would report 14 GB.
* Combining a tensor's entries (a sort of their union) runs in a worker thread a few tensors ahead of the
  writer, overlapping the CPU work with the copies.
* Peak memory is about the loaded deltas plus the pages of the largest touched tensor (and its cast copy with
  ``dtype``), independent of model size.
* The folder is written under a hidden temporary sibling (``.NAME.merge-PID-XXXX``) and renamed into place at the
  end; a failure removes it, and one left by a killed run is removed by the next merge into the same place.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import socket
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from ._dtypes import VALUE_DTYPES, dtype_name, parse_dtype
from .apply import add_in_place, check_base
from .checkpoint import CONFIG_NAME, INDEX_NAME, SAFETENSORS_DTYPES, WEIGHTS_NAME, Checkpoint
from .delta import ParamDelta, SparseDelta, common_base
from .errors import BaseMismatchError, CheckpointError, DeltaExistsError, OutOfSpaceError
from .fingerprint import sample_positions
from .format.spec import parse_size
from .format.writer import install_folder, is_occupied
from .methods import combine_param, get_method, resolve_options
from .overlap import OverlapReport, overlap_report
from .sources import DeltaSource, describe, resolve_deltas

__all__ = ["MergePlan", "MergeResult", "OutOfSpaceError", "merge", "resolve_model"]

SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
_TMP_TAG = "merge"
_MARKER = ".deltahub-merge-in-progress"
_ST_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Files of the base never copied: its weights (in any format: a stale copy would contradict the merged ones),
# its model card (we write our own) and hidden files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_SKIP_FILES = frozenset({INDEX_NAME, "pytorch_model.bin.index.json", "README.md"})
# What a Hub base needs: weights in transformers' naming, configs, tokenizer files, chat template, custom code.
HUB_PATTERNS = [
    "model*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.py",
    "LICENSE*",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s@]+)?$")
_COPY_CHUNK = 16 << 20
_LOOKAHEAD = 4  # touched tensors combined ahead of the writer


# --------------------------------------------------------------------------------------------------------------
# The base: headers, byte ranges, sampled elements


def resolve_model(ref: str | os.PathLike) -> tuple[Path, str, str | None]:
    """A model folder on disk for ``ref``: a local folder, or a Hub id ``org/name`` or ``org/name@revision``
    downloaded with ``huggingface_hub.snapshot_download`` (weights, configs, tokenizer files only).

    Returns:
        ``(folder, model id, revision)``; for a Hub id the revision is the resolved commit.
    """
    path = Path(ref)
    if path.exists():
        return path, str(ref), None
    text = os.fspath(ref)
    if not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"no model at {text!r}: expected a local folder written by save_pretrained, or a Hub id like "
            "'org/name' or 'org/name@revision'"
        )
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot download the model {text!r} from the Hub: {first}. Check the id and revision (and "
            "HF_TOKEN for a private repo), or pass a local folder"
        ) from err
    # Snapshot folders are named by commit: the exact revision for the model card.
    return Path(folder), repo_id, Path(folder).name


@dataclass(frozen=True)
class _Stored:
    """Where one base tensor's bytes are."""

    file: str
    start: int  # absolute file offset of the first byte
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _read_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``{name: (absolute start, byte length)}`` from a safetensors header (safe_open validated it already)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {
        k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
    }


class _BaseFiles:
    """The base checkpoint as byte ranges, plus the :class:`~deltahub.apply.BaseView` that check_base reads.

    Tied aliases (a delta naming ``lm_head.weight`` where the checkpoint stores only the tied
    ``model.embed_tokens.weight``) resolve to the stored tensor through ``aliases``.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        with Checkpoint(folder) as ckpt:  # validates the index and every shard's header
            self.config: dict[str, Any] | None = ckpt.config
            self.model_id = ckpt.model_id
            self.weight_files = list(ckpt.files)
            self.tensors: dict[str, _Stored] = {}
            for file, names in ckpt.files.items():
                offsets = _read_offsets(ckpt.folder / file)
                for name in names:
                    start, nbytes = offsets[name]
                    self.tensors[name] = _Stored(file, start, nbytes, ckpt.shape(name), ckpt.dtype(name))
            self.weights_folder = ckpt.folder
        self.aliases: dict[str, str] = {}
        self._fds: dict[str, int] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def stored(self, name: str) -> _Stored:
        return self.tensors[self.aliases.get(name, name)]

    # BaseView
    def names(self) -> set[str]:
        return set(self.tensors) | set(self.aliases)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.stored(name).dtype

    def problem(self, name: str) -> str | None:
        return None

    def samples(self, name: str) -> tuple[float, ...]:
        # Positions come from the name the delta uses (an alias hashes differently), values from the stored tensor.
        s = self.stored(name)
        size = s.dtype.itemsize
        values = []
        for pos in sample_positions(name, math.prod(s.shape)):
            raw = os.pread(self.fd(s.file), size, s.start + pos * size)
            values.append(float(torch.frombuffer(bytearray(raw), dtype=s.dtype).to(torch.float32)))
        return tuple(values)

    def fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.weights_folder / file, os.O_RDONLY)
        return self._fds[file]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with pread (no memory map: see the module docstring) into a scratch buffer reused
        for every read: valid until the next call. Reusing it saves the kernel zeroing and faulting in fresh
        pages for every tensor, which measured as a third of the merge's system time."""
        s = self.tensors[name]
        if self._scratch.numel() < s.nbytes:
            self._scratch = torch.empty(0, dtype=torch.uint8)  # free the old one before allocating the new
            self._scratch = torch.empty(s.nbytes, dtype=torch.uint8)
        buf = self._scratch[: s.nbytes]
        view, done, fd = memoryview(buf.numpy()), 0, self.fd(s.file)
        while done < s.nbytes:
            got = os.preadv(fd, [view[done:]], s.start + done)
            if got == 0:
                raise CheckpointError(f"{self.weights_folder / s.file} ended early while reading {name}")
            done += got
        return buf.view(s.dtype).view(s.shape)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        self._scratch = torch.empty(0, dtype=torch.uint8)
        for fd in fds.values():
            os.close(fd)

    def resolve_aliases(self, wanted: Sequence[str]) -> None:
        """Map tied names the checkpoint does not store to the tensor it does (needs the config's model class)."""
        missing = [n for n in wanted if n not in self.tensors]
        if not missing or not self.config:
            return
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.folder)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception:  # an unknown architecture: the names simply stay missing and are reported as such
            return
        by_param: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(p), []).append(n)
        for names in by_param.values():
            stored = [n for n in names if n in self.tensors]
            for n in names:
                if n in missing and stored:
                    self.aliases[n] = stored[0]


# --------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from and goes, and which delta names change it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # in the output
    nbytes: int  # in the output
    shard: str
    deltas: tuple[str, ...] = ()  # names the deltas use for it (itself, or a tied alias)

    @property
    def touched(self) -> bool:
        return bool(self.deltas)


@dataclass(frozen=True)
class DeltaInfo:
    """One input delta as the plan and the model card describe it."""

    source: str
    revision: str | None
    weight: float
    params: int
    nnz: int


@dataclass
class MergePlan:
    """What a merge will write (``merge(..., dry_run=True)`` returns it without writing anything).

    Attributes:
        base, base_revision: the base model id or path, and its revision when known.
        deltas: per input delta: source, revision, weight, touched parameters, entries.
        method, options: the combination method and its resolved options.
        dtype: the output dtype of floating tensors (None: each keeps the base's).
        tensors: every output tensor in writing order, with its shard.
        shards: ``{file name: bytes of tensor data}`` in order.
        overlap: the overlap report of two or more deltas (sign conflicts included), else None.
        out: the folder to be written.
    """

    base: str
    base_revision: str | None
    deltas: list[DeltaInfo]
    method: str
    options: dict[str, Any]
    dtype: torch.dtype | None
    tensors: list[TensorPlan]
    shards: dict[str, int]
    out: Path
    overlap: OverlapReport | None = None

    @property
    def total_size(self) -> int:
        return sum(self.shards.values())

    @property
    def touched(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.touched]

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "base_revision": self.base_revision,
            "deltas": [vars(d) for d in self.deltas],
            "method": self.method,
            "options": self.options,
            "dtype": dtype_name(self.dtype) if self.dtype else None,
            "out": str(self.out),
            "total_size": self.total_size,
            "shards": self.shards,
            "touched": [t.name for t in self.touched],
            "tensors": len(self.tensors),
            "overlap": self.overlap.to_dict() if self.overlap else None,
        }

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [
            f"base: {self.base}" + (f" @ {self.base_revision}" if self.base_revision else ""),
            f"method: {self.method}" + (f" ({opts})" if opts else ""),
        ]
        for i, d in enumerate(self.deltas):
            rev = f" @ {d.revision}" if d.revision else ""
            lines.append(
                f"delta {i}: {d.source}{rev}  weight {d.weight:g}  {d.params} parameters, nnz {d.nnz:,}"
            )
        touched = self.touched
        lines.append(f"touched tensors: {len(touched)} of {len(self.tensors)}")
        lines += [f"  {t.name} {list(t.shape)}" for t in touched]
        if self.overlap is not None:
            lines.append(str(self.overlap))
        dtype = dtype_name(self.dtype) if self.dtype else "as the base"
        lines.append(
            f"output: {self.out}  {_human(self.total_size)} in {len(self.shards)} file(s), dtype {dtype}"
        )
        return "\n".join(lines)


@dataclass
class MergeResult:
    """What :func:`merge` did: the plan, the folder written (None for a dry run), and the entries changed."""

    plan: MergePlan
    out: Path | None
    nnz: dict[str, int] = field(default_factory=dict)  # combined entries added, per output tensor

    @property
    def dry_run(self) -> bool:
        return self.out is None


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _shard_layout(
    base: _BaseFiles, out_dtype: torch.dtype | None, max_bytes: int, users: Mapping[str, list[str]]
) -> tuple[list[TensorPlan], dict[str, int]]:
    """Greedy shards in the base's storage order (reads and writes stay sequential), as transformers cuts them:
    a new shard starts when the next tensor would overflow ``max_bytes``; a bigger tensor gets its own."""
    groups: list[list[tuple[str, torch.dtype, int]]] = [[]]
    used = 0
    for name, s in base.tensors.items():
        dtype = out_dtype if out_dtype is not None and s.dtype.is_floating_point else s.dtype
        nbytes = math.prod(s.shape) * dtype.itemsize
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, nbytes))
        used += nbytes
    total = len(groups)
    tensors, shards = [], {}
    for i, group in enumerate(groups, start=1):
        file = WEIGHTS_NAME if total == 1 else SHARD_PATTERN.format(index=i, total=total)
        # Largest items first (stable): every tensor then starts at a multiple of its item size, as
        # safetensors' own writer guarantees, so readers may view the bytes without copying.
        group.sort(key=lambda item: -item[1].itemsize)
        for name, dtype, nbytes in group:
            shape = base.tensors[name].shape
            tensors.append(TensorPlan(name, shape, dtype, nbytes, file, tuple(users.get(name, ()))))
        shards[file] = sum(item[2] for item in group)
    return tensors, shards


# --------------------------------------------------------------------------------------------------------------
# Writing


def _shard_header(tensors: Sequence[TensorPlan]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _ST_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


class _Copier:
    """File-to-file copies of untouched tensors: in the kernel where it can (no bytes through this process; a
    reflink on filesystems that share extents), else in chunks."""

    def __init__(self) -> None:
        self.kernel = hasattr(os, "copy_file_range")

    def copy(self, src: int, offset: int, dst: int, count: int) -> None:
        while count > 0 and self.kernel:
            try:
                n = os.copy_file_range(src, dst, count, offset)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.kernel = False  # cross-device, unsupported filesystem, old kernel: fall back below
                break
            if n == 0:
                raise CheckpointError(
                    "a base file ended early while copying (was it modified during the merge?)"
                )
            offset, count = offset + n, count - n
        while count > 0:
            chunk = os.pread(src, min(count, _COPY_CHUNK), offset)
            if not chunk:
                raise CheckpointError(
                    "a base file ended early while copying (was it modified during the merge?)"
                )
            _write_all(dst, memoryview(chunk))
            offset, count = offset + len(chunk), count - len(chunk)


def _combined(
    name: str,
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    method: str,
    options: Mapping[str, Any],
) -> ParamDelta:
    """The combination of one parameter, exactly as ``combine(deltas, weights, method)[name]`` computes it (the
    methods are per-parameter pure functions), without combining the other parameters at the same time."""
    if len(deltas) == 1 and weights[0] == 1.0 and method == "sum":
        return deltas[0][name].with_values_dtype(
            torch.float32
        )  # combine's own shortcut, kept for identical bits
    return combine_param(get_method(method), options, name, deltas, weights)


def _write_shards(
    base: _BaseFiles,
    plan: MergePlan,
    folder: Path,
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    progress: bool,
) -> dict[str, int]:
    nnz: dict[str, int] = {}
    copier = _Copier()
    by_shard: dict[str, list[TensorPlan]] = {}
    for t in plan.tensors:
        by_shard.setdefault(t.shard, []).append(t)
    bar = tqdm(
        total=plan.total_size, unit="B", unit_scale=True, desc="merge", disable=None if progress else True
    )
    # Combining a tensor's entries (a sort of its union) is CPU work; reading and writing are system calls that
    # release the GIL. A worker thread combines the next touched tensors while this one does the I/O: on two
    # cores that hides most of the combining. The lookahead is a few tensors, and their combined entries are
    # ~2% of a tensor each, so memory stays bounded.
    touched = [t for t in plan.tensors if t.touched]
    pending: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=1) as pool, bar:

        def schedule(upto: int) -> None:
            while len(pending) < _LOOKAHEAD and upto < len(touched):
                t = touched[upto]
                pending[t.name] = pool.submit(
                    _combined, t.deltas[0], deltas, weights, plan.method, plan.options
                )
                upto += 1
            schedule.next = upto  # type: ignore[attr-defined]

        schedule.next = 0  # type: ignore[attr-defined]
        schedule(0)
        for file, tensors in by_shard.items():
            # Read-write: touched tensors are patched through a shared map of the output file (below).
            fd = os.open(folder / file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                header = _shard_header(tensors)
                _write_all(fd, memoryview(header))
                position = len(header)
                for t in tensors:
                    s = base.tensors[t.name]
                    change = None
                    if t.touched:
                        change = pending.pop(t.name).result()
                        schedule(schedule.next)  # type: ignore[attr-defined]
                        nnz[t.name] = change.nnz
                    if t.dtype == s.dtype:
                        # Copy the base bytes file to file in the kernel, then add the entries in place through a
                        # shared map of just this tensor's pages: the bytes never pass through a user buffer, and
                        # only ~2% of them (1% density) are touched by the CPU.
                        copier.copy(base.fd(s.file), s.start, fd, s.nbytes)
                        if change is not None:
                            _patch(fd, position, t, change)
                    else:
                        tensor = base.read(t.name)
                        # Cast first, then add: load_model(..., dtype=...) loads the base in that dtype and adds
                        # the deltas there, so this order gives its weights bit for bit.
                        tensor = tensor.to(t.dtype)
                        if change is not None:
                            add_in_place(tensor, change, revertible=False)
                        _write_all(fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                        del tensor
                    del change
                    position += t.nbytes
                    bar.update(t.nbytes)
            finally:
                os.close(fd)
    return nnz


def _patch(fd: int, position: int, t: TensorPlan, change: ParamDelta) -> None:
    """``add_in_place`` on the tensor stored at ``position`` of the output file, through a shared map of its pages
    (unmapped right after, so the pages do not stay in this process's resident set)."""
    if t.nbytes == 0:
        return
    start = position - position % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, position + t.nbytes - start, offset=start) as mapped:
        view = torch.frombuffer(mapped, dtype=torch.uint8)[position - start :]
        add_in_place(view.view(t.dtype).view(t.shape), change, revertible=False)
        del view  # the map cannot close while a tensor still points into it


def _index(plan: MergePlan) -> dict[str, Any]:
    return {
        "metadata": {
            "total_size": plan.total_size,
            "total_parameters": sum(math.prod(t.shape) for t in plan.tensors),
        },
        "weight_map": {t.name: t.shard for t in sorted(plan.tensors, key=lambda t: t.name)},
    }


def _copy_extras(base_folder: Path, out: Path, plan: MergePlan, config: dict[str, Any] | None) -> None:
    """Everything of the base folder but its weights and card: configs, tokenizer files, chat template, code."""
    for item in sorted(base_folder.iterdir()):
        name = item.name
        if (
            name.startswith(".")
            or name in _SKIP_FILES
            or name.endswith(_WEIGHT_SUFFIXES)
            or not item.is_file()
        ):
            continue
        if name == CONFIG_NAME and config is not None and plan.dtype is not None:
            config = dict(config)
            # transformers 5 writes "dtype", 4.x "torch_dtype": update what is there, and always "dtype".
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = dtype_name(plan.dtype)
            (out / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            continue
        shutil.copyfile(item, out / name)  # follows the Hub cache's symlinks to the blobs


def _yaml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def model_card(plan: MergePlan) -> str:
    """The ``README.md`` of a merged model: the base, every delta with weight and revision, the method, and the
    ``merge.yaml`` that reproduces it."""
    front = [
        "---",
        "library_name: transformers",
        f"base_model: {_yaml_str(plan.base)}",
        "base_model_relation: merge",
        "tags:",
        "- deltahub",
        "- merge",
        "---",
    ]
    rows = [
        f"| {i} | `{d.source}` | {d.revision or '-'} | {d.weight:g} | {d.params} | {d.nnz:,} |"
        for i, d in enumerate(plan.deltas)
    ]
    opts = ", ".join(f"{k}={v}" for k, v in plan.options.items()) or "none"
    config = [
        f"base: {_yaml_str(plan.base + ('@' + plan.base_revision if plan.base_revision else ''))}",
        "deltas:",
    ]
    for d in plan.deltas:
        config += [f"  - path: {_yaml_str(d.source)}", f"    weight: {d.weight!r}"]
        if d.revision:
            config.append(f"    revision: {_yaml_str(d.revision)}")
    config.append(f"method: {plan.method}")
    if plan.options:
        config.append("options:")
        config += [f"  {k}: {v!r}" for k, v in plan.options.items()]
    if plan.dtype is not None:
        config.append(f"dtype: {dtype_name(plan.dtype)}")
    body = [
        "",
        f"# {plan.out.name}",
        "",
        f"`{plan.base}`"
        + (f" (revision `{plan.base_revision}`)" if plan.base_revision else "")
        + f" with {len(plan.deltas)} sparse delta(s) merged in by deltahub {__version__}. A standard "
        "transformers checkpoint: it loads with `AutoModelForCausalLM.from_pretrained` and needs no deltahub.",
        "",
        "## Deltas",
        "",
        "| # | delta | revision | weight | parameters | nnz |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Method: `{plan.method}` (options: {opts}). Output dtype: "
        f"{dtype_name(plan.dtype) if plan.dtype else 'as the base'}. Changed tensors: {len(plan.touched)} of "
        f"{len(plan.tensors)}; every other tensor is byte-identical to the base.",
        "",
        "## Reproduce",
        "",
        "```yaml",
        *config,
        "```",
        "",
        "```bash",
        f"deltahub merge --config merge.yaml --out {plan.out.name}",
        "```",
        "",
    ]
    return "\n".join(front + body)


# --------------------------------------------------------------------------------------------------------------
# Temporary folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove temporary folders that a killed merge into ``out`` left behind (their process is gone)."""
    host = socket.gethostname()
    for tmp in out.parent.glob(f".{glob_escape(out.name)}.{_TMP_TAG}-*"):
        try:
            marker = json.loads((tmp / _MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or still being created: leave it
        if marker.get("host") == host and not _pid_alive(int(marker.get("pid", -1))):
            shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _make_tmp(out: Path) -> Path:
    while True:
        tmp = out.parent / f".{out.name}.{_TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)  # mkdir, not mkdtemp: its 0o700 would survive the rename
        except FileExistsError:
            continue
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "deltahub": __version__}
        (tmp / _MARKER).write_text(json.dumps(marker), encoding="utf-8")
        return tmp


def _space_error(out: Path, needed: int, free: int | None, err: OSError | None = None) -> OutOfSpaceError:
    have = f", {_human(free)} free" if free is not None else ""
    return OutOfSpaceError(
        errno.ENOSPC,
        f"not enough disk space for the merged model in {out.parent} ({_human(needed)} needed{have}): free "
        "some space or choose --out on another disk; nothing was left behind"
        + (f" ({err.strerror})" if err is not None and err.strerror else ""),
    )


# --------------------------------------------------------------------------------------------------------------
# The function


def merge(
    base: str | os.PathLike,
    deltas: DeltaSource | Sequence[DeltaSource],
    *,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Merge sparse deltas into a base checkpoint and write a standard transformers model folder, streaming.

    The result equals ``load_model(base, deltas, weights, method, dtype=dtype)`` weight for weight (same
    float32 arithmetic, rounded once), so plain ``AutoModelForCausalLM.from_pretrained(out)`` gives the same
    logits. Tensors no delta touches are copied byte for byte.

    Args:
        base: a local model folder (safetensors) or a Hub id ``org/name[@revision]``.
        deltas: delta folders, files, Hub ids (``org/name@revision``) or SparseDelta objects.
        out: the folder to create (refused if it exists and is not empty, unless ``overwrite``).
        weights: one per delta (default 1.0); negative subtracts.
        method, method_options: the combination method and its options (``{"density": 0.3}`` for ties).
        dtype: output dtype of floating tensors (float32, bfloat16, float16); default: the base's. The base is
            cast first and the deltas added in that dtype, as ``load_model(..., dtype=...)`` does.
        max_shard_size: bytes per output file, an int or a string like ``"5GB"`` or ``"2GiB"``.
        force: skip the base fingerprint check (names and shapes are always checked).
        overwrite: replace an existing ``out`` (swapped in only once the new folder is complete).
        dry_run: validate and plan, write nothing; the result's ``out`` is None.
        progress: show a progress bar (hidden anyway when not writing to a terminal).

    Returns:
        A :class:`MergeResult` with the :class:`MergePlan` (``str(plan)`` is the dry-run report).

    Raises:
        DeltaFormatError, BaseMismatchError, CheckpointError, UnknownMethodError, MethodOptionError, ValueError,
        DeltaExistsError (``out`` exists), OutOfSpaceError: all but the last before anything is written.

    Example:
        >>> merge("meta-llama/Llama-3.2-1B@main", ["./math-delta", "./code-delta"], weights=[1.0, 0.5],
        ...       out="./llama-math-code", dtype="bfloat16")
    """
    options = resolve_options(method, method_options or {})
    out_dtype = parse_dtype(dtype, allowed=VALUE_DTYPES, what="dtype") if dtype is not None else None
    max_bytes = parse_size(max_shard_size)
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"--out needs a folder path with a name; got {os.fspath(out)!r}")
    if is_occupied(out) and not overwrite:
        raise DeltaExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    delta_list, weight_list = resolve_deltas(deltas, weights)
    if not delta_list:
        raise ValueError("merge needs at least one delta")
    common_base(delta_list)
    base_folder, base_id, base_revision = resolve_model(base)
    base_files = _BaseFiles(base_folder)
    try:
        _check_out(out, base_folder)
        wanted = list(dict.fromkeys(n for d in delta_list for n in d))
        base_files.resolve_aliases(wanted)
        check_base(delta_list, base_files, force=force)
        users: dict[str, list[str]] = {}
        for n in wanted:
            users.setdefault(base_files.aliases.get(n, n), []).append(n)
        _check_tied(users, delta_list, weight_list, method, options)
        tensors, shards = _shard_layout(base_files, out_dtype, max_bytes, users)
        if base_id == str(base) and base_files.config and base_files.config.get("_name_or_path"):
            base_id = base_files.config["_name_or_path"]
        plan = MergePlan(
            base=base_id,
            base_revision=base_revision,
            deltas=[
                _delta_info(d, i, w) for i, (d, w) in enumerate(zip(delta_list, weight_list, strict=True))
            ],
            method=method,
            options=options,
            dtype=out_dtype,
            tensors=tensors,
            shards=shards,
            out=out,
        )
        if dry_run:
            if len(delta_list) > 1:
                plan.overlap = overlap_report(delta_list, weight_list)
            return MergeResult(plan, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        free = shutil.disk_usage(out.parent).free
        if free < plan.total_size:
            raise _space_error(out, plan.total_size, free)
        tmp = _make_tmp(out)
        try:
            nnz = _write_shards(base_files, plan, tmp, delta_list, weight_list, progress)
            if len(shards) > 1:
                (tmp / INDEX_NAME).write_text(json.dumps(_index(plan), indent=2) + "\n", encoding="utf-8")
            _copy_extras(base_folder, tmp, plan, base_files.config)
            (tmp / "README.md").write_text(model_card(plan), encoding="utf-8")
            (tmp / _MARKER).unlink()
            install_folder(tmp, out, overwrite)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, OutOfSpaceError):
                raise _space_error(out, plan.total_size, None, err) from err
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        base_files.close()
    return MergeResult(plan, out, nnz)


def _check_out(out: Path, base_folder: Path) -> None:
    """Refuse an ``out`` that is the base or holds it: replacing it would destroy the weights being read."""
    o, b = out.resolve(), base_folder.resolve()
    if o == b or o in b.parents:
        raise ValueError(
            f"--out {out} is (or contains) the base model folder {base_folder}; choose another folder"
        )


def _check_tied(
    users: Mapping[str, list[str]],
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    method: str,
    options: Mapping[str, Any],
) -> None:
    """A tied tensor changed under two names must get the same change from both (as apply_deltas requires)."""
    for stored, names in users.items():
        if len(names) > 1:
            first = _combined(names[0], deltas, weights, method, options)
            for other in names[1:]:
                if not first.equal(_combined(other, deltas, weights, method, options)):
                    raise BaseMismatchError(
                        f"{names[0]} and {other} are one tied tensor ({stored}) in this model but the deltas change "
                        "them differently; keep one of the two names in the delta"
                    )


def _delta_info(delta: SparseDelta, position: int, weight: float) -> DeltaInfo:
    origin = delta.origin
    source = origin.get("repo_id") or origin.get("path") or describe(delta, position)
    revision = origin.get("commit") or origin.get("revision") or None
    return DeltaInfo(str(source), revision, weight, len(delta), delta.nnz)
