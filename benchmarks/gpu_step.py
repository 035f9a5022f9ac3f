"""Training-step cost on a GPU: sparse fine-tuning (RigL, SM3) against LoRA r=16 and full fine-tuning.

A ~1.1B Llama built from a config (TinyLlama's shape: hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads,
vocab 32000), bf16 weights, bf16 autocast, batch 8 x 1024 tokens, all in this one process: each configuration
is built on the GPU, stepped, measured and freed before the next. The configurations:

  floor            frozen base forward + backward to the inputs (what any adapter must at least pay)
  sft-rigl         SFT, RigL selection, SftAdamW, as many values as LoRA r=16 on all linear layers
  sft-rigl-triton  the same with DELTAHUB_SDDMM_KERNEL=triton (the Triton kernel whatever the rules say)
  sft-sm3          SFT, SM3 selection, SftSM3, same count
  lora             peft LoRA r=16 (alpha 32) on all linear layers, AdamW
  full             full fine-tuning, AdamW

Per configuration: median step time over steps outside RigL's selection windows (SFT runs the default schedule,
R=20, A=5; window steps and the reselection are reported separately), tokens/s, and the peak of
``torch.cuda.max_memory_allocated`` from the built model on, with ratios to LoRA. Goals (issue 10): SFT step
<= 1.1x LoRA's, peak memory <= LoRA's.

    python benchmarks/gpu_step.py [--steps 25] [--configs floor,sft-rigl,...]
    python benchmarks/gpu_step.py --smoke      # a tiny config on the CPU: proves the script runs end to end
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from train_step import (  # benchmarks/ is on sys.path when run as a script
    lora_param_count,
    prepare,
    print_reselection_costs,
)

CONFIGS = ("floor", "sft-rigl", "sft-rigl-triton", "sft-sm3", "lora", "full")
LLAMA_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}
TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build_model(shape: dict, seq: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=seq, tie_word_embeddings=False)
    with device:  # initialised where it will train: a CPU init of 1.1B parameters takes minutes
        model = LlamaForCausalLM(config)
    return model.to(dtype)


class Setup:
    """One configuration: model, optimizer and (for SFT) selector, stepped one update at a time."""

    def __init__(self, name: str, args, device: torch.device):
        self.name, self.args, self.device = name, args, device
        model = build_model(args.shape, args.seq, device, args.dtype)
        base_name = name.removesuffix("-triton")  # the same configuration; run_config sets the kernel switch
        model, self.optimizer, self.selector = prepare(base_name, model, lora_param_count(model))
        self.model = model.train()
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.gen = torch.Generator(device=device).manual_seed(1)
        self.step_count = 0
        self.times = {"normal": [], "window": [], "reselect": []}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        self.step_count += 1
        args = self.args
        batch = torch.randint(
            0, args.shape["vocab_size"], (args.batch, args.seq), generator=self.gen, device=self.device
        )
        selector = self.selector
        in_window = (
            selector is not None
            and selector.config.selection_algorithm == "rigl"
            and selector.schedule.in_window(self.step_count)
        )
        self._sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        t1 = time.perf_counter()
        if selector is not None:
            selector.step()
        self._sync()
        t2 = time.perf_counter()
        if self.step_count <= args.warmup:
            return  # allocator, Triton compilation, first reselection state
        self.times["window" if in_window else "normal"].append(t1 - t0)
        if selector is not None and selector.schedule.is_reselection(self.step_count):
            self.times["reselect"].append(t2 - t1)


def run_config(name: str, args, device: torch.device) -> dict:
    forced = name.endswith("-triton")
    previous = os.environ.get("DELTAHUB_SDDMM_KERNEL")
    if forced:
        os.environ["DELTAHUB_SDDMM_KERNEL"] = "triton"
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        setup = Setup(name, args, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            setup.step()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result = {"trainable": setup.trainable, "times": setup.times, "peak": peak}
    finally:
        if forced:
            if previous is None:
                os.environ.pop("DELTAHUB_SDDMM_KERNEL", None)
            else:
                os.environ["DELTAHUB_SDDMM_KERNEL"] = previous
    del setup
    return result


def report(results: dict, args) -> None:
    med = statistics.median
    tokens = args.batch * args.seq
    lora = results.get("lora")
    lora_step = med(lora["times"]["normal"]) if lora else None
    print(
        f"{args.label}, batch {args.batch}x{args.seq} ({tokens} tokens), {args.steps} steps "
        f"per config (first {args.warmup} warm-up); medians of the steps outside RigL windows"
    )
    print(
        f"{'config':16s} {'trainable':>13s} {'step (s)':>9s} {'tokens/s':>10s} {'vs lora':>8s} "
        f"{'peak mem':>10s} {'vs lora':>8s}"
    )
    for name, r in results.items():
        step = med(r["times"]["normal"])
        vs_lora = f"{step / lora_step:.2f}x" if lora_step else "-"
        if r["peak"] is None:
            peak, peak_vs = "-", "-"
        else:
            peak = f"{r['peak'] / 2**30:.2f} GiB"
            peak_vs = f"{r['peak'] / lora['peak']:.2f}x" if lora and lora["peak"] else "-"
        print(
            f"{name:16s} {r['trainable']:>13,} {step:>9.4f} {tokens / step:>10,.0f} {vs_lora:>8s} {peak:>10s} {peak_vs:>8s}"
        )
    print_reselection_costs(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args.smoke:
        device = torch.device("cpu")
        args.shape, args.batch, args.seq, args.dtype = TINY, 2, 32, torch.float32
        args.warmup, args.label = 2, "smoke: tiny Llama on the CPU, float32 weights + bf16 autocast"
        args.steps = min(args.steps, 7)  # 2 warm-up, 3 in RigL's first window, then the first normal steps
        if not os.environ.get("TRITON_INTERPRET"):  # the forced-Triton config can only run in the interpreter
            args.configs = ",".join(c for c in args.configs.split(",") if not c.endswith("-triton"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run on a GPU machine, or pass --smoke for the CPU rehearsal")
        device = torch.device("cuda")
        args.shape, args.batch, args.seq, args.dtype = LLAMA_1B, 8, 1024, torch.bfloat16
        args.warmup = 3
        args.label = f"Llama ~1.1B on {torch.cuda.get_device_name()}, bf16 weights + bf16 autocast"
    results = {name: run_config(name, args, device) for name in args.configs.split(",")}
    report(results, args)


if __name__ == "__main__":
    main()
