"""The values' gradient: deltahub's kernels against the dense product plus a gather, on CPU or on a GPU.

CPU (the default): for each weight shape (SmolLM2-135M's MLP and attention projections at 512 tokens, the 60M
Llama of train_step.py at 1024) and density, the median time of ``(P^T @ Q)[positions]`` both ways, measured in
turn in this process, and their ratio. ``training/sddmm.py`` uses the C kernel where it wins
(``KERNEL_MAX_DENSITY``, ``KERNEL_MIN_NUMEL``).

CUDA (``--device cuda``): bf16 operands (``--dtype``), 8192 tokens, the issue's 4096 x 4096 weight and the
projections of a ~1B Llama (hidden 2048, MLP 5632, 4 KV heads); per density the dense product (bf16 tensor
cores, float32 output, then a gather), ``torch.sparse.sampled_addmm`` (cuSPARSE, float32, as the layer calls
it) and the Triton kernel at each row-block height (``--block-r``), with CUDA-event medians, a check of each
result against the dense one, and per shape the crossover: the densest setting where Triton still wins, which
is what ``TRITON_MAX_DENSITY`` / ``TRITON_BLOCK_R`` in ``training/sddmm.py`` should say.

    python benchmarks/sddmm.py [--threads 2] [--repeats 15]
    python benchmarks/sddmm.py --device cuda [--dtype bfloat16] [--tokens 8192] [--block-r 16,32,64,128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = (((1536, 576), 512), ((576, 576), 512), ((192, 576), 512), ((1376, 512), 1024), ((512, 512), 1024))
DENSITIES = (0.01, 0.05, 0.1, 0.15, 0.3)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="bfloat16", help="CUDA operand dtype")
    parser.add_argument("--tokens", type=int, default=8192, help="CUDA token count")
    parser.add_argument("--block-r", default="16,32,64,128", help="CUDA: Triton row-block heights to time")
    args = parser.parse_args()
    if args.device == "cuda":
        cuda_main(args)
        return
    torch.set_num_threads(args.threads)
    from training import kernels

    if kernels.library() is None:
        raise SystemExit("the kernel could not be built here (see the warning above)")
    gen = torch.Generator().manual_seed(0)
    print(f"float32, {args.threads} threads; dense = (P^T @ Q) then index_select; medians of {args.repeats}")
    print(
        f"{'weight':>10s} {'tokens':>6s} {'density':>7s} {'dense ms':>9s} {'kernel ms':>9s} {'speed-up':>8s}"
    )
    for (rows, cols), tokens in SHAPES:
        p, q = torch.randn(tokens, rows, generator=gen), torch.randn(tokens, cols, generator=gen)
        for density in DENSITIES:
            flat = torch.randperm(rows * cols, generator=gen)[: int(density * rows * cols)].sort().values
            r, c = (flat // cols).to(torch.int32), (flat % cols).to(torch.int32)
            dense = median_ms(lambda: (p.t() @ q).view(-1).index_select(0, flat), args.repeats)  # noqa: B023
            kernel = median_ms(lambda: kernels.sampled_dot(p, q, r, c), args.repeats)  # noqa: B023
            print(
                f"{rows:>5d}x{cols:<4d} {tokens:>6d} {density:>7.0%} {dense:>9.2f} {kernel:>9.2f} "
                f"{dense / kernel:>7.2f}x",
                flush=True,
            )


CUDA_SHAPES = ((4096, 4096), (5632, 2048), (2048, 5632), (2048, 2048), (256, 2048))
CUDA_DENSITIES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.03, 0.1)


def cuda_median_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` timed calls with CUDA events (after two warm-up calls: Triton compiles on the
    first)."""
    if not torch.cuda.is_available():  # a rehearsal of this script on the CPU (tests/test_gpu_scripts.py)
        return median_ms(fn, repeats)
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_main(args, device: torch.device | None = None, shapes=CUDA_SHAPES, densities=CUDA_DENSITIES) -> None:
    from training import sddmm, triton_sddmm

    if device is None and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    if sddmm.triton_unavailable():
        raise SystemExit(f"the Triton kernel {sddmm.triton_unavailable()}")
    device = device or torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    block_rs = [int(b) for b in args.block_r.split(",")]
    gen = torch.Generator(device=device).manual_seed(0)
    print(
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else device}, {args.dtype} operands, {args.tokens} tokens; medians of {args.repeats} "
        "(CUDA events); dense = mm(out_dtype=float32) then index_select; sddmm = torch.sparse.sampled_addmm "
        "(float32); triton/Rnn = the Triton kernel with nn-row blocks; 'x' columns: dense time / that time"
    )
    header = f"{'weight':>10s} {'density':>7s} {'dense ms':>9s} {'sddmm':>7s}" + "".join(
        f" {'R' + str(b):>7s}" for b in block_rs
    )
    print(header + f" {'best':>6s} {'x':>6s}")
    crossovers = {}
    for rows, cols in shapes:
        p = torch.randn(args.tokens, rows, device=device, generator=gen).to(dtype)
        q = torch.randn(args.tokens, cols, device=device, generator=gen).to(dtype)
        for density in densities:
            k = int(density * rows * cols)
            flat = torch.randperm(rows * cols, device=device, generator=gen)[:k]
            dense_fn = lambda: sddmm._dense_product(p, q).view(-1).index_select(0, flat)  # noqa: E731, B023
            reference = dense_fn()
            dense = cuda_median_ms(dense_fn, args.repeats)
            pattern = sddmm.Pattern(flat, (rows, cols))
            csr = pattern.csr()

            def sampled():
                if pattern.flipped:  # noqa: B023
                    mat1, mat2 = q.float().t().contiguous(), p.float().t().contiguous().t()  # noqa: B023
                else:
                    mat1, mat2 = p.float().t().contiguous(), q.float().t().contiguous().t()  # noqa: B023
                return torch.sparse.sampled_addmm(csr, mat1, mat2, beta=0.0).values()  # noqa: B023

            try:
                sparse_ms = f"{cuda_median_ms(sampled, args.repeats):7.3f}"
            except RuntimeError as err:  # cuSPARSE refuses some shapes/dtypes
                sparse_ms = "  n/a  "
                print(f"  (sampled_addmm: {str(err)[:100]})")
            triton_ms = {}
            for block_r in block_rs:
                blocks = triton_sddmm.build_blocks(flat, (rows, cols), block_r=block_r)
                got = torch.empty(k, device=device)
                got[blocks.perm] = triton_sddmm.sampled_dot(p, q, blocks)
                error = ((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
                if error > 1e-2:
                    raise SystemExit(
                        f"Triton result off by {error:.2e} (relative) at R={block_r}, {rows}x{cols}"
                    )
                triton_ms[block_r] = cuda_median_ms(
                    lambda b=blocks: triton_sddmm.sampled_dot(p, q, b),  # noqa: B023
                    args.repeats,
                )
            best = min(triton_ms, key=triton_ms.get)
            speedup = dense / triton_ms[best]
            if speedup > 1:
                crossovers[(rows, cols)] = (density, best, speedup)
            print(
                f"{rows:>5d}x{cols:<4d} {density:>7.2%} {dense:>9.3f} {sparse_ms}"
                + "".join(f" {triton_ms[b]:>7.3f}" for b in block_rs)
                + f" {'R' + str(best):>6s} {speedup:>5.2f}x",
                flush=True,
            )
    print("crossover (densest setting where the Triton kernel beats the dense product):")
    for shape in shapes:
        if shape in crossovers:
            density, block_r, speedup = crossovers[shape]
            print(f"  {shape[0]}x{shape[1]}: up to {density:.2%} with R={block_r} ({speedup:.2f}x there)")
        else:
            print(f"  {shape[0]}x{shape[1]}: never, at the densities measured")
    print(
        "training/sddmm.py (provisional): Triton at density <= "
        f"{sddmm.TRITON_MAX_DENSITY:.2%}, numel >= {sddmm.TRITON_MIN_NUMEL:,}, R={sddmm.TRITON_BLOCK_R}"
    )


if __name__ == "__main__":
    main()
