"""Two ways to put the sparse values into an FSDP2-sharded weight, against DDP, on 2 CPU processes (gloo).

  ddp           every rank holds the whole base (DistributedDataParallel), the reference point
  shard-write   deltahub's design (training/fsdp.py): each rank writes base + values into its own row shard
                when the values change (once per optimizer step); the all-gathered weight is already right
  gather-add    the alternative: the shards hold the pure base and every layer adds the values to the gathered
                weight after each all-gather, in forward and again in backward (FSDP re-gathers there)

A Llama of hidden 256, 4 layers, intermediate 688, vocab 2048 (4.2M parameters, fp32), 1% density RigL
(``--density``),
batch 4 x 128 tokens per rank, 2 micro-batches per step, the default reselection schedule (R=20, A=5, so
some steps fall in RigL windows). Each configuration runs in a fresh ``torchrun`` launch (clean peak RSS);
step time is the median over the measured steps of rank 0. Every write of ``base + values`` into a weight is
counted and timed: that is where the designs differ, and on a shared machine the step times are too noisy to
resolve it. The run also checks that the two FSDP designs end with the same delta (they compute the same
thing).

    python benchmarks/fsdp_step.py [--steps 30] [--repeats 2] [--density 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

MODES = ("ddp", "shard-write", "gather-add")
BATCH, SEQ, MICRO, WARMUP = 4, 128, 2, 3


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class WriteTimer:
    """Counts and times every write of ``base + values`` into a weight (a shard or a gathered copy): the cost
    that differs between the designs, measured directly (step times on a shared machine are too noisy to
    resolve it)."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.count += 1

        return wrapper


def install_gather_add(model, timer: WriteTimer) -> None:
    """Switch a sharded model to the alternative design (b)."""
    import torch

    import training.fsdp as fsdp
    import training.layer as layer_module

    shard_write = fsdp.write

    def write(weight, positions, values):
        if not fsdp.is_sharded(weight):
            shard_write(weight, positions, values)  # reselection's writes; the shards keep the pure base

    fsdp.write = write

    @timer.timed
    def add_values(self):
        with torch.no_grad():
            effective = self.sft_base.float() + self.sft_values.detach().float()
            self.weight.view(-1).index_copy_(0, self.sft_indices, effective.to(self.weight.dtype))

    def sync(self):
        if not fsdp.is_sharded(self.weight):  # between all-gathers there is nothing to do
            add_values(self)

    for layer in model.sft_layers.values():
        layer.sft_sync = types.MethodType(sync, layer)
        layer.__dict__["sft_shard"] = None
    backward = layer_module._SparseDeltaLinear.backward

    def backward_after_add(ctx, grad_out):
        ctx.layer.sft_sync()  # FSDP re-gathered the pure base for backward: add the values again
        return backward(ctx, grad_out)

    layer_module._SparseDeltaLinear.backward = staticmethod(backward_after_add)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, steps: int, density: float, out: Path) -> None:
    import torch
    import torch.distributed as dist

    import deltahub
    from training import SftAdamW, SftConfig, SftSelector, get_sft_model
    from training.fsdp import resident_bytes, shard_sft_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    import training.fsdp as fsdp

    model = get_sft_model(build_model(), SftConfig(density=density))
    forward = model
    timer = WriteTimer()
    if mode == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
    else:
        shard_sft_model(model)
    if mode == "gather-add":
        install_gather_add(model, timer)
    else:
        fsdp.write = timer.timed(fsdp.write)  # the layers' value writes (sft_sync -> sft_write -> write)
    held = resident_bytes(model)
    optimizer = SftAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    selector = SftSelector(
        forward, optimizer, total_update_steps=WARMUP + steps, grad_accumulation_steps=MICRO
    )
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(WARMUP + steps):
        if step == WARMUP:
            timer.count, timer.seconds = 0, 0.0
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(MICRO):
            batch = torch.randint(0, 2048, (BATCH, SEQ), generator=gen)
            (forward(input_ids=batch, labels=batch).loss / MICRO).backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    rss = torch.tensor([peak_rss_mb()], dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        deltahub.save_delta(model.to_delta(), out / f"{mode}-delta", overwrite=True)
        result = {
            "step_s": statistics.median(times),
            "peak_rss_mb": float(rss),
            "base_bytes": held["base"],
            "full_base_bytes": held["full_base"],
            "writes_per_step": timer.count / steps,
            "write_ms_per_step": timer.seconds / steps * 1000,
            "steps": steps,
        }
        (out / f"{mode}.json").write_text(json.dumps(result))
    dist.barrier()  # leave together: a rank tearing gloo down while another still writes can hang the exit
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.density, args.out)
        return
    import torch

    import deltahub

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for _ in range(args.repeats):
            for mode in MODES:  # interleaved, so shared-machine noise hits every mode alike
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                ]
                command += [__file__, "--worker", mode, "--steps", str(args.steps), "--out", str(out)]
                command += ["--density", str(args.density)]
                subprocess.run(command, check=True, env=env, capture_output=True, timeout=1800)
                results[mode].append(json.loads((out / f"{mode}.json").read_text()))
        a, b = deltahub.load_delta(out / "shard-write-delta"), deltahub.load_delta(out / "gather-add-delta")
        same_positions = all(torch.equal(a[n].indices, b[n].indices) for n in a)
        max_diff = max(float((a[n].values - b[n].values).abs().max()) for n in a)
    floor = statistics.median(r["step_s"] for r in results["ddp"])
    print(
        f"{'mode':12} {'step (median)':>14} {'vs ddp':>7} {'peak RSS/rank':>14} {'base bytes/rank':>17} "
        f"{'value writes/step':>18} {'their time/step':>16}"
    )
    for mode in MODES:
        runs = results[mode]
        step = statistics.median(r["step_s"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        write_ms = statistics.median(r["write_ms_per_step"] for r in runs)
        last = runs[-1]
        share = last["base_bytes"] / last["full_base_bytes"]
        print(
            f"{mode:12} {step * 1000:11.1f} ms {step / floor:6.2f}x {rss:11.0f} MB "
            f"{last['base_bytes'] / 2**20:8.1f} MiB ({share:.0%}) {last['writes_per_step']:18.0f} "
            f"{write_ms:10.3f} ms ({write_ms / 1000 / step:.2%})"
        )
    print(
        f"shard-write vs gather-add deltas: same positions {same_positions}, max |value difference| {max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
