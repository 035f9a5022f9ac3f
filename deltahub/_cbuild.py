"""Building the project's C kernels on first use (``deltahub/native.py``, ``training/kernels.py``).

One shared library per source, compiler, flags and machine, cached in ``kernels/`` of deltahub's cache
(``$DELTAHUB_CACHE``, else ``~/.cache/deltahub``) and written atomically, so concurrent processes (DDP ranks)
never load a half-written one. No torch here: the streaming merge builds its kernel without it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ._atomic import atomic_file
from .cache import cache_dir


def find_compiler() -> str | None:
    """``$CC``, else ``cc`` or ``gcc`` on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(source: Path, compiler: str, flags: Sequence[str], libs: Sequence[str] = ()) -> ctypes.CDLL:
    """The library built from ``source``, compiled now unless the cache already holds this build.

    Raises:
        OSError: the library cannot be written or loaded.
        subprocess.CalledProcessError: the compiler failed (its stderr is on the error).
    """
    recipe = " ".join((compiler, *flags, *libs, platform.machine(), platform.node()))
    key = hashlib.sha256(source.read_bytes() + recipe.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if not target.exists():

        def compile_to(path: Path) -> None:
            command = [compiler, *flags, str(source), "-o", str(path), *libs]
            subprocess.run(command, check=True, capture_output=True, text=True)

        atomic_file(target, compile_to)
    return ctypes.CDLL(str(target))
