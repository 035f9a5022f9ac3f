"""Writing the merged folder: shards streamed tensor by tensor (kernel copies, in-place patches of touched
tensors), the index, the base's other files, and the hidden temporary folder renamed into place."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import socket
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._atomic import fresh_sibling
from .._dtypes import SAFETENSORS_CODES, dtype_name
from .._version import __version__
from ..apply import add_in_place
from ..checkpoint import CONFIG_NAME
from ..delta import ParamDelta, SparseDelta
from ..errors import CheckpointError, OutOfSpaceError, OutputNotWritableError
from ..methods import combine_param, get_method
from .base import (
    COPY_CHUNK,
    LOOKAHEAD,
    MARKER,
    SKIP_FILES,
    TMP_TAG,
    WEIGHT_SUFFIXES,
    BaseFiles,
)
from .plan import MergePlan, TensorPlan, human

# --------------------------------------------------------------------------------------------------------------
# Writing


def _shard_header(tensors: Sequence[TensorPlan]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": SAFETENSORS_CODES[t.dtype],
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
            chunk = os.pread(src, min(count, COPY_CHUNK), offset)
            if not chunk:
                raise CheckpointError(
                    "a base file ended early while copying (was it modified during the merge?)"
                )
            _write_all(dst, memoryview(chunk))
            offset, count = offset + len(chunk), count - len(chunk)


def combined(
    name: str,
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    method: str,
    options: Mapping[str, Any],
) -> ParamDelta:
    """The combination of one parameter, exactly as ``combine(deltas, weights, method)[name]`` computes it (the
    methods are per-parameter pure functions), without combining the other parameters at the same time."""
    return combine_param(get_method(method), options, name, deltas, weights)


def write_shards(
    base: BaseFiles,
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
            while len(pending) < LOOKAHEAD and upto < len(touched):
                t = touched[upto]
                pending[t.name] = pool.submit(
                    combined, t.deltas[0], deltas, weights, plan.method, plan.options
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


def index(plan: MergePlan) -> dict[str, Any]:
    return {
        "metadata": {
            "total_size": plan.total_size,
            "total_parameters": sum(math.prod(t.shape) for t in plan.tensors),
        },
        "weight_map": {t.name: t.shard for t in sorted(plan.tensors, key=lambda t: t.name)},
    }


def copy_extras(base_folder: Path, out: Path, plan: MergePlan, config: dict[str, Any] | None) -> None:
    """Everything of the base folder but its weights and card: configs, tokenizer files, chat template, code."""
    for item in sorted(base_folder.iterdir()):
        name = item.name
        if name.startswith(".") or name in SKIP_FILES or name.endswith(WEIGHT_SUFFIXES) or not item.is_file():
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


def _host_tag() -> str:
    """Six hex digits naming this host, so a temporary folder's name says whose it is (shared filesystems)."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


# The tail of a temporary folder's name after ".NAME.": merge-PID-HOST-XXXXXXXX (see make_tmp).
_TMP_NAME = re.compile(rf"{TMP_TAG}-(\d{{1,10}})-([0-9a-f]{{6}})-[0-9a-f]{{8}}")


def _owner(tmp: Path, out: Path) -> tuple[str | None, int | None]:
    """``(host, pid)`` of the merge that made ``tmp``: from its marker, else (the marker is removed just before
    the final rename, so a kill in between leaves none) from its name; ``(None, None)`` when neither says."""
    try:
        marker = json.loads((tmp / MARKER).read_text(encoding="utf-8"))
        pid = marker.get("pid")
        if isinstance(marker.get("host"), str) and isinstance(pid, int) and not isinstance(pid, bool):
            return marker["host"], pid
    except (OSError, ValueError, AttributeError):
        pass
    match = _TMP_NAME.fullmatch(tmp.name[len(out.name) + 2 :])
    if match and match.group(2) == _host_tag():
        return socket.gethostname(), int(match.group(1))
    return None, None


def remove_stale(out: Path) -> None:
    """Remove temporary folders that a killed merge into ``out`` left behind (their process is gone, on this host).
    Folders whose owner cannot be told (not ours, or still being created) are left alone."""
    host = socket.gethostname()
    for tmp in out.parent.glob(f".{glob_escape(out.name)}.{TMP_TAG}-*"):
        owner, pid = _owner(tmp, out)
        if owner == host and pid is not None and pid > 0 and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def make_tmp(out: Path) -> Path:
    """The merge's hidden sibling, with a marker naming its process so a later merge can remove it if killed."""
    tmp = fresh_sibling(out, f"{TMP_TAG}-{os.getpid()}-{_host_tag()}")
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "deltahub": __version__}
    (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return tmp


def write_error(out: Path, needed: int, err: OSError) -> OSError:
    """The error to raise for ``err``, met while writing the merged model to ``out``: out of space, a read-only
    filesystem, a file-size limit and a refused permission each say so and what to do; anything else as is."""
    if isinstance(err, (OutOfSpaceError, OutputNotWritableError)):
        return err
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return space_error(out, needed, None, err)
    where = f"cannot write the merged model to {out}"
    fix = {
        errno.EROFS: f"{out.absolute().parent} is on a read-only file system; choose `out` on a writable disk",
        errno.EFBIG: (
            "a file would exceed the file-size limit (ulimit -f, or the filesystem's largest file); pass a "
            "smaller `max_shard_size` (each output file is at most that) or choose `out` on another disk"
        ),
        errno.EACCES: f"permission denied for {err.filename or out.parent}; choose `out` in a folder you can write",
        errno.EPERM: f"not permitted for {err.filename or out.parent}; choose `out` in a folder you can write",
    }.get(err.errno)
    if fix is None:
        return err
    return OutputNotWritableError(err.errno, f"{where}: {fix}; nothing was left behind")


def space_error(out: Path, needed: int, free: int | None, err: OSError | None = None) -> OutOfSpaceError:
    have = f", {human(free)} free" if free is not None else ""
    return OutOfSpaceError(
        errno.ENOSPC,
        f"not enough disk space for the merged model in {out.parent} ({human(needed)} needed{have}): free "
        "some space or choose `out` on another disk; nothing was left behind"
        + (f" ({err.strerror})" if err is not None and err.strerror else ""),
    )
