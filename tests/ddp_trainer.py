"""Worker for the Trainer-under-DDP test: run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

For each algorithm: an uninterrupted SftTrainer run of 12 steps that checkpoints at step 5 (inside a selection window), then a fresh
prepared model resumed from that checkpoint; each rank saves both deltas for the test to compare bit for bit.
"""

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_sft_trainer import make_trainer

import deltahub


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for algorithm in ("rigl", "sm3"):
        full = make_trainer(args.out / algorithm / "full", algorithm, grad_acc=2, save_steps=5)
        full.train()
        rank = dist.get_rank()
        resumed = make_trainer(args.out / algorithm / "resumed", algorithm, grad_acc=2)
        resumed.train(resume_from_checkpoint=str(args.out / algorithm / "full" / "checkpoint-5"))
        for name, trainer in (("full", full), ("resumed", resumed)):
            deltahub.save_delta(trainer.model.to_delta(), args.out / algorithm / f"{name}-delta-rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
