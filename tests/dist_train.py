"""Worker for the multi-process tests: run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

For each engine (DDP, FSDP2) and algorithm, every rank prepares the same tiny model, wraps it, trains on its own
micro-batches (``batches(rank)``, which the test's single-process reference also uses), reselecting several
times, and saves its exported delta and the bytes of parameters it holds. Under FSDP2 each run also checkpoints
at step 5 and a freshly sharded model resumes from there.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_llama

import deltahub
from training import SftAdamW, SftConfig, SftSelector, SftSM3, get_sft_model
from training.fsdp import resident_bytes, shard_sft_model

STEPS, MICRO, RESUME_AT = 12, 2, 5
ENGINES = ("ddp", "fsdp")
ALGORITHMS = ("rigl", "sm3")


def config(algorithm: str) -> SftConfig:
    return SftConfig(
        density=0.05, selection_algorithm=algorithm, reselection_steps=3, selection_accumulation_steps=2
    )


def batches(rank: int) -> list[list[torch.Tensor]]:
    """Rank ``rank``'s micro-batches, ``[step][micro]`` of [4, 16] tokens (every rank sees different data)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [[torch.randint(0, 64, (4, 16), generator=gen) for _ in range(MICRO)] for _ in range(STEPS)]


def train(model, algorithm: str, steps: list[list[torch.Tensor]], wrapped=None, save_at=None, resume=None):
    """``STEPS`` update steps of ``MICRO`` micro-batches; ``wrapped`` (DDP) runs the forward if given.
    ``save_at=(step, folder)`` writes a checkpoint after that step (rank 0); ``resume=(step, folder)`` loads one
    and runs the steps after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if algorithm == "sm3":
        optimizer = SftSM3(params, model.active_deltas(), lr=0.05)
    else:
        optimizer = SftAdamW(params, lr=1e-2)
    forward = wrapped or model
    selector = SftSelector(forward, optimizer, total_update_steps=STEPS, grad_accumulation_steps=MICRO)
    first = 0
    if resume is not None:
        first = resume[0]
        selector.load_checkpoint(resume[1])
    for step, micro_batches in enumerate(steps[first:], first + 1):
        for batch in micro_batches:
            (forward(input_ids=batch, labels=batch).loss / MICRO).backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
        if save_at is not None and step == save_at[0]:
            if dist.get_rank() == 0:
                selector.save_checkpoint(save_at[1])
            dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    held = {}
    for engine in ENGINES:
        for algorithm in ALGORITHMS:
            model = get_sft_model(tiny_llama(), config(algorithm))
            wrapped = None
            if engine == "ddp":
                wrapped = DistributedDataParallel(model)
            else:
                shard_sft_model(model)
            held[f"{engine}-{algorithm}"] = resident_bytes(model)
            # FSDP2 also checkpoints inside a selection window (step 5) and resumes a fresh sharded model there
            checkpoint = (RESUME_AT, args.out / f"{algorithm}-checkpoint") if engine == "fsdp" else None
            train(model, algorithm, batches(rank), wrapped, save_at=checkpoint)
            deltahub.save_delta(model.to_delta(), args.out / f"{engine}-{algorithm}-rank{rank}")
            if checkpoint is not None:
                resumed = shard_sft_model(get_sft_model(tiny_llama(), config(algorithm)))
                train(resumed, algorithm, batches(rank), resume=checkpoint)
                deltahub.save_delta(resumed.to_delta(), args.out / f"{engine}-{algorithm}-resumed-rank{rank}")
    (args.out / f"bytes-rank{rank}.json").write_text(json.dumps(held))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
