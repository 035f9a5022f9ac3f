"""`deltahub extract`: a thin shell over :func:`deltahub.extract_delta` and :func:`deltahub.save_delta`."""

from __future__ import annotations

from pathlib import Path

import click

from ._options import DTYPES, quiet_option


@click.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Delta folder to write.")
@click.option(
    "--density", type=click.FloatRange(0, 1, min_open=True), help="Fraction of entries to keep, e.g. 0.01."
)
@click.option("--num", type=click.IntRange(1), help="Number of entries to keep (instead of --density).")
@click.option("--scope", type=click.Choice(["parameter", "global"]), default="parameter", show_default=True,
              help="parameter: each parameter keeps its share; global: the top entries over all parameters.")  # fmt: skip
@click.option("--values-dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Dtype of the stored values (bfloat16 halves their size).")  # fmt: skip
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest delta file.")
@click.option(
    "--on-mismatch",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="Tensors in only one of the two models: refuse, or skip them (recorded in the delta's provenance).",
)
@click.option(
    "--base-model",
    metavar="ID[@REV]",
    help="The base's Hub id (and revision) to record, e.g. when BASE is a local copy of it (default: BASE's own "
    "id when it is a Hub id or a folder in the HF cache, else its path, which push leaves out).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@quiet_option
def extract(
    base: str,
    finetuned: str,
    out: Path,
    density: float | None,
    num: int | None,
    scope: str,
    values_dtype: str,
    max_shard_size: str,
    on_mismatch: str,
    base_model: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Extract a sparse delta from a full fine-tune: the top entries of |FINETUNED - BASE|.

    BASE and FINETUNED are model folders or Hub ids (org/name@revision); both are streamed one tensor at a time.

    \b
    Examples:
      deltahub extract ./llama ./llama-sft --density 0.01 --out ./sft-delta
      deltahub extract ./llama ./llama-sft --density 0.01 --base-model meta-llama/Llama-3.2-1B --out ./named-delta
      deltahub extract meta-llama/Llama-3.2-1B org/llama-sft@main --num 5000000 --scope global \\
          --values-dtype bfloat16 --out ./sft-delta-global
      deltahub extract ./llama ./llama-with-new-tokens --density 0.01 --on-mismatch skip --out ./new-tokens-delta
    """
    from ..extract import extract_delta
    from ..format import save_delta
    from ..merging import resolve_model

    if (density is None) == (num is None):
        raise click.UsageError("give exactly one of --density or --num")
    base_folder, base_id, base_rev = resolve_model(base)
    ft_folder, ft_id, _ = resolve_model(finetuned)
    delta = extract_delta(
        base_folder,
        ft_folder,
        density=density,
        num=num,
        scope=scope,
        values_dtype=values_dtype,
        on_mismatch=on_mismatch,
        progress=not quiet,
        base_model=base_model,
    )
    if base_model is None and base_folder != Path(base):  # a Hub base: its id and commit, not a cache path
        delta = delta.replace(base_model=base_id, base_revision=base_rev)
    save_delta(delta, out, max_shard_size=max_shard_size, overwrite=overwrite)
    if not quiet:
        size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
        click.echo(
            f"extracted {len(delta)} parameters, nnz {delta.nnz:,} (density {delta.density:.4g}) from {ft_id}: "
            f"{out} ({size / 1e6:.1f} MB)"
        )
