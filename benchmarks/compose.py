"""Load-time composition cost: load_model(base, 3 deltas) versus from_pretrained alone, in process and as whole
processes, for time and peak memory.

A ~100M-parameter bf16 Llama built from a config (hidden 768, intermediate 2048, 8 layers, vocab 32000, untied)
and two sets of three deltas with 1% density, bf16 values:

* ``every matrix``: every 2-D weight, the input embedding and the LM head included (the issue's setup);
* ``linear layers``: the attention and MLP projections only, what SFT trains by default (``target_modules``).

transformers (5.x) memory-maps safetensors lazily, so ``from_pretrained`` alone reads almost nothing; a plain
load pays for its weights in its first forward pass. So the fair comparison is "ready": load plus a first
forward. Printed, medians over --repeats with same-run ratios (the machine is shared):

1. in process, the two paths alternating: ready time of each, the composition's added time per nonzero
   ((composed - plain) / nnz; also for the lazy loads without a forward, which charges the composition for
   reading the weights the deltas touch), and revert time;
2. whole processes (``python -c``, fresh interpreter each, measured by ``child.measure``): wall time and peak
   RSS of load + first forward, plain versus composed.

    python benchmarks/compose.py [--repeats 7] [--workdir /tmp/deltahub-bench-compose]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from child import measure
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from deltahub import ParamDelta, SparseDelta, load_delta, load_model, save_delta
from deltahub.fingerprint import fingerprint_of

DENSITY = 0.01
N_DELTAS = 3
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETS = {"every matrix": "delta", "linear layers": "linear-delta"}

_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
base, deltas = sys.argv[1], sys.argv[2:]
if deltas:
    import deltahub
    model = deltahub.load_model(base, deltas, dtype=torch.bfloat16)
else:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4]]))
"""


def build(workdir: Path) -> tuple[Path, dict[str, list[Path]]]:
    base_dir = workdir / "base"
    sets = {label: [workdir / f"{stem}-{i}" for i in range(N_DELTAS)] for label, stem in SETS.items()}
    done = workdir / "built-v2"
    if done.exists():
        return base_dir, sets
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
    for label, dirs in sets.items():
        matrices = [n for n, p in state.items() if p.dim() == 2]
        if label == "linear layers":
            matrices = [n for n in matrices if n.split(".")[-2] in LINEAR]
        for i, out in enumerate(dirs):
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
    done.touch()
    return base_dir, sets


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
    base_dir, sets = build(args.workdir)
    n_params = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).parameters()
    )
    print(
        f"model: {n_params / 1e6:.1f}M parameters, bf16; {N_DELTAS} deltas of {DENSITY:.0%} density; "
        f"{args.repeats} repeats; torch threads {torch.get_num_threads()} (machine shared with other work)"
    )
    for label, delta_dirs in sets.items():
        report(label, base_dir, delta_dirs, args.repeats)


def report(label: str, base_dir: Path, delta_dirs: list[Path], repeats: int) -> None:
    med = statistics.median
    runs = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    prompt = torch.tensor([[1, 2, 3, 4]])

    def ready(model):
        with torch.no_grad():
            model(prompt)
        return model

    deltas = [load_delta(d) for d in delta_dirs]
    nnz = sum(d.nnz for d in deltas)
    disk = sum(f.stat().st_size for d in delta_dirs for f in d.glob("*.safetensors"))
    del deltas
    print(f"\n== {label}: {nnz:,} nonzeros, {disk / nnz:.3f} bytes per nonzero in .safetensors")

    plain, plain_ready, composed, composed_ready, reverts, delta_load = [], [], [], [], [], []
    for _ in range(repeats):
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
    print("in process:")
    print(f"  from_pretrained + 1st forward  median {med(plain_ready):.3f} s  (runs: {runs(plain_ready)})")
    print(
        f"  load_model + 1st forward       median {med(composed_ready):.3f} s  (runs: {runs(composed_ready)})"
    )
    print(f"    ratio                        {med(composed_ready) / med(plain_ready):.3f}x")
    added = (med(composed_ready) - med(plain_ready)) / nnz * 1e9
    lazy = (med(composed) - med(plain)) / nnz * 1e9
    print(f"    added time per nonzero       {added:.1f} ns (goal <= 40)")
    print(
        f"  lazy loads (no forward): from_pretrained {med(plain):.3f} s, load_model {med(composed):.3f} s: "
        f"{lazy:.1f} ns per nonzero, reading the touched weights included"
    )
    print(
        f"  load_delta x{N_DELTAS}: median {med(delta_load) * 1e3:.1f} ms; revert: median {med(reverts) * 1e3:.1f} ms"
    )

    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    plain_proc, composed_proc = [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        plain_proc.append(measure([sys.executable, "-c", _CHILD, str(base_dir)], env))
        composed_proc.append(
            measure([sys.executable, "-c", _CHILD, str(base_dir), *map(str, delta_dirs)], env)
        )
    pw, pr = med(w for w, _ in plain_proc), med(r for _, r in plain_proc)
    cw, cr = med(w for w, _ in composed_proc), med(r for _, r in composed_proc)
    print("whole process (python -c: import, load, 1st forward):")
    print(f"  plain     wall {pw:.3f} s  peak RSS {pr / 2**20:.0f} MiB")
    print(f"  composed  wall {cw:.3f} s  peak RSS {cr / 2**20:.0f} MiB")
    print(f"    ratios  wall {cw / pw:.3f}x (goal <= 1.05)  peak RSS {cr / pr:.3f}x (goal <= 1.10)")


if __name__ == "__main__":
    main()
