"""Writing outputs atomically, in one place: a hidden sibling built completely, then renamed into place.

Every writer of deltahub (``save_delta``, ``pull_delta(local_dir=...)``, ``merge``, the compiled kernel, the
demo's converted model) goes through these helpers, so an interrupted write never leaves anything that looks
finished, an existing output is refused with the same words everywhere, and a replaced output is swapped in
only once its successor is complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DeltaExistsError, InvalidArgumentError

# The one fix text for an occupied output. Library messages name the keyword; the CLI's error layer rewrites
# `overwrite=True` into the verb's flag (`--overwrite`).
OVERWRITE_FIX = "pass overwrite=True to replace it"


def is_occupied(target: Path) -> bool:
    """Whether ``target`` exists as anything but an empty folder (a file, a link, a non-empty folder)."""
    if target.is_symlink() or target.is_file():
        return True
    return target.is_dir() and any(target.iterdir())


def check_output(target: str | os.PathLike, *, overwrite: bool, keyword: str) -> Path:
    """Refuse an output path before any work: one without a name (``.``, ``..``, ``/``), or an occupied one
    unless ``overwrite``. ``keyword`` is the argument's name, for the message. Returns it as a Path."""
    path = Path(target)
    if not path.name or path.name in (".", ".."):
        raise InvalidArgumentError(f"`{keyword}` needs a folder path with a name; got {os.fspath(target)!r}")
    if not overwrite and is_occupied(path):
        raise DeltaExistsError(f"{path} already exists and is not empty; {OVERWRITE_FIX}")
    return path


def fresh_sibling(target: Path, tag: str) -> Path:
    """A new, empty hidden folder next to ``target`` (``.NAME.TAG-XXXXXXXX``), on the same filesystem, so the
    final rename is atomic."""
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp's 0o700 mode would survive the rename and hide the output
    # from other users; mkdir honours the umask like any folder the user creates.
    while True:
        candidate = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def install_folder(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete folder ``tmp`` to ``target``. An occupied ``target`` is refused unless ``overwrite``;
    then it is moved aside first, so at every instant ``target`` is the old or the new folder, never neither."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not is_occupied(target):
        target.rmdir()
        os.replace(tmp, target)
        return
    if not overwrite:
        raise DeltaExistsError(f"{target} already exists and is not empty; {OVERWRITE_FIX}")
    old = fresh_sibling(target, "old")
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False, tag: str = "tmp") -> Iterator[Path]:
    """Build a folder in a hidden sibling and install it at ``target`` when the block succeeds.

    On any exception the sibling is removed and ``target`` is untouched.

    Example:
        >>> with atomic_folder("out/model", overwrite=True) as tmp:
        ...     model.save_pretrained(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(target, tag)
    try:
        yield tmp
        install_folder(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(target: Path, write) -> None:
    """``write(path)`` into a temporary file next to ``target``, then rename it over ``target``: concurrent
    readers (other processes, DDP ranks) see the old file or the complete new one, never a partial one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(target, "tmp")
    try:
        write(tmp / target.name)
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
