"""The training run behind ``deltahub train``: data, model, optimizer, selector, held-out loss, the saved delta.

One process, or several under ``torchrun`` / ``accelerate launch`` (detected from ``WORLD_SIZE``): each rank
trains on its own slice of every epoch's seeded permutation, with DDP (every rank holds the base) or, with
``fsdp=True``, FSDP2 (each rank holds 1/N of the base; ``training/fsdp.py``). Rank 0 reports and saves.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import deltahub

from .config import SftConfig
from .data import (
    Batches,
    has_messages,
    read_conversations,
    read_texts,
    split_held_out,
    token_blocks,
)
from .errors import SftConfigError
from .instruct_data import IGNORE, check_chat_template, pack, pad_batch, pad_id_of, truncate
from .model import get_sft_model
from .optim import SftAdamW, SftSM3
from .selector import SftSelector


@dataclass
class DataOptions:
    seq_len: int = 256
    text_field: str = "text"
    messages_field: str = "messages"
    chat_template: Path | None = None  # a Jinja file replacing the tokenizer's template
    packing: bool = False  # chat data: pack conversations into blocks instead of padding each batch
    eval_fraction: float = 0.1
    eval_file: Path | None = None


@dataclass
class RunResult:
    delta: deltahub.SparseDelta
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    data_note: str  # what the data became (blocks or conversations, truncation)
    world: int
    model_params: int


class _Data:
    """Training items and held-out items of one kind: token blocks ``(ids, labels)`` or chat examples."""

    def __init__(self, train: Any, held_out: Any, note: str):
        self.train, self.held_out, self.note = train, held_out, note


def _load_data(dataset: Path, tokenizer: Any, opts: DataOptions, seed: int) -> _Data:
    if opts.chat_template is not None:
        tokenizer.chat_template = Path(opts.chat_template).read_text(encoding="utf-8")
    chat = has_messages(dataset, opts.messages_field) or opts.messages_field != "messages"
    if not chat:
        blocks = token_blocks(read_texts(dataset, opts.text_field), tokenizer, opts.seq_len)
        if opts.eval_file is not None:
            held = token_blocks(read_texts(opts.eval_file, opts.text_field), tokenizer, opts.seq_len)
            train = blocks
        else:  # the last tenth (eval_fraction) of the blocks, as before instruction data existed
            n_eval = max(1, round(len(blocks) * opts.eval_fraction))
            train, held = blocks[:-n_eval], blocks[-n_eval:]
        note = f"{len(train)} training and {len(held)} held-out blocks of {opts.seq_len} tokens"
        return _Data((train, train), (held, held), note)  # plain text: every token is a label
    check_chat_template(tokenizer, "the tokenizer of the base")
    examples = read_conversations(dataset, tokenizer, opts.messages_field)
    if opts.eval_file is not None:
        train, held = examples, read_conversations(opts.eval_file, tokenizer, opts.messages_field)
    else:
        train, held = split_held_out(examples, opts.eval_fraction, seed)
    note = f"{len(train)} training and {len(held)} held-out conversations"
    if opts.packing:
        note += f", packed into blocks of {opts.seq_len} tokens"
        return _Data(pack(train, opts.seq_len), pack(held, opts.seq_len), note)
    train, truncated, dropped = truncate(train, opts.seq_len)
    held, held_truncated, held_dropped = truncate(held, opts.seq_len)
    if truncated or held_truncated:
        note += f"; {truncated + held_truncated} cut to {opts.seq_len} tokens"
    if dropped or held_dropped:
        note += f", {dropped + held_dropped} left without an assistant token and skipped"
    if not train or not held:
        raise SftConfigError(
            f"no {'training' if not train else 'held-out'} conversation keeps an assistant token within "
            f"`seq_len` {opts.seq_len}; raise `seq_len`"
        )
    return _Data(train, held, note)


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """``--device``: ``auto`` (CUDA when a GPU is visible, else CPU; with ``local_rank``, that process's GPU),
    ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = spec.strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
    kind, _, number = spec.partition(":")
    if spec == "cpu":
        return torch.device("cpu")
    if kind != "cuda" or (number and not number.isdigit()):
        raise SftConfigError(
            f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)"
        )
    if not torch.cuda.is_available():
        raise SftConfigError(
            f"--device {spec} needs a CUDA GPU, but torch sees none (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'no'}); use --device cpu, or install a CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if number and int(number) >= count:
        raise SftConfigError(
            f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    if not number and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def _setup_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _held_out_loss(
    model, items: Any, batch_size: int, pad_id: int, rank: int, world: int, device: torch.device
) -> float:
    """Token-weighted mean loss over ``items``; under several ranks each evaluates a strided share (padded with
    zero-weight repeats, so every rank runs the same number of forwards, as FSDP's collectives need)."""
    n = len(items[0]) if isinstance(items, tuple) else len(items)
    rows = list(range(rank, n, world))
    share = math.ceil(n / world)
    weights = [1.0] * len(rows) + [0.0] * (share - len(rows))
    rows += [rows[0] if rows else 0] * (share - len(rows))
    total = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for start in range(0, share, batch_size):
            chunk, w = rows[start : start + batch_size], weights[start : start + batch_size]
            if isinstance(items, tuple):
                batch = {"input_ids": items[0][chunk], "labels": items[1][chunk]}
            else:
                batch = pad_batch([items[r] for r in chunk], pad_id)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="none",
            ).view(labels.shape)
            weight = torch.tensor(w, dtype=torch.float64, device=device)[:, None]
            counted = (labels != IGNORE).to(torch.float64) * weight
            total += torch.stack([(losses.double() * counted).sum(), counted.sum()]).cpu()
    model.train()
    if world > 1:
        total = total.to(device)  # NCCL reduces on the GPU; gloo on the CPU
        dist.all_reduce(total)
        total = total.cpu()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def train_delta(
    base: str,
    dataset: Path,
    config: SftConfig,
    *,
    data: DataOptions | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float | None = None,
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    fsdp: bool = False,
    device: str = "auto",
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    base_model: str | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train a sparse delta of ``base`` on ``dataset``; returns it with the held-out loss before and after.

    ``max_steps`` (update steps) wins over ``epochs``; with neither, 100 steps. Under several processes the
    batch size is per process, as with torchrun everywhere. ``device`` is ``auto`` (CUDA when there is a GPU, under
    torchrun this process's ``cuda:LOCAL_RANK``), ``cpu``, ``cuda`` or ``cuda:N``; ``bf16`` computes under
    ``torch.autocast``; ``base_model`` is the Hub id recorded in the delta (see ``model.to_delta``).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = data or DataOptions()
    t0 = time.perf_counter()
    rank, world = _setup_distributed()
    where = resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    if where.type == "cuda":
        torch.cuda.set_device(where)  # NCCL and FSDP's default mesh use the current device
    if fsdp and world == 1:
        raise SftConfigError(
            "`fsdp` shards the base across processes: launch with torchrun --nproc_per_node N (or accelerate "
            "launch) and N >= 2"
        )
    if quiet or rank != 0:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every process
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    loaded = _load_data(Path(dataset), tokenizer, data, seed)
    pad_id = pad_id_of(tokenizer)
    batches = Batches(loaded.train, batch_size, seed=seed, rank=rank, world=world, pad_id=pad_id)
    steps = max_steps or (batches.steps_for(epochs, grad_accum) if epochs else 100)
    model = AutoModelForCausalLM.from_pretrained(base, **({"dtype": dtype} if dtype else {})).to(where)
    if gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_sft_model(model, config)
    forward = model
    if world > 1 and fsdp:
        from .fsdp import shard_sft_model

        shard_sft_model(model)
    elif world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[where.index] if where.type == "cuda" else None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if config.selection_algorithm == "sm3":
        optimizer = SftSM3(params, model.active_deltas(), lr=lr or 0.1, weight_decay=weight_decay)
    else:
        optimizer = SftAdamW(params, lr=lr or 1e-3, weight_decay=weight_decay)
    selector = SftSelector(forward, optimizer, total_update_steps=steps, grad_accumulation_steps=grad_accum)

    def autocast():
        return torch.autocast(where.type, dtype=torch.bfloat16, enabled=bf16)

    def held_out() -> float:
        with autocast():
            return _held_out_loss(model, loaded.held_out, batch_size, pad_id, rank, world, where)

    before = held_out()
    stream = iter(batches)
    bar = tqdm(
        range(1, steps + 1), desc="sparse fine-tuning", disable=quiet or rank != 0 or None, unit="step"
    )
    for step in bar:
        for micro in range(grad_accum):
            batch = {k: v.to(where, non_blocking=True) for k, v in next(stream).items()}
            last = micro == grad_accum - 1
            # DDP: average the gradients once per update step, not after every micro-batch
            sync = forward.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()
            with sync:
                with autocast():
                    loss = forward(**batch).loss
                (loss / grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        selector.step()
        # Reading the loss waits for the device: only as often as the bar redraws, never when it is off.
        if not bar.disable and (step % 10 == 0 or step == steps):
            value = loss.item()
            if math.isfinite(value):
                bar.set_postfix(loss=f"{value:.3f}")
        if eval_every and step % eval_every == 0 and step < steps:
            value = held_out()
            if rank == 0:
                (bar.write if not (quiet or bar.disable) else log)(f"step {step}: held-out loss {value:.4f}")
    after = held_out()
    delta = model.to_delta(base_model=base_model)
    if delta.base_model in (None, ""):
        delta.base_model = str(base)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor.numel() is the global size
    return RunResult(delta, before, after, steps, time.perf_counter() - t0, loaded.note, world, n_params)


def finish(result: RunResult, out: Path, overwrite: bool, log: Callable[[str], None] = print) -> None:
    """Rank 0 saves the delta and prints the summary; every rank leaves the process group."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        if rank == 0:
            deltahub.save_delta(result.delta, out, overwrite=overwrite)
            log(
                f"trained {result.delta.provenance['algorithm']} delta: held-out loss {result.loss_before:.4f} -> "
                f"{result.loss_after:.4f}; {result.delta.nnz:,} values ({result.delta.nnz / result.model_params:.3%} "
                f"of the model) in {len(result.delta)} weights; "
                f"{result.steps} steps on {result.world} process{'es' if result.world > 1 else ''} in "
                f"{result.seconds:.1f} s ({result.data_note}) -> {out}"
            )
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
