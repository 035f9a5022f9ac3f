"""The values' gradient on CPU: deltahub's kernel (training/kernels.py) against the dense product plus a gather.

For each weight shape (SmolLM2-135M's MLP and attention projections at 512 tokens, the 60M Llama of
train_step.py at 1024) and density, the median time of ``(P^T @ Q)[positions]`` both ways, measured in turn in
this process, and their ratio. ``training/layer.py`` uses the kernel where it wins (``KERNEL_MAX_DENSITY``,
``KERNEL_MIN_NUMEL``).

    python benchmarks/sddmm.py [--threads 2] [--repeats 15]
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
