"""``deltahub train``: sparse fine-tuning from the command line (attached lazily to the ``deltahub`` group)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click


@click.command()
@click.argument("base")
@click.argument("dataset", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Delta folder to write.")
@click.option("--density", type=float, default=None, help="Trainable values as a fraction of all parameters.")
@click.option(
    "--num-tunable-weights", type=int, default=None, help="Or an absolute number of trainable values."
)
@click.option("--algorithm", type=click.Choice(["rigl", "sm3"]), default="rigl", show_default=True)
@click.option("--reselection-steps", type=int, default=20, show_default=True)
@click.option("--selection-accumulation-steps", type=int, default=5, show_default=True)
@click.option("--initial-reselection-rate", type=float, default=0.2, show_default=True)
@click.option("--rate-policy", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True)
@click.option("--target-modules", default=None, help="Comma-separated name suffixes, e.g. q_proj,v_proj.")
@click.option("--values-dtype", default="float32", show_default=True)
@click.option(
    "--steps", type=click.IntRange(1), default=100, show_default=True, help="Optimizer update steps."
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--lr", type=float, default=None, help="Learning rate [default: 1e-3 for rigl (AdamW), 0.1 for sm3]."
)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seq-len", type=click.IntRange(8), default=256, show_default=True)
@click.option(
    "--text-field", default="text", show_default=True, help="Field holding the text in a .jsonl file."
)
@click.option("--dtype", default=None, help="Load the base in this dtype (default: as saved).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to train: auto (CUDA when there is a GPU, else CPU), cpu, cuda or cuda:N.",
)
@click.option("--bf16", is_flag=True, help="Compute in bfloat16 (torch.autocast); the weights keep --dtype.")
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in the backward pass: less memory, ~30% more compute.",
)
@click.option(
    "--base-model",
    metavar="ID[@REV]",
    help="The base's Hub id (and revision) to record in the delta, e.g. when BASE is a local copy of it "
    "(default: BASE itself when it is a Hub id or a folder in the HF cache).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing delta folder at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    base,
    dataset,
    out,
    density,
    num_tunable_weights,
    algorithm,
    reselection_steps,
    selection_accumulation_steps,
    initial_reselection_rate,
    rate_policy,
    target_modules,
    values_dtype,
    steps,
    batch_size,
    grad_accum,
    lr,
    weight_decay,
    seq_len,
    text_field,
    dtype,
    seed,
    device,
    bf16,
    gradient_checkpointing,
    base_model,
    overwrite,
    quiet,
):
    """Train a sparse delta of BASE (a local model folder) on DATASET (.txt or .jsonl) and save it to --out.

    The last tenth of the token blocks is held out to report the loss before and after.

    \b
    Examples:
      deltahub train ./smollm2 plays.txt --out ./shakespeare-delta --density 0.01 --steps 200
      deltahub train ./base data.jsonl --out ./d --algorithm sm3 --num-tunable-weights 1000000 --lr 0.1
      deltahub train ./base data.txt --out ./d --device cuda --bf16 --gradient-checkpointing
      deltahub train ./llama plays.txt --out ./llama-delta --base-model meta-llama/Llama-3.2-1B@main  # a local copy of it
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltahub
    from deltahub._atomic import check_output
    from deltahub.errors import PathNotFoundError

    from .config import SftConfig
    from .data import read_texts, token_blocks
    from .model import get_sft_model
    from .optim import SftAdamW, SftSM3
    from .selector import SftSelector

    if density is None and num_tunable_weights is None:
        density = 0.01
    config = SftConfig(
        density=density,
        num_tunable_weights=num_tunable_weights,
        selection_algorithm=algorithm,
        reselection_steps=reselection_steps,
        selection_accumulation_steps=selection_accumulation_steps,
        initial_reselection_rate=initial_reselection_rate,
        reselection_rate_policy=rate_policy,
        target_modules=tuple(t.strip() for t in target_modules.split(",")) if target_modules else None,
        values_dtype=values_dtype,
        seed=seed,
    )
    if base_model is not None:
        from deltahub.identity import parse_model_id

        parse_model_id(base_model)  # a bad id fails before any training
    if not Path(base).is_dir():
        # Checked before transformers sees it: from_pretrained would try it as a Hub id and fail in 40 lines.
        raise PathNotFoundError(f"no model folder at {base!r}: `base` must be a local folder written by save_pretrained")
    if not dataset.is_file():
        raise PathNotFoundError(f"no text file at {str(dataset)!r}: `dataset` must be a .txt or .jsonl file")
    check_output(out, overwrite=overwrite, keyword="out")
    device = resolve_device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    blocks = token_blocks(read_texts(dataset, text_field), tokenizer, seq_len)
    n_eval = max(1, len(blocks) // 10)
    train_blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
    kwargs = (
        {"dtype": deltahub._dtypes.parse_dtype(dtype, allowed=deltahub._dtypes.BASE_DTYPES, what="--dtype")}
        if dtype
        else {}
    )
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs).to(device)
    if gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_sft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if algorithm == "sm3":
        optimizer = SftSM3(params, model.active_deltas(), lr=lr or 0.1, weight_decay=weight_decay)
    else:
        optimizer = SftAdamW(params, lr=lr or 1e-3, weight_decay=weight_decay)
    selector = SftSelector(model, optimizer, total_update_steps=steps, grad_accumulation_steps=grad_accum)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=batch, labels=batch).loss

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = torch.stack([loss_of(b).float() for b in eval_blocks.split(batch_size)])
        model.train()
        return losses.mean().item()

    before = held_out_loss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="sparse fine-tuning", disable=quiet or None, unit="step")
    for step in bar:
        for _ in range(grad_accum):
            loss = loss_of(train_blocks[torch.randint(0, len(train_blocks), (batch_size,), generator=gen)])
            (loss / grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        selector.step()
        # Reading the loss waits for the device: only as often as the bar redraws, never when it is off.
        if not bar.disable and (step % 10 == 0 or step == steps - 1):
            value = loss.item()
            if math.isfinite(value):
                bar.set_postfix(loss=f"{value:.3f}")
    after = held_out_loss()
    delta = model.to_delta(base_model=base_model)
    if delta.base_model in (None, ""):
        delta.base_model = str(base)
    deltahub.save_delta(delta, out, overwrite=overwrite)
    click.echo(
        f"trained {algorithm} delta: held-out loss {before:.4f} -> {after:.4f}; {delta.nnz:,} values "
        f"({delta.nnz / sum(p.numel() for p in model.parameters()):.3%} of the model) in {len(delta)} weights; "
        f"{steps} steps in {time.perf_counter() - t0:.1f} s -> {out}"
    )


def resolve_device(spec: str):
    """``--device``: ``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    from .errors import SftConfigError

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    return torch.device(spec)
