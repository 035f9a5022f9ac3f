"""The values' gradient: the weight gradient ``P^T @ Q`` sampled at the k active positions, and which way
computes it.

Four ways, chosen per call by device, density and size (the rules below), or forced with the environment
variable ``DELTAHUB_SDDMM_KERNEL``:

==========  ==================================================================================================
unset/auto  by device and the measured (CPU) or provisional (CUDA) rules below
``0``       no deltahub kernel: torch's ops (``torch.sparse.sampled_addmm`` or the dense product plus a gather)
``c``       the CPU kernel (``kernels.py``) for every layer on CPU; an error if it cannot be built or on CUDA
``triton``  the Triton kernel (``triton_sddmm.py``) for every layer; on CPU only with ``TRITON_INTERPRET=1``
==========  ==================================================================================================

While RigL gathers selection statistics (``layer.sft_observer`` set) the dense product is always formed and
handed to the observer, whatever the switch says.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from . import kernels
from .errors import SftConfigError

ENV = "DELTAHUB_SDDMM_KERNEL"
CHOICES = ("auto", "0", "c", "triton")

# CPU, measured with benchmarks/sddmm.py on a 2-core Xeon (AVX-512, torch 2.13), 512-1024 tokens: deltahub's C
# kernel is 1.7-2.2x faster than the dense product plus a gather at 5% density on 512x512 to 1536x576 weights,
# 3-3.8x at 1%, even at 10-15%, slower above; no reliable gain on weights under ~256K elements (192x576 at 5%:
# 0.95-1.34x over three runs).
KERNEL_MAX_DENSITY = 0.08
KERNEL_MIN_NUMEL = 1 << 18
# torch.sparse.sampled_addmm where it beats the dense product. CPU, measured (same machine): its transposed
# operand copies cost ~2 ms, so it wins only on weights of 512K+ elements below ~3% density (3.1 vs 5.0 ms at
# 1% on 1376x512; 5.7 vs 4.9 ms at 5%). On CUDA the same numbers are used, unmeasured (provisional), and only
# where Triton is not installed.
SDDMM_MAX_DENSITY = 0.03
SDDMM_MIN_NUMEL = 1 << 19
# CUDA, PROVISIONAL (no GPU has run this yet): the Triton kernel below 0.2% density on weights of 1M+ elements,
# with row blocks of 128 rows; the dense bf16 product (float32 output) elsewhere. From a cost estimate, not a
# measurement (docs/training.md, "Training on GPUs"): the kernel pays ~32 bytes of gathered operand per
# 16 x 16 block of the weight that holds a position, which beats a tensor-core dense product only at low
# densities. `python benchmarks/sddmm.py --device cuda` prints the measured crossover that replaces these.
TRITON_MAX_DENSITY = 0.002
TRITON_MIN_NUMEL = 1 << 20
TRITON_BLOCK_R = 128


def choice() -> str:
    """The validated value of ``DELTAHUB_SDDMM_KERNEL`` (``"auto"`` when unset or empty)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise SftConfigError(
            f"{ENV}={os.environ[ENV]!r} is not a valid choice; use one of auto (the default), 0 (torch's ops), "
            "c (the CPU kernel) or triton (the Triton kernel)"
        )
    return value


