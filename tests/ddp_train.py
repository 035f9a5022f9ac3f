"""Worker for the multi-process test: run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank trains the same tiny model on different data with DDP, reselecting several times, and saves its
exported delta; the test checks both ranks end with identical positions and values.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_llama

import deltahub
from training import SftAdamW, SftConfig, SftSelector, SftSM3, get_sft_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--algorithm", default="rigl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = get_sft_model(
        tiny_llama(),
        SftConfig(
            density=0.05,
            selection_algorithm=args.algorithm,
            reselection_steps=3,
            selection_accumulation_steps=2,
        ),
    )
    # The positions before any reselection, so the test can check that training moved them.
    save_file(
        {name: layer.sft_indices.clone() for name, layer in model.sft_layers.items()},
        str(args.out / f"initial{rank}.safetensors"),
    )
    ddp = DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.algorithm == "sm3":
        optimizer = SftSM3(params, model.active_deltas(), lr=0.05)
    else:
        optimizer = SftAdamW(params, lr=1e-2)
    selector = SftSelector(ddp, optimizer, total_update_steps=12, grad_accumulation_steps=2)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    for _ in range(12):
        for _ in range(2):  # gradient accumulation
            batch = torch.randint(0, 64, (4, 16), generator=gen)
            (ddp(input_ids=batch, labels=batch).loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
    deltahub.save_delta(model.to_delta(), args.out / f"rank{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
