"""Checks for values and files that come from strangers, each bounded by the input's real size.

A delta's JSON and headers can hold anything JSON can: integers of thousands of digits (which ``float()``
overflows on and ``str()`` refuses past 4300 digits), shapes of a hundred thousand dimensions (whose product
costs quadratic time), and its folder can hold a symlink to ``/dev/zero``, a FIFO, or a link to a file outside
the folder. Everything here turns those into problem strings, in time and memory proportional to what is
actually on disk, so the reader's one ``DeltaFormatError`` names the file and the key instead of a Python
exception escaping from a conversion.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

# A delta parameter is a weight of a model: rank 1 to 4 in practice (conv3d kernels have 5). Checked before any
# product, so a shape of 100,000 dimensions costs one comparison, not a 100,000-digit multiplication.
MAX_RANK = 8
# State-dict keys are a few dozen characters; a name of megabytes would be quoted in every problem line.
MAX_NAME = 1000
# torch indexes elements with int64, so no tensor has more; bigger claims are refused before any arithmetic.
MAX_NUMEL = 2**63 - 1


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def as_float(x: object) -> float | None:
    """``x`` as a finite float, or None: a bool, a non-number, or an integer beyond float range."""
    if not is_number(x):
        return None
    try:
        value = float(x)  # type: ignore[arg-type]
    except OverflowError:  # an int of more than ~309 digits
        return None
    return value if math.isfinite(value) else None


def preview(value: object, limit: int = 80) -> str:
    """A short, always computable description of an untrusted JSON value for an error message.

    ``str()`` of a JSON value can raise (an int of more than 4300 digits) or take long (a list of a million
    entries): this walks at most a few dozen elements and never converts a huge int to decimal.
    """
    out: list[str] = []
    budget = [limit + 1]

    def emit(text: str) -> bool:
        out.append(text)
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(v: object) -> bool:
        if is_int(v) and v.bit_length() > 64:  # type: ignore[union-attr]
            return emit(f"<{'-' if v < 0 else ''}{v.bit_length()}-bit integer>")  # type: ignore[operator,union-attr]
        if isinstance(v, list):
            if not emit("["):
                return False
            for i, item in enumerate(v):
                if (i and not emit(", ")) or not walk(item):
                    return False
            return emit("]")
        if isinstance(v, dict):
            if not emit("{"):
                return False
            for i, (key, item) in enumerate(v.items()):
                if (i and not emit(", ")) or not emit(f"{str(key)[:40]!r}: ") or not walk(item):
                    return False
            return emit("}")
        if isinstance(v, str):
            return emit(repr(v[:limit]))
        return emit(repr(v))

    walk(value)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_problem(shape: object, what: str = "'shape'", max_rank: int = MAX_RANK) -> str | None:
    """Why ``shape`` is not a tensor shape (a list of at most ``max_rank`` non-negative ints whose product torch
    can index), or None. The rank is checked before anything else and the product stops as soon as it is too
    large, so the cost is a few small-int operations whatever the input."""
    if not isinstance(shape, list):
        return f"{what} must be a list of non-negative integers, got {preview(shape)}"
    if len(shape) > max_rank:
        return f"{what} has {len(shape)} dimensions; at most {max_rank} are allowed here (got {preview(shape, 40)})"
    if not all(is_int(d) and d >= 0 for d in shape):
        return f"{what} must be a list of non-negative integers, got {preview(shape)}"
    too_many = f"{what} {preview(shape)} has more than 2^63 - 1 elements; no tensor can hold that"
    if any(d > MAX_NUMEL for d in shape):
        return too_many
    if 0 not in shape:
        numel = 1
        for d in shape:
            numel *= d
            if numel > MAX_NUMEL:
                return too_many
    return None


# ---- files ----------------------------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_roots(folder: Path) -> list[str]:
    """Where a delta folder's files may point: inside the folder, and for a Hugging Face cache snapshot
    (``<repo>/snapshots/<commit>``, whose files are links to ``<repo>/blobs/<etag>``) that repo's blobs."""
    real = os.path.realpath(folder)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def regular_file(path: Path, label: str, folder: Path | None = None) -> tuple[Path | None, str | None]:
    """``(resolved path, None)`` when ``path`` is (a link to) a regular file, else ``(None, problem)``.

    With ``folder``, a link must stay inside it (or inside the blobs of the HF cache repo the folder is a
    snapshot of): a stranger's folder must not make us read ``/etc/passwd`` and quote its first bytes.
    Devices (``/dev/zero``), FIFOs and sockets are refused: reading them never ends or blocks forever.
    """
    try:
        real = os.path.realpath(path, strict=True)
        info = os.stat(real)
    except FileNotFoundError:
        if os.path.islink(path):
            return None, f"{label}: is a link to nothing ({os.readlink(path)!r}); re-download the delta"
        return None, f"{label}: is missing"
    except (OSError, RuntimeError) as e:  # a symlink loop raises RuntimeError/OSError(ELOOP)
        return None, f"{label}: cannot be resolved ({getattr(e, 'strerror', None) or e})"
    if folder is not None and not any(_inside(real, root) for root in _link_roots(folder)):
        return None, (
            f"{label}: is a link to a file outside the delta folder; a delta's files must be inside it "
            "(copy the file in instead of linking it)"
        )
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a folder" if stat.S_ISDIR(info.st_mode)
            else "a FIFO" if stat.S_ISFIFO(info.st_mode)
            else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a socket" if stat.S_ISSOCK(info.st_mode)
            else "not a regular file"
        )  # fmt: skip
        return None, f"{label}: is {kind}, not a regular file; a delta's files are plain files"
    return Path(real), None


def open_regular(path: Path) -> int:
    """Open ``path`` for reading without blocking on a FIFO, and check the opened descriptor is a regular file
    (so a device or a file swapped after :func:`regular_file` cannot slip through).

    Raises:
        OSError: it cannot be opened, or is not a regular file (``errno.EINVAL`` then).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, "not a regular file", os.fspath(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file ``path``, or None when it holds more than ``limit`` (read at most
    ``limit + 1`` bytes whatever its size claims)."""
    fd = open_regular(path)
    try:
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return None if total > limit else b"".join(chunks)
    finally:
        os.close(fd)
