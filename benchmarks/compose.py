"""Load-time composition cost: (from_pretrained + apply 3 deltas) versus from_pretrained alone.

A ~100M-parameter bf16 Llama built from a config (hidden 768, intermediate 2048, 8 layers, vocab 32000, untied)
and three deltas touching 1% of every weight matrix (bf16 values). Both paths are timed alternately in this one
process; medians over --repeats runs and their ratio are printed, plus revert time and bytes on disk per nonzero.

transformers (5.x) memory-maps safetensors lazily, so ``from_pretrained`` alone reads almost nothing: it is
also timed up to the end of a first forward pass ("ready"), which is when a plain load has paid for its
weights too. Both ratios are printed.

    python benchmarks/compose.py [--repeats 7] [--workdir /tmp/deltahub-bench-compose]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from deltahub import ParamDelta, SparseDelta, load_delta, load_model, save_delta
from deltahub.fingerprint import fingerprint_of

DENSITY = 0.01
N_DELTAS = 3


def build(workdir: Path) -> tuple[Path, list[Path]]:
    base_dir = workdir / "base"
    delta_dirs = [workdir / f"delta-{i}" for i in range(N_DELTAS)]
    if (base_dir / "config.json").exists() and all((d / "delta_config.json").exists() for d in delta_dirs):
        return base_dir, delta_dirs
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir)
    state = dict(model.named_parameters())
    matrices = [n for n, p in state.items() if p.dim() == 2]
    for i, out in enumerate(delta_dirs):
        gen = torch.Generator().manual_seed(i)
        params = {}
        for name in matrices:
            p = state[name]
            k = int(DENSITY * p.numel())
            idx = torch.randperm(p.numel(), generator=gen)[:k].sort().values
            params[name] = ParamDelta(
                idx, (torch.randn(k, generator=gen) * 1e-2).to(torch.bfloat16), tuple(p.shape), p.dtype
            )
        save_delta(
            SparseDelta(params, base_model=str(base_dir), fingerprint=fingerprint_of(state, matrices)),
            out,
            overwrite=True,
        )
    return base_dir, delta_dirs


def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deltahub-bench-compose"
    )
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    base_dir, delta_dirs = build(args.workdir)
    n_params = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).parameters()
    )

    prompt = torch.tensor([[1, 2, 3, 4]])

    def ready(model):
        with torch.no_grad():
            model(prompt)
        return model

    plain, plain_ready, composed, composed_ready, reverts, delta_load = [], [], [], [], [], []
    for _ in range(args.repeats):
        t, _ = timed(lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16))
        plain.append(t)
        t, _ = timed(lambda: ready(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)))
        plain_ready.append(t)
        t, _ = timed(lambda: load_model(str(base_dir), delta_dirs, dtype=torch.bfloat16))
        composed.append(t)
        t, m = timed(lambda: ready(load_model(str(base_dir), delta_dirs, dtype=torch.bfloat16)))
        composed_ready.append(t)
        t, _ = timed(m.applied_deltas.revert)
        reverts.append(t)
        del m
        t, _ = timed(lambda: [load_delta(d) for d in delta_dirs])
        delta_load.append(t)

    deltas = [load_delta(d) for d in delta_dirs]
    nnz = sum(d.nnz for d in deltas)
    disk = sum(f.stat().st_size for d in delta_dirs for f in d.glob("*.safetensors"))
    disk_all = sum(f.stat().st_size for d in delta_dirs for f in d.iterdir() if f.is_file())
    med = statistics.median
    runs = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(
        f"model: {n_params / 1e6:.1f}M parameters, bf16; {N_DELTAS} deltas, {nnz:,} nonzeros in all "
        f"({DENSITY:.0%} of every matrix), {args.repeats} repeats, torch threads {torch.get_num_threads()}"
    )
    print(f"from_pretrained alone (lazy)   median {med(plain):.3f} s  (runs: {runs(plain)})")
    print(f"load_model with 3 deltas       median {med(composed):.3f} s  (runs: {runs(composed)})")
    print(f"  ratio (goal <= 1.10)         {med(composed) / med(plain):.2f}x")
    print(f"from_pretrained + 1st forward  median {med(plain_ready):.3f} s  (runs: {runs(plain_ready)})")
    print(
        f"load_model + 1st forward       median {med(composed_ready):.3f} s  (runs: {runs(composed_ready)})"
    )
    print(f"  ratio (goal <= 1.10)         {med(composed_ready) / med(plain_ready):.2f}x")
    extra = med(composed) - med(plain)
    print(
        f"  added time per nonzero       {extra / nnz * 1e9:.0f} ns (load_delta x3: median {med(delta_load):.3f} s)"
    )
    print(f"revert                         median {med(reverts) * 1e3:.1f} ms")
    print(
        f"bytes per nonzero (goal <= 6)  {disk / nnz:.3f} in .safetensors; {disk_all / nnz:.3f} with config and card"
    )


if __name__ == "__main__":
    main()
