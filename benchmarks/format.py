"""Format 1.1 on disk: bytes per nonzero at several densities, and what decoding costs against loading.

For each density, a delta over eight 2048 x 2048 matrices (33.5M elements) with uniformly random positions (the
hardest case for gap coding: real deltas cluster, which only shortens gaps) is saved with float32 and with
bfloat16 values. Printed per row: the storage the writer chose, bytes per nonzero of the .safetensors file(s)
(headers included) next to format 1.0's (int32 index + value), the information floor of the positions
(log2 C(numel, nnz) / nnz bits), and medians over --repeats of save_delta, load_delta, and the position
decoding alone inside load_delta. The 1.0 files are written in this process with the same writer code and
``sparse`` storage, so both formats are loaded by the same reader in one run.

Then the cost of ``save_delta(..., values_dtype="bfloat16")`` for a float32 delta (values ~N(0, 1e-3) on base
weights ~N(0, 0.02), as in benchmarks/compose.py): the largest relative error of a stored value, and how many
applied weights (base + delta, rounded once) come out different from applying the exact delta, for a bf16 and
a float32 base.

    python benchmarks/format.py [--repeats 5] [--densities 0.001,0.01,0.1,0.3]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deltahub import ParamDelta, SparseDelta, load_delta, save_delta
from deltahub.format import encoding

SHAPE = (2048, 2048)
MATRICES = 8


def make_delta(density: float, values_dtype: torch.dtype, seed: int = 0) -> SparseDelta:
    gen = np.random.default_rng(seed)
    numel = math.prod(SHAPE)
    k = int(numel * density)
    params = {}
    for i in range(MATRICES):
        idx = np.sort(gen.choice(numel, size=k, replace=False)).astype(np.int32)
        vals = torch.from_numpy(gen.standard_normal(k, dtype=np.float32) * 1e-3).to(values_dtype)
        params[f"model.layers.{i}.mlp.down_proj.weight"] = ParamDelta(
            torch.from_numpy(idx), vals, SHAPE, torch.bfloat16
        )
    return SparseDelta(params, base_model="bench/base")


def floor_bits(numel: int, k: int) -> float:
    """log2 of the number of k-subsets of numel positions, per position."""
    return (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2) / k


def save_v1_0(delta: SparseDelta, folder: Path) -> None:
    """The same delta in format 1.0's layout (every parameter ``sparse``), through the current writer."""
    original = encoding.choose_storage
    encoding.choose_storage = lambda positions, numel: ("sparse", encoding.index_code(numel))
    try:
        save_delta(delta, folder, overwrite=True)
    finally:
        encoding.choose_storage = original


def file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def decode_time(delta: SparseDelta) -> float:
    """Seconds to decode the positions of ``delta`` from the storage the writer chooses (after the checks)."""
    total = 0.0
    for p in delta.values():
        positions = p.indices.numpy()
        storage, code = encoding.choose_storage(positions, p.numel)
        if storage == "gaps":
            gaps, escapes = encoding.encode_gaps(positions, p.numel, code)
            total += timed(lambda g=gaps, e=escapes, n=p.numel: encoding.decode_gaps(g, e, n))
        elif storage == "bitmap":
            bitmap = encoding.encode_bitmap(positions, p.numel)
            total += timed(lambda b=bitmap, n=p.numel, k=p.nnz: encoding.decode_bitmap(b, n, k))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--densities", default="0.001,0.003,0.01,0.03,0.1,0.3")
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    numel = math.prod(SHAPE) * MATRICES
    med = statistics.median
    print(
        f"{MATRICES} x {SHAPE[0]}x{SHAPE[1]} ({numel / 1e6:.1f}M elements), uniform random positions, "
        f"medians of {args.repeats}; torch threads {torch.get_num_threads()} (shared machine)"
    )
    print(
        f"{'density':>8s} {'values':>8s} {'storage':>10s} {'B/nnz 1.1':>10s} {'B/nnz 1.0':>10s} "
        f"{'floor b/pos':>11s} {'save s':>8s} {'load 1.1':>9s} {'load 1.0':>9s} {'decode':>8s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for density in densities:
            for values_dtype in (torch.bfloat16, torch.float32):
                delta = make_delta(density, values_dtype)
                nnz = delta.nnz
                new, old = Path(tmp) / "v11", Path(tmp) / "v10"
                save = functools.partial(save_delta, delta, new, overwrite=True)
                saves = [timed(save) for _ in range(args.repeats)]
                save_v1_0(delta, old)
                loads_new, loads_old = [], []
                for _ in range(args.repeats):  # alternate, so both see the same machine load
                    loads_new.append(timed(load_delta, new))
                    loads_old.append(timed(load_delta, old))
                decodes = [decode_time(delta) for _ in range(args.repeats)]
                assert load_delta(new).equal(delta)
                p = next(iter(delta.values()))
                storage, code = encoding.choose_storage(p.indices.numpy(), p.numel)
                label = f"{storage}:{code}" if storage != "dense" else storage
                print(
                    f"{density:8.3%} {str(values_dtype).removeprefix('torch.'):>8s} {label:>10s} "
                    f"{file_bytes(new) / nnz:10.3f} {file_bytes(old) / nnz:10.3f} "
                    f"{floor_bits(p.numel, p.nnz):11.2f} {med(saves):8.3f} {med(loads_new):9.3f} "
                    f"{med(loads_old):9.3f} {med(decodes):8.3f}",
                    flush=True,
                )
        rounding_cost(Path(tmp))


def rounding_cost(tmp: Path) -> None:
    from deltahub import apply_deltas

    delta = make_delta(0.01, torch.float32, seed=1)
    rounded = load_delta(save_delta(delta, tmp / "bf16", values_dtype="bfloat16", overwrite=True))
    relative = max(
        float(((rounded[n].values.float() - p.values).abs() / p.values.abs().clamp_min(1e-30)).max())
        for n, p in delta.items()
    )
    print(f"\nvalues_dtype=bfloat16 for a float32 delta: largest relative error of a value {relative:.2e}")
    gen = torch.Generator().manual_seed(2)
    for base_dtype in (torch.bfloat16, torch.float32):
        base = {n: (torch.randn(SHAPE, generator=gen) * 0.02).to(base_dtype) for n in delta}
        exact = {n: t.clone() for n, t in base.items()}
        approx = {n: t.clone() for n, t in base.items()}
        apply_deltas(exact, [delta], force=True)
        apply_deltas(approx, [rounded], force=True)
        changed = sum(int((exact[n] != approx[n]).sum()) for n in delta)
        worst = max(float((exact[n].float() - approx[n].float()).abs().max()) for n in delta)
        print(
            f"  {str(base_dtype).removeprefix('torch.')} base: {changed / delta.nnz:.2%} of the {delta.nnz:,} "
            f"touched weights differ from the exact delta's, by at most {worst:.2e}"
        )


if __name__ == "__main__":
    main()