@functools.cache  # asked per layer and backward on CUDA; what is installed does not change in a process
def triton_unavailable() -> str | None:
    """Why the Triton kernel cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "needs triton, which is not installed (pip install triton; CUDA builds of torch ship it)"
    return None


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernel on CPU tensors, or None."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_sddmm import interpreting

    if not interpreting():
        return "needs a CUDA device; on cpu set TRITON_INTERPRET=1 as well (Triton's interpreter: exact but slow)"
    if not isinstance(tl.sum, InterpretedFunction):  # triton.language's own helpers were jitted for a GPU
        return (
            "needs TRITON_INTERPRET=1 in the environment before triton is imported (start Python with it set); "
            "it was set later"
        )
    return None


def check(device: torch.device | str) -> None:
    """Raise SftConfigError now if ``DELTAHUB_SDDMM_KERNEL`` forces a kernel that cannot run on ``device``
    (called when a model is prepared, so a wrong switch fails before training starts)."""
    kind = torch.device(device).type
    forced = choice()
    if forced == "triton":
        problem = triton_unavailable() or (None if kind == "cuda" else interpreter_problem())
        if problem:
            raise SftConfigError(f"{ENV}=triton forces the Triton kernel, which {problem}; or unset {ENV}")
    elif forced == "c":
        if kind != "cpu":
            raise SftConfigError(
                f"{ENV}=c forces the CPU kernel, but the model is on {kind}; unset it (or use triton on CUDA)"
            )
        if kernels.library() is None:
            raise SftConfigError(
                f"{ENV}=c forces the CPU kernel, which could not be built here (see the warning above); install "
                f"a C compiler with OpenMP (e.g. gcc) or unset {ENV}"
            )


def _way(forced: str, device: str, k: int, numel: int) -> str:
    """Which way computes the sampled product: "c", "triton", "sampled_addmm" or "dense"."""
    if forced in ("c", "triton"):
        check(device)
        return forced
    if device == "cpu":
        if (
            forced == "auto"
            and k <= KERNEL_MAX_DENSITY * numel
            and numel >= KERNEL_MIN_NUMEL
            and kernels.library() is not None
        ):
            return "c"
    elif device == "cuda":
        if (
            forced == "auto"
            and k <= TRITON_MAX_DENSITY * numel
            and numel >= TRITON_MIN_NUMEL
            and triton_unavailable() is None
        ):
            return "triton"
    else:  # mps, xpu, meta, ...: the dense product always works
        return "dense"
    if k <= SDDMM_MAX_DENSITY * numel and numel >= SDDMM_MIN_NUMEL:
        return "sampled_addmm"
    return "dense"


def values_grad(layer, gy: torch.Tensor, x2d: torch.Tensor, compute_dtype: torch.dtype | None = None):
    """dL/dvalues = (dL/dW)[active positions], float32, in slot order.

    ``dL/dW`` is ``gy^T @ x`` for ``[out, in]`` weights and ``x^T @ gy`` for transposed ones (``Conv1D``).
    ``compute_dtype`` is autocast's dtype in the forward: on CUDA the operands are cast to it, as autocast's own
    backward of a linear layer would (CPU keeps its float32 products, as measured and tested).
    """
    p, q = (x2d, gy) if layer.sft_transposed else (gy, x2d)  # token-major: dL/dW = p^T @ q
    device = p.device.type
    if device == "cuda" and compute_dtype is not None:
        p, q = p.to(compute_dtype), q.to(compute_dtype)
    observer = layer.sft_observer
    if observer is None:
        way = _way(choice(), device, layer.sft_indices.numel(), layer.weight.numel())
        if way == "triton":
            from . import triton_sddmm

            block_r = triton_sddmm.BLOCK_R if device != "cuda" else TRITON_BLOCK_R
            blocks = layer.sft_pattern().triton_blocks(block_r)
            return _to_slot_order(triton_sddmm.sampled_dot(p, q, blocks), blocks.perm)
        p, q = p.to(torch.float32), q.to(torch.float32)
        if way == "c":
            pattern = layer.sft_pattern()
            # the kernel samples P^T @ Q from token-major operands; a flipped pattern samples (P^T @ Q)^T
            a, b = (q, p) if pattern.flipped else (p, q)
            return _to_slot_order(kernels.sampled_dot(a, b, *pattern.int32()), pattern.perm)
        if way == "sampled_addmm":
            pattern = layer.sft_pattern()
            # sampled_addmm's CPU kernel reads its second operand column by column: a column-major view
            if pattern.flipped:  # sample (p^T @ q)^T = q^T @ p
                mat1, mat2 = q.t().contiguous(), p.t().contiguous().t()
            else:
                mat1, mat2 = p.t().contiguous(), q.t().contiguous().t()
            sampled = torch.sparse.sampled_addmm(pattern.csr(), mat1, mat2, beta=0.0).values()
            return _to_slot_order(sampled, pattern.perm)
    dense = _dense_product(p, q)
    if observer is not None:
        observer(dense)
    return dense.view(-1).index_select(0, layer.sft_indices)


def _dense_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p^T @ q`` in float32. On CUDA, 16-bit operands go to the tensor cores as they are, with float32
    accumulation and output (upcasting first would make it a float32 GEMM, ~16x slower); elsewhere float32."""
    if p.device.type == "cuda" and p.dtype == q.dtype and p.dtype in (torch.bfloat16, torch.float16):
        if _mm_has_out_dtype():
            return torch.mm(p.t(), q, out_dtype=torch.float32)
        return (p.t() @ q).to(torch.float32)  # torch < 2.8: float32 accumulation, output rounded to 16 bits
    return p.t().to(torch.float32) @ q.to(torch.float32)


@functools.cache
def _mm_has_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=...)`` (2.8+), asked on shapes only."""
    meta = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(meta, meta, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _to_slot_order(sampled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(sampled)
    out[perm] = sampled
    return out


class Pattern:
    """The active positions of one weight, in the orders the sampled products want (each built on first use,
    cached by the layer until the positions move).

    The row-major order (CPU kernel, sampled_addmm) is sorted along the longer side of the weight (``flipped``:
    the [cols, rows] view): the kernels walk the positions row by row and run fastest with more, shorter rows
    (measured on a 2-core Xeon: half the time for 512 x 1376 weights). ``perm`` maps that order to slots.
    """

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int]):
        self.indices, self.matrix_shape = indices, shape
        self._row_major = self._int32 = self._csr = None
        self._blocks = {}

    def _sorted(self) -> tuple:
        if self._row_major is None:
            rows, cols = self.matrix_shape
            flipped = cols > rows
            r, c = self.indices // cols, self.indices % cols
            if flipped:
                rows, cols, r, c = cols, rows, c, r
            perm = torch.argsort(r * cols + c)
            self._row_major = (perm, r[perm], c[perm], (rows, cols), flipped)
        return self._row_major

    @property
    def perm(self) -> torch.Tensor:
        return self._sorted()[0]

    @property
    def rows(self) -> torch.Tensor:
        return self._sorted()[1]

    @property
    def cols(self) -> torch.Tensor:
        return self._sorted()[2]

    @property
    def shape(self) -> tuple[int, int]:
        return self._sorted()[3]

    @property
    def flipped(self) -> bool:
        return self._sorted()[4]

    def int32(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._int32 is None:
            self._int32 = (self.rows.to(torch.int32), self.cols.to(torch.int32))
        return self._int32

    def csr(self) -> torch.Tensor:
        if self._csr is None:
            n_rows = self.shape[0]
            crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=self.rows.device)
            torch.cumsum(torch.bincount(self.rows, minlength=n_rows), 0, out=crow[1:])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                self._csr = torch.sparse_csr_tensor(
                    crow, self.cols, torch.zeros(self.rows.numel(), device=self.rows.device), self.shape
                )
        return self._csr

    def triton_blocks(self, block_r: int):
        """The Triton kernel's order (row blocks of ``block_r`` rows of the unflipped weight, columns sorted
        inside each) and its per-program metadata."""
        if block_r not in self._blocks:
            from .triton_sddmm import build_blocks

            self._blocks[block_r] = build_blocks(self.indices, self.matrix_shape, block_r=block_r)
        return self._blocks[block_r]
