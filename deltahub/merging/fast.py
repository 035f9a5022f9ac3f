"""The streaming merge without torch: ``sum``, ``ties`` and ``magnitude`` of local deltas into a base whose
tensors keep their dtype.

Importing torch costs more than a whole ``cp`` of a page-cached 1B model (1.3-2 s here), so this path never
does: deltas are read and checked by ``format.read_delta`` (numpy), the base through its safetensors headers
and ``pread``, and the checks are the same functions as the torch path's (``basecheck``). Untouched tensors are
copied file to file by the kernel; a touched one is read into a reused buffer, changed there by the native
kernel (``deltahub.native``: ``sum`` merges the deltas' sorted positions and adds them in one pass; ``ties`` and
``magnitude`` are first combined with numpy, ``fast_methods``) and written, a few tensors ahead in a worker
thread. The results are the torch path's bit for bit (the tests compare the files).

:func:`merge` uses it when it applies (see :func:`eligible`) and falls back to the torch path otherwise:
another method (``dare`` draws torch's random numbers), ``dtype=``, a dry run, deltas given as objects or Hub
ids, tied names the checkpoint stores under another name, or no C compiler for the kernel.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import native
from .._dtypes import FLOATING_CODES, ST_ITEMSIZES, ST_NAMES
from ..basecheck import check_base, common_base
from ..checkpoint import INDEX_NAME, WEIGHTS_NAME, check_shards_present, read_index, read_model_config
from ..errors import CheckpointError, InvalidArgumentError
from ..fingerprint import sample_positions
from ..format.header import read_header
from ..format.params import RawParam
from ..format.reader import RawDelta, read_delta
from ..format.spec import CONFIG_FILE as CONFIG_FILE_DELTA
from . import fast_methods
from .base import LOOKAHEAD, resolve_model
from .plan import MergePlan, MergeResult, TensorPlan, shard_layout
from .write import _Copier, _shard_header, _write_all, progress_bar, write_folder

FAST_METHODS = ("sum", "ties", "magnitude")
_NUMPY = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


@dataclass(frozen=True)
class Dtype:
    """A safetensors dtype without torch: what the plan and the shard writer need of a dtype."""

    code: str

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZES[self.code]

    @property
    def is_floating_point(self) -> bool:
        return self.code in FLOATING_CODES

    def __str__(self) -> str:  # the dtype's name, as dtype_name() gives a torch dtype's
        return ST_NAMES[self.code]


@dataclass(frozen=True)
class _Stored:
    file: str
    start: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: Dtype


class FastBase:
    """The base checkpoint from its safetensors headers alone (checked like a delta's: sizes against the file),
    and the :class:`~deltahub.basecheck.BaseView` that check_base reads (samples with ``pread``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX_NAME).is_file():
            weight_map = read_index(folder / INDEX_NAME)
        elif (folder / WEIGHTS_NAME).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{folder} has no model weights: expected {WEIGHTS_NAME}, or {INDEX_NAME} with its shards"
            )
        files = sorted(set(weight_map.values())) if weight_map is not None else [WEIGHTS_NAME]
        check_shards_present(folder, folder, files)
        self.tensors: dict[str, _Stored] = {}
        self.weight_files = files
        problems: list[str] = []
        for file in files:
            header, bad = read_header(folder / file, file, dtypes=ST_ITEMSIZES)
            problems += bad
            if header is None:
                continue
            start = header.data_start
            names = [n for n in header.tensors if weight_map is None or weight_map.get(n) == file]
            absent = sorted(n for n, f in (weight_map or {}).items() if f == file and n not in header.tensors)
            if absent:
                problems.append(
                    f"{file} lacks {len(absent)} tensor(s) the index puts there, e.g. {absent[:3]}"
                )
            # Storage order keeps reads and writes sequential within a shard, as Checkpoint lists them.
            for n in sorted(names, key=lambda n: header.tensors[n].begin):
                e = header.tensors[n]
                self.tensors[n] = _Stored(file, start + e.begin, e.end - e.begin, e.shape, Dtype(e.dtype))
        if problems:
            raise CheckpointError(f"checkpoint {folder} cannot be read:\n  - " + "\n  - ".join(problems))
        self.config = read_model_config(folder)
        self.aliases: dict[str, str] = {}
        self._fds: dict[str, int] = {}

    # BaseView
    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> Dtype:
        return self.tensors[name].dtype

    def problem(self, name: str) -> str | None:
        return None

    def samples(self, name: str) -> tuple[float, ...]:
        s = self.tensors[name]
        size = s.dtype.itemsize
        raw = b"".join(
            os.pread(self.fd(s.file), size, s.start + pos * size)
            for pos in sample_positions(name, math.prod(s.shape))
        )
        values = np.frombuffer(raw, dtype=_NUMPY[s.dtype.code])
        return tuple(float(v) for v in fast_methods.as_float32(values, str(s.dtype)).tolist())

    def fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.folder / file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def eligible(method: str, dtype: object, dry_run: bool, deltas: Sequence[object]) -> bool:
    """Whether :func:`merge` may take the fast path (the rest of the checks happen in :func:`fast_merge`): a
    method it has, no dtype change or dry run, every delta a local delta folder (with its config: anything else,
    another tool's adapter say, gets the torch path's messages) or ``.safetensors`` file, and the kernel."""
    return (
        method in FAST_METHODS
        and dtype is None
        and not dry_run
        and all(_local_delta(d) for d in deltas)
        and native.library() is not None
    )


