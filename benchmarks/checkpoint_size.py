"""Bytes of an adapter-only SFT checkpoint against the base's weights.

The 60M Llama of benchmarks/train_step.py (fp32), 1% density, SftAdamW, the default schedule: the checkpoint
(``sft_state.safetensors``: positions, values, optimizer state, and RigL's statistics when a selection window
is in progress) is written inside the first window and after it, and compared with the base's parameter bytes
(what the old full-model checkpoints wrote, before ``optimizer.pt``).

    python benchmarks/checkpoint_size.py [--density 0.01]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from train_step import build_model

from training import SftAdamW, SftConfig, SftSelector, get_sft_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = build_model()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = get_sft_model(model, SftConfig(density=args.density))  # R=20, A=5: steps 1-5 are a window
    optimizer = SftAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    selector = SftSelector(model, optimizer, total_update_steps=100)
    k = sum(layer.sft_indices.numel() for layer in model.sft_layers.values())
    tokens = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    print(f"base: {base_bytes / 1e6:.1f} MB of fp32 weights; {k:,} trainable values ({args.density:.1%})")
    for step in range(1, 8):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
        if step in (4, 7):
            with tempfile.TemporaryDirectory() as folder:
                size = os.path.getsize(selector.save_checkpoint(folder))
            where = "inside a RigL window" if step == 4 else "outside a window"
            print(
                f"checkpoint after step {step} ({where}): {size / 1e6:.2f} MB = {size / base_bytes:.1%} of the "
                f"base, {size / k:.1f} bytes per value"
            )


if __name__ == "__main__":
    main()
