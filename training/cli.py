"""``deltahub train``: sparse fine-tuning from the command line (attached lazily to the ``deltahub`` group).

A thin shell over ``training.run.train_delta``; under ``torchrun`` / ``accelerate launch`` it runs on every
process (DDP, or FSDP2 with ``--fsdp``) and rank 0 writes the delta.
"""

from __future__ import annotations

from pathlib import Path

import click

from .run import resolve_device  # noqa: F401  (``--device``'s parser, here where the flag is)

# What a saved tokenizer leaves in a folder (fast tokenizers, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


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
    "--max-steps",
    "--steps",
    "max_steps",
    type=click.IntRange(1),
    default=None,
    help="Optimizer update steps [default: 100, or what --epochs gives]; wins over --epochs.",
)
@click.option(
    "--epochs", type=click.FloatRange(0, min_open=True), default=None, help="Passes over the training data."
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Per process.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--lr", type=float, default=None, help="Learning rate [default: 1e-3 for rigl (AdamW), 0.1 for sm3]."
)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--seq-len",
    type=click.IntRange(8),
    default=256,
    show_default=True,
    help="Block length (plain text, --packing) or the longest conversation kept (padding).",
)
@click.option(
    "--text-field", default="text", show_default=True, help="Column holding the text in a records file."
)
@click.option(
    "--messages-field",
    default="messages",
    show_default=True,
    help="Column of conversations (lists of {role, content}); a file with it trains on assistant tokens only.",
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A Jinja chat template file to use instead of the tokenizer's.",
)
@click.option(
    "--packing/--padding",
    default=False,
    show_default=True,
    help="Conversations: pack them into --seq-len blocks, or pad each batch to its longest.",
)
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Held out for the loss report: the last blocks of plain text, a seeded random share of conversations.",
)
@click.option(
    "--eval-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A separate held-out file (instead of --eval-fraction).",
)
@click.option(
    "--eval-every", type=click.IntRange(1), default=None, help="Report the held-out loss every N steps."
)
@click.option("--dtype", default=None, help="Load the base in this dtype (default: as saved).")
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun/accelerate launch: shard the base across the processes with FSDP2 (default DDP).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to train: auto (CUDA when there is a GPU, else CPU; under torchrun cuda:LOCAL_RANK), cpu, cuda "
    "or cuda:N.",
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
    max_steps,
    epochs,
    batch_size,
    grad_accum,
    lr,
    weight_decay,
    seq_len,
    text_field,
    messages_field,
    chat_template,
    packing,
    eval_fraction,
    eval_file,
    eval_every,
    dtype,
    fsdp,
    seed,
    device,
    bf16,
    gradient_checkpointing,
    base_model,
    overwrite,
    quiet,
):
    """Train a sparse delta of BASE (a local model folder) on DATASET and save it to --out.

    DATASET is plain text (.txt, .md) or records (.jsonl, .json, .parquet, .csv). Records with a `messages`
    column (lists of {"role", "content"}) are conversations: rendered with the tokenizer's chat template, with
    the loss on the assistant's tokens only. Otherwise each record's --text-field is a document. A held-out
    share reports the loss before and after (and every --eval-every steps).

    \b
    Examples:
      deltahub train ./smollm2 plays.txt --out ./shakespeare-delta --density 0.01 --max-steps 200
      deltahub train ./smollm2-instruct chats.jsonl --out ./chat-delta --epochs 2 --packing --eval-every 50
      deltahub train ./base data.parquet --out ./d --algorithm sm3 --num-tunable-weights 1000000 --lr 0.1
      deltahub train ./base data.txt --out ./d --device cuda --bf16 --gradient-checkpointing
      deltahub train ./llama plays.txt --out ./llama-delta --base-model meta-llama/Llama-3.2-1B@main  # a local copy of it

    \b
    On several processes (DDP, or FSDP2 with --fsdp; rank 0 writes the delta; see docs/training.md):
      torchrun --nproc_per_node 2 -m deltahub.cli train ./base data.txt --out ./d --fsdp
    """
    import deltahub
    from deltahub._atomic import check_output
    from deltahub.errors import PathNotFoundError

    from .config import SftConfig
    from .run import DataOptions, finish, train_delta

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
        raise PathNotFoundError(
            f"no model folder at {base!r}: `base` must be a local folder written by save_pretrained"
        )
    # Also before transformers: its errors for an empty folder or a missing tokenizer run to many lines.
    if not (Path(base) / "config.json").is_file():
        raise PathNotFoundError(
            f"no model in {base!r}: the folder has no config.json; `base` must be a folder written by the "
            "model's save_pretrained (and its tokenizer's)"
        )
    if not any((Path(base) / name).is_file() for name in TOKENIZER_FILES):
        raise PathNotFoundError(
            f"no tokenizer in {base!r}: the folder has none of {', '.join(TOKENIZER_FILES)}; save the base's "
            "tokenizer there too (tokenizer.save_pretrained(base))"
        )
    for given, what in ((dataset, "dataset"), (eval_file, "eval_file")):
        if given is not None and not given.is_file():
            raise PathNotFoundError(
                f"no dataset file at {str(given)!r}: `{what}` must be a .txt, .md, .jsonl, .json, .parquet or "
                ".csv file"
            )
    check_output(out, overwrite=overwrite, keyword="out")
    parsed_dtype = (
        deltahub._dtypes.parse_dtype(dtype, allowed=deltahub._dtypes.BASE_DTYPES, what="--dtype")
        if dtype
        else None
    )
    result = train_delta(
        base,
        dataset,
        config,
        data=DataOptions(
            seq_len=seq_len,
            text_field=text_field,
            messages_field=messages_field,
            chat_template=chat_template,
            packing=packing,
            eval_fraction=eval_fraction,
            eval_file=eval_file,
        ),
        max_steps=max_steps,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        eval_every=eval_every,
        dtype=parsed_dtype,
        seed=seed,
        fsdp=fsdp,
        device=device,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        base_model=base_model,
        quiet=quiet,
        log=click.echo,
    )
    finish(result, out, overwrite, log=click.echo)