def _local_delta(d: object) -> bool:
    if not isinstance(d, (str, os.PathLike)):
        return False
    path = Path(d)
    return (path.is_dir() and (path / CONFIG_FILE_DELTA).is_file()) or (
        path.is_file() and path.suffix == ".safetensors"
    )


def fast_merge(
    base: str | os.PathLike,
    delta_paths: Sequence[str | os.PathLike],
    weights: list[float],
    *,
    out: Path,
    method: str,
    options: Mapping[str, Any],
    max_bytes: int,
    max_shard_size: int | str,
    force: bool,
    overwrite: bool,
    progress: bool,
) -> MergeResult | None:
    """:func:`deltahub.merging.merge` for an :func:`eligible` merge; None where the base needs the torch path
    (a delta names a tied tensor the checkpoint stores under another name: resolving that needs the model)."""
    from . import _base_name, _card, _check_out, _plan

    # The card, written last, needs huggingface_hub's card module (0.25 s to import): import it meanwhile.
    threading.Thread(target=importlib.import_module, args=("huggingface_hub.repocard",), daemon=True).start()
    deltas = [read_delta(p) for p in delta_paths]
    shared = common_base(deltas, force=force)
    base_folder, base_id, base_revision = resolve_model(base)
    base_files = FastBase(base_folder)
    try:
        wanted = list(dict.fromkeys(n for d in deltas for n in d))
        if any(n not in base_files.tensors for n in wanted):
            return None
        _check_out(out, base_folder)
        check_base(deltas, base_files, force=force)
        tensors, shards = shard_layout(base_files, None, max_bytes, {n: [n] for n in wanted})
        base_id = _base_name(base, base_id, base_files.config)
        plan = _plan(base_id, base_revision, deltas, weights, method, options, None, tensors, shards, out,
                     max_shard_size)  # fmt: skip
        nnz = write_folder(
            plan,
            base_folder,
            base_files.config,
            overwrite,
            _card(plan, base_id, base_revision, shared, force, deltas),
            lambda tmp: write_shards(base_files, plan, tmp, deltas, weights, progress),
        )
    finally:
        base_files.close()
    return MergeResult(plan, out, nnz)


# --------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class _Change:
    """One tensor's change, ready for the kernel: its lists (positions, values, values dtype) and weights."""

    lists: list[tuple[np.ndarray, np.ndarray, str]]
    weights: list[float]
    zero_start: bool
    nnz: int  # combined entries (for MergeResult.nnz)


def combine(
    name: str, deltas: Sequence[RawDelta], weights: Sequence[float], method: str, options: Mapping[str, Any]
) -> _Change:
    """The change of one tensor, exactly as the torch path's ``write.combined`` + ``add_in_place`` make it."""
    touching = [(d[name], w) for d, w in zip(deltas, weights, strict=True) if name in d]
    if method == "sum":
        # The kernel merges and sums; combine's shortcut (one delta of weight 1) adds the values as they are.
        shortcut = len(deltas) == 1 and weights[0] == 1.0
        lists = [(p.positions, p.values, p.values_dtype) for p, _ in touching]
        union = _union_size([p.positions for p, _ in touching])
        return _Change(lists, [w for _, w in touching], not shortcut, union)
    fn = fast_methods.METHODS[method]
    positions, values = fn(
        [(p.positions, fast_methods.as_float32(p.values, p.values_dtype)) for p, _ in touching],
        [w for _, w in touching],
        **options,
    )
    if not bool(np.isfinite(values).all()):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise InvalidArgumentError(
            f"combination method {method!r} gave an invalid result for {name}: {bad} values are NaN or infinite "
            "(the weighted values overflow float32); use smaller weights"
        )
    # add_in_place: base + value, rounded once; the kernel with one list of weight 1 and no "0 +" is exactly that.
    return _Change([(positions, values.astype(np.float32), "float32")], [1.0], False, int(positions.size))


