"""Training-step cost of sparse fine-tuning against the floor, LoRA and full fine-tuning.

A ~60M Llama built from a config (hidden 512, 8 layers, intermediate 1376, vocab 32000), fp32, batch 4 x 256
tokens, 2 threads. Step times come from one process that steps every configuration in turn (shared-machine
noise then hits all of them alike); peak RSS from a separate fresh process per configuration. The
configurations:

  floor      frozen base forward + backward to the inputs (what any adapter must at least pay)
  sft-rigl   SFT, RigL selection, same trainable count as LoRA r=16 on all linear layers
  sft-sm3    SFT, SM3 selection (SftSM3), same count
  lora       peft LoRA r=16 on all linear layers, AdamW
  full       full fine-tuning, AdamW

SFT runs the default schedule (R=20, A=5): step times are split into steps outside selection windows, steps
inside RigL windows (dense gradient observed), and the reselection call itself; the amortised reselection cost
is (window extra + reselection) per R steps over R normal steps.

    python benchmarks/train_step.py [--steps 30] [--threads 2] [--configs floor,sft-rigl,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("floor", "sft-rigl", "sft-sm3", "lora", "full")
BATCH, SEQ = 4, 256


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lora_param_count(model, r: int = 16) -> int:
    """LoRA rank r's trainable count on every linear layer but the LM head (peft's "all-linear")."""
    head = model.get_output_embeddings()
    return sum(
        r * (m.in_features + m.out_features)
        for m in model.modules()
        if type(m).__name__ == "Linear" and m is not head
    )


def prepare(name: str, model, lora_count: int):
    """Make ``model`` trainable as configuration ``name``; returns (model, optimizer or None, selector or None)."""
    import torch

    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward runs through every layer, no weight gradients
        return model, None, None
    if name.startswith("sft"):
        from training import SftAdamW, SftConfig, SftSelector, SftSM3, get_sft_model

        algorithm = name.split("-")[1]
        model = get_sft_model(model, SftConfig(num_tunable_weights=lora_count, selection_algorithm=algorithm))
        params = [p for p in model.parameters() if p.requires_grad]
        if algorithm == "sm3":
            optimizer = SftSM3(params, model.active_deltas(), lr=0.1)
        else:
            optimizer = SftAdamW(params, lr=1e-3)
        return model, optimizer, SftSelector(model, optimizer, total_update_steps=1000)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        )
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), None
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5), None


def print_reselection_costs(results: dict, goal: str = "") -> None:
    """Per SFT configuration: window step, reselection, and their cost amortised over the default schedule
    (per R=20 steps: A=5 window steps, RigL only, and one reselection, over 20 normal steps)."""
    med = statistics.median
    for name, r in results.items():
        if not name.startswith("sft"):
            continue
        normal = med(r["times"]["normal"])
        window = med(r["times"]["window"]) if r["times"]["window"] else normal
        reselect = med(r["times"]["reselect"]) if r["times"]["reselect"] else 0.0
        extra = (5 * (window - normal) if name.startswith("sft-rigl") else 0.0) + reselect
        print(
            f"{name}: window step {window:.4f} s, reselection {reselect:.4f} s -> amortised reselection cost "
            f"{extra / (20 * normal):.1%} of training time{goal}"
        )


class Setup:
    """One configuration: its model, optimizer and (for SFT) selector, stepped one update at a time."""

    def __init__(self, name: str):
        import torch

        self.name = name
        model = build_model()
        self.lora_count = lora_param_count(model)
        model, self.optimizer, self.selector = prepare(name, model, self.lora_count)
        self.model = model.train()
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.gen = torch.Generator().manual_seed(1)
        self.step_count = 0
        self.times = {"normal": [], "window": [], "reselect": []}

    def step(self) -> None:
        import torch

        self.step_count += 1
        batch = torch.randint(0, 32000, (BATCH, SEQ), generator=self.gen)
        selector = self.selector
        in_window = (
            selector is not None
            and selector.config.selection_algorithm == "rigl"
            and selector.schedule.in_window(self.step_count)
        )
        t0 = time.perf_counter()
        self.model(input_ids=batch, labels=batch).loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        if selector is not None:
            selector.step()
        t2 = time.perf_counter()
        if self.step_count <= 2:
            return  # warm-up (allocator, first reselection state)
        self.times["window" if in_window else "normal"].append(t1 - t0)
        if selector is not None and selector.schedule.is_reselection(self.step_count):
            self.times["reselect"].append(t2 - t1)


def memory_worker(name: str, steps: int, threads: int) -> dict:
    """Peak RSS of one configuration alone in a fresh process (a selection window and reselection included)."""
    import torch

    torch.set_num_threads(threads)
    setup = Setup(name)
    for _ in range(steps):
        setup.step()
    return {"peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's own high-water RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child of a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.steps, args.threads)))
        return
    import torch

    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    # Timing: all configurations in this one process, stepped in turn, so machine noise hits them alike.
    setups = {name: Setup(name) for name in names}
    for _ in range(args.steps):
        for setup in setups.values():
            setup.step()
    results = {n: {"trainable": s.trainable, "times": s.times} for n, s in setups.items()}
    del setups
    # Memory: each configuration alone in a fresh process.
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--steps", "7", "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name].update(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = statistics.median
    print(
        f"Llama 60M fp32, batch {BATCH}x{SEQ}, {args.threads} threads, {args.steps} steps per config "
        "(first 2 are warm-up); medians"
    )
    print(
        f"{'config':10s} {'trainable':>11s} {'step (s)':>9s} {'vs floor':>9s} {'vs lora':>8s} {'peak RSS':>10s} {'vs lora':>8s}"
    )
    base = med(results["floor"]["times"]["normal"]) if "floor" in results else None
    lora = results.get("lora")
    lora_step = med(lora["times"]["normal"]) if lora else None
    for name, r in results.items():
        step = med(r["times"]["normal"])
        vs_floor = f"{step / base:.2f}x" if base else "-"
        vs_lora = f"{step / lora_step:.2f}x" if lora_step else "-"
        rss_vs = f"{r['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x" if lora else "-"
        print(
            f"{name:10s} {r['trainable']:>11,} {step:>9.3f} {vs_floor:>9s} {vs_lora:>8s} {r['peak_rss_mb']:>8.0f}MB {rss_vs:>8s}"
        )
    print_reselection_costs(results, goal=" (goal <= 5%)")


if __name__ == "__main__":
    main()
