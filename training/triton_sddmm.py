"""The GPU kernel for the values' gradient: a sampled dense-dense product in Triton.

    out[p] = sum_t P[t, r[p]] * Q[t, c[p]]        P: T x n_rows, Q: T x n_cols (token-major, any strides)

i.e. ``(P^T @ Q)`` sampled at k positions, accumulated in float32 from bf16/fp16/fp32 operands, without a dense
``[n_rows, n_cols]`` temporary. How positions share loaded operand blocks:

- The positions are grouped into row blocks of ``block_r`` rows and, inside a block, sorted by column
  (:func:`build_blocks`, cached with the layer's pattern until the positions move). Sorting by column rather
  than by (row, column) keeps a chunk's columns close together, so its gathered loads share 32-byte sectors.
- One program takes one row block and a chunk of up to ``BLOCK_C`` of its positions. Per step of ``BLOCK_T``
  tokens it loads ``A = P[t, r0:r0+block_r]`` (one dense, coalesced tile, shared by all the chunk's positions)
  and ``B = Q[t, cols of the chunk]`` (gathered), and accumulates ``tl.dot(A^T, B)`` ([block_r, BLOCK_C]) on
  tensor cores. At the end each position takes its own row's entry of its column (a masked sum over the row
  axis). The tensor work is ``block_r`` times the sampled work; the gathers are what the kernel pays for.
- ``splits`` programs share one chunk's tokens when there are too few chunks to fill the GPU; their partial
  sums are added in a fixed order afterwards (deterministic, no atomics).

Operands are upcast to float32 in registers before ``tl.dot``. For 16-bit inputs the dot then runs in TF32, which
holds bf16 and fp16 values exactly (so the products are exact and only the float32 accumulation rounds); for
float32 inputs it runs as three TF32 passes ("tf32x3", float32-accurate). Feeding bf16 straight to the tensor
cores would double their throughput, but the kernel is bound by its gathers, not by tensor throughput, and
Triton's interpreter (which the test suite runs this kernel through, ``TRITON_INTERPRET=1`` on CPU tensors)
multiplies bf16 tiles as raw integers, so that variant could not be checked here.

Everything in this module needs ``triton``; import it only after :func:`unavailable` returned None.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Tile sizes. Provisional: chosen by the cost reasoning in docs/training.md ("Training on GPUs"), not yet
# measured on a GPU; benchmarks/sddmm.py --device cuda --sweep times the alternatives.
BLOCK_R = 16  # rows per row block (tl.dot needs >= 16)
BLOCK_C = 64  # positions per program
BLOCK_T = 32  # tokens per step
# Split the tokens over more programs until there are about this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 8 * BLOCK_T


@dataclass(frozen=True)
class Blocks:
    """The positions of one weight ordered for the kernel, and one (row0, start, count) per program.

    ``perm[j]`` is the slot of the j-th position in kernel order; ``rows``/``cols`` (int32) are in kernel order.
    """

    perm: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    programs: torch.Tensor  # int32 [3, n_programs]: first row of the block, first position, position count
    shape: tuple[int, int]
    block_r: int
    block_c: int


def build_blocks(
    indices: torch.Tensor, shape: tuple[int, int], *, block_r: int = BLOCK_R, block_c: int = BLOCK_C
) -> Blocks:
    """Order flat row-major ``indices`` into an ``shape`` matrix for :func:`sampled_dot` (on their device).

    Costs a sort of the k positions and one device-to-host read (the number of programs): done once per set of
    positions, not per step.
    """
    n_rows, n_cols = shape
    indices = indices.to(torch.int64)
    r, c = indices // n_cols, indices % n_cols
    block = r // block_r
    perm = torch.argsort(block * n_cols + c)
    r, c, block = r[perm], c[perm], block[perm]
    n_blocks = -(-n_rows // block_r)
    counts = torch.bincount(block, minlength=n_blocks)
    chunks = (counts + block_c - 1) // block_c
    n_programs = int(chunks.sum())  # the one host read: the grid size
    device = indices.device
    block_of = torch.repeat_interleave(torch.arange(n_blocks, device=device), chunks, output_size=n_programs)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    first_position = torch.cumsum(counts, 0) - counts
    chunk = torch.arange(n_programs, device=device) - first_chunk[block_of]
    start = first_position[block_of] + chunk * block_c
    count = torch.minimum(counts[block_of] - chunk * block_c, torch.tensor(block_c, device=device))
    programs = torch.stack([block_of * block_r, start, count]).to(torch.int32)
    return Blocks(perm, r.to(torch.int32), c.to(torch.int32), programs, (n_rows, n_cols), block_r, block_c)


def _sddmm_kernel(
    p_ptr, q_ptr, out_ptr, rows_ptr, cols_ptr, programs_ptr,
    n_programs, k, tokens, tokens_per_split, n_rows,
    stride_pt, stride_pn, stride_qt, stride_qn,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row0 = tl.load(programs_ptr + pid)
    start = tl.load(programs_ptr + n_programs + pid)
    count = tl.load(programs_ptr + 2 * n_programs + pid)
    lane = tl.arange(0, BLOCK_C)
    valid = lane < count
    rows = tl.load(rows_ptr + start + lane, mask=valid, other=0)
    cols = tl.load(cols_ptr + start + lane, mask=valid, other=0).to(tl.int64)
    block_rows = row0 + tl.arange(0, BLOCK_R)
    a_cols = block_rows.to(tl.int64) * stride_pn
    a_ok = block_rows < n_rows
    b_cols = cols * stride_qn
    t_begin = split * tokens_per_split
    t_end = tl.minimum(tokens, t_begin + tokens_per_split)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        t64 = t.to(tl.int64)
        a = tl.load(
            p_ptr + t64[:, None] * stride_pt + a_cols[None, :], mask=t_ok[:, None] & a_ok[None, :], other=0.0
        )
        b = tl.load(
            q_ptr + t64[:, None] * stride_qt + b_cols[None, :], mask=t_ok[:, None] & valid[None, :], other=0.0
        )
        acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision=PRECISION)
    # each position keeps the entry of its own row: acc[rows[c] - row0, c]
    mine = tl.arange(0, BLOCK_R)[:, None] == (rows - row0)[None, :]
    picked = tl.sum(tl.where(mine, acc, 0.0), axis=0)
    tl.store(out_ptr + split.to(tl.int64) * k + start + lane, picked, mask=valid)


def num_warps(block_r: int) -> int:
    """Warps per program: the [block_r, BLOCK_C] float32 accumulator needs more threads for taller blocks."""
    return 4 if block_r <= 32 else 8


@functools.cache
def _compiled(interpret: bool):
    """The kernel, jitted for the current mode: ``triton.jit`` picks the interpreter when TRITON_INTERPRET is
    set at decoration time, so each mode gets its own (tests switch modes inside one process)."""
    return triton.jit(_sddmm_kernel)


def interpreting() -> bool:
    """Whether ``triton.jit`` builds interpreter functions now (TRITON_INTERPRET; ``triton.knobs`` from 3.3)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _default_splits(n_programs: int, tokens: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-PROGRAMS_PER_SM * sms // max(n_programs, 1))
    return max(1, min(wanted, tokens // MIN_TOKENS_PER_SPLIT))


def sampled_dot(
    p: torch.Tensor, q: torch.Tensor, blocks: Blocks, *, splits: int | None = None, block_t: int = BLOCK_T
) -> torch.Tensor:
    """``(p^T @ q)`` at the positions of ``blocks``, float32, in kernel order (``blocks.perm`` maps to slots).

    ``p`` (T x n_rows) and ``q`` (T x n_cols) are bf16/fp16/fp32 on one device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), any strides. ``splits`` (default: enough to fill the GPU) divides the tokens.
    """
    tokens = p.shape[0]
    k = blocks.rows.numel()
    n_programs = blocks.programs.shape[1]
    if k == 0 or tokens == 0:
        return torch.zeros(k, dtype=torch.float32, device=p.device)
    if splits is None:
        splits = _default_splits(n_programs, tokens, p.device)
    per_split = -(-tokens // splits)
    per_split = -(-per_split // block_t) * block_t
    splits = -(-tokens // per_split)
    out = torch.empty((splits, k), dtype=torch.float32, device=p.device)
    sixteen_bit = (torch.bfloat16, torch.float16)
    precision = "tf32" if p.dtype in sixteen_bit and q.dtype in sixteen_bit else "tf32x3"
    _compiled(interpreting())[(n_programs, splits)](
        p, q, out, blocks.rows, blocks.cols, blocks.programs,
        n_programs, k, tokens, per_split, blocks.shape[0],
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        BLOCK_R=blocks.block_r, BLOCK_C=blocks.block_c, BLOCK_T=block_t, PRECISION=precision,
        num_warps=num_warps(blocks.block_r),
    )  # fmt: skip
    return out[0] if splits == 1 else out.sum(0)