def _union_size(lists: Sequence[np.ndarray]) -> int:
    if len(lists) == 1:
        return int(lists[0].size)
    merged = np.sort(np.concatenate(lists), kind="stable")  # k sorted runs: a linear merge for timsort
    return int(np.count_nonzero(merged[1:] != merged[:-1])) + 1 if merged.size else 0


# Touched tensors go through a buffer this size. Measured here (ext4, page cache, 0.95 GB): reading and writing
# in 256 KiB pieces took 0.34-0.45 s, as copy_file_range does; in 1-4 MiB pieces 0.3-3.2 s from run to run
# (allocating the file's new pages in large folios stalls at times).
CHUNK_BYTES = 256 << 10


def patch_tensor(src: int, start: int, dst: int, position: int, t: TensorPlan, change: _Change) -> None:
    """Write tensor ``t`` (at byte ``start`` of the base file ``src``) with ``change`` added to byte ``position``
    of ``dst``, streamed through a small buffer by the native kernel: read a chunk, add the entries that fall in it,
    write it, the deltas' positions merged once across the chunks. A shared map of the output instead (the
    torch path) faults every page in, since at 1% density every page holds a touched element: 2-3 s of the 1B
    merge."""
    buffer = np.empty(CHUNK_BYTES, dtype=np.uint8)
    wide = any(p.dtype == np.int64 for p, _, _ in change.lists)
    keep = [(p.astype(np.int64 if wide else np.int32, copy=False), v, d) for p, v, d in change.lists]
    lists = [
        (p.ctypes.data, v.ctypes.data, d, p.size, int(p[0]) if p.size else 0, int(p[-1]) if p.size else 0)
        for p, v, d in keep
    ]
    if not lists:  # every entry trimmed or cancelled: the base's bytes
        lists, change = [(0, 0, "float32", 0, 0, 0)], _Change([], [1.0], False, 0)
    try:
        overflowed = native.sum_stream(
            native.library(), str(t.dtype), math.prod(t.shape), (src, start), (dst, position), lists,
            change.weights, wide=wide, zero_start=change.zero_start, buffer=(buffer.ctypes.data, buffer.size),
        )  # fmt: skip
    except EOFError:
        raise CheckpointError(f"a base file ended early while reading {t.name} (was it modified?)") from None
    if overflowed:
        raise InvalidArgumentError(
            f"combination method 'sum' gave an invalid result for {t.name}: {overflowed} values are NaN or "
            "infinite (the weighted sum overflows float32); use smaller weights"
        )


def write_shards(
    base: FastBase,
    plan: MergePlan,
    folder: Path,
    deltas: Sequence[RawDelta],
    weights: Sequence[float],
    progress: bool,
) -> dict[str, int]:
    """Each shard front to back: its header, then every tensor. An untouched tensor is copied file to file by
    the kernel (``copy_file_range``: its bytes never enter this process); a touched one is streamed through a
    small buffer by the native kernel and changed on the way (:func:`patch_tensor`), in a worker thread behind
    the copies (it runs without the GIL), which also combines the next touched tensors (ties and magnitude:
    numpy)."""
    nnz: dict[str, int] = {}
    copier = _Copier()
    by_shard: dict[str, list[TensorPlan]] = {}
    for t in plan.tensors:
        by_shard.setdefault(t.shard, []).append(t)
    touched = [t for t in plan.tensors if t.touched]
    pending: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(plan.total_size, progress) as bar:
        upto = 0

        def schedule() -> None:
            nonlocal upto
            while len(pending) < LOOKAHEAD and upto < len(touched):
                t = touched[upto]
                pending[t.name] = pool.submit(combine, t.name, deltas, weights, plan.method, plan.options)
                upto += 1

        schedule()
        for file, tensors in by_shard.items():
            fd = os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            patches: list[Future] = []
            try:
                header = _shard_header(tensors)
                _write_all(fd, memoryview(header))
                position = len(header)
                for t in tensors:
                    s = base.tensors[t.name]
                    if t.touched:
                        change = pending.pop(t.name).result()
                        nnz[t.name] = change.nnz
                        src = base.fd(s.file)
                        patches.append(pool.submit(patch_tensor, src, s.start, fd, position, t, change))
                        schedule()
                        os.lseek(fd, t.nbytes, os.SEEK_CUR)  # the patch fills this region (pwrite)
                    else:
                        copier.copy(base.fd(s.file), s.start, fd, s.nbytes)
                    position += t.nbytes
                    bar.update(t.nbytes)
                for done in patches:  # the shard stays open until its patches are in
                    done.result()
            finally:
                for done in patches:
                    done.exception()  # each waited for, failed or not, before its file is closed
                os.close(fd)
    return nnz


__all__ = ["FAST_METHODS", "FastBase", "RawParam", "eligible", "fast_merge"]
