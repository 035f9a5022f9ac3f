"""The CPU kernel for the values' gradient: a sampled dense-dense product (``csrc/sddmm.c``).

``torch.sparse.sampled_addmm`` on CPU costs about as much as the dense product it samples (measured: 5.7 vs 4.9
ms at 5% density on a 1376 x 512 weight), so without this kernel SFT pays a whole dense weight gradient per
linear layer. The kernel is plain C with OpenMP, compiled once per machine with the system C compiler (about a
second) into ``kernels/`` of deltahub's cache (``$DELTAHUB_CACHE``, else ``~/.cache/deltahub``) and called
through ``ctypes``; where no compiler works, or with ``DELTAHUB_SDDMM_KERNEL=0``, training falls back to
``layer.py``'s torch paths (same values, slower) with one warning.
The library links ``libgomp.so.1``, the soname torch's own OpenMP runtime is already loaded under, so the kernel
runs on torch's thread pool (checked in /proc/self/maps): no second pool spinning against torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import warnings
from pathlib import Path

import torch

from deltahub._cbuild import build_library, find_compiler

SOURCE = Path(__file__).with_name("csrc") / "sddmm.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# The transposed block of the shorter operand (n x tb floats) is sized to stay in a core's L2 cache.
BLOCK_BYTES = 1 << 20

_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
]  # fmt: skip


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None (after one warning) where it cannot be built."""
    if os.environ.get("DELTAHUB_SDDMM_KERNEL", "1") == "0":
        return None
    compiler = find_compiler()
    problem = None
    if compiler is None:
        problem = "no C compiler (cc/gcc) on PATH"
    else:
        try:
            lib = build_library(SOURCE, compiler, FLAGS)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            problem = f"building {SOURCE.name} with {compiler} failed: {detail.strip()[:500]}"
        else:
            lib.deltahub_sddmm_f32.restype = ctypes.c_int
            lib.deltahub_sddmm_f32.argtypes = _ARGTYPES
            return lib
    warnings.warn(
        f"deltahub: the CPU kernel for sparse gradients is unavailable ({problem}); SFT computes the values' "
        "gradients with torch's ops instead (same result, slower). Install a C compiler with OpenMP "
        "(e.g. gcc) to get it, or set DELTAHUB_SDDMM_KERNEL=0 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def sampled_dot(p: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(p^T @ q)[rows, cols]`` for float32 CPU ``p`` (T x n1), ``q`` (T x n2) and int32 positions sorted by row.

    Callers check :func:`library` first.
    """
    p, q = p.contiguous(), q.contiguous()
    tokens, n2 = q.shape
    out = torch.empty(rows.numel(), dtype=torch.float32)
    if tokens == 0:
        return out.zero_()
    tb = max(16, min(tokens, BLOCK_BYTES // (4 * n2) // 16 * 16))
    status = library().deltahub_sddmm_f32(
        p.data_ptr(), p.shape[1], q.data_ptr(), n2, tokens, tb,
        rows.data_ptr(), cols.data_ptr(), rows.numel(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"the SFT gradient kernel could not allocate its {tb}-token blocks")
    return out
