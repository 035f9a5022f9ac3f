"""`deltahub convert`: a thin shell over :func:`deltahub.convert_adapter` and :func:`deltahub.save_delta`."""

from __future__ import annotations

from pathlib import Path

import click

from ._options import DTYPES, quiet_option, token_option

_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "pytorch_diff.bin"]


def _local(source: str, token: str | None) -> Path:
    """A local folder for ``source``: itself, or a Hub adapter repo downloaded into the HF cache (its adapter
    files only)."""
    from ..errors import PathNotFoundError
    from ..hub_errors import hub_errors
    from ..hub_ids import is_ref, parse_ref

    path = Path(source)
    if path.exists():
        return path
    if not is_ref(source):
        raise PathNotFoundError(
            f"no adapter at {source!r}: give an adapter folder, a pytorch_diff.bin or a Hub id"
        )
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_ref(source)
    with hub_errors("pull", repo_id, revision or "main", None, token):
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=_ADAPTER_FILES))


@click.command()
@click.argument("source")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Delta folder to write.")
@click.option(
    "--base",
    metavar="MODEL",
    help="The base model the adapter was trained on: a folder or Hub id org/name[@rev] (default: the one its "
    "adapter_config.json records; composable-sft records none).",
)
@click.option(
    "--base-model", metavar="ID[@REV]", help="The base's Hub id (and revision) to record in the delta."
)
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    help="LoRA: fraction of each weight's entries of B @ A * scaling kept, by magnitude (1 keeps all).",
)
@click.option(
    "--num", type=click.IntRange(1), help="LoRA: number of entries kept in all (instead of --density)."
)
@click.option("--scope", type=click.Choice(["parameter", "global"]), default="parameter", show_default=True,
              help="LoRA: each weight keeps its share, or the largest entries over all weights.")  # fmt: skip
@click.option(
    "--drop-head",
    is_flag=True,
    help="Leave out the parts that replace base weights instead of adding to them (composable-sft's head, "
    "peft's modules_to_save) rather than refusing the adapter.",
)
@click.option(
    "--values-dtype",
    type=click.Choice(DTYPES),
    help="Dtype of the stored values (default: the adapter's; float32 for LoRA).",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest delta file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@token_option
@quiet_option
def convert(
    source: str,
    out: Path,
    base: str | None,
    base_model: str | None,
    density: float | None,
    num: int | None,
    scope: str,
    drop_head: bool,
    values_dtype: str | None,
    max_shard_size: str,
    overwrite: bool,
    token: str | None,
    quiet: bool,
) -> None:
    """Convert an adapter you already have into a deltahub delta.

    SOURCE is an SFT-fork adapter folder (adapter_config.json with peft_type SFT, and adapter_model.safetensors
    or .bin): exact; a peft LoRA adapter folder: the exact B @ A * scaling kept to --density or --num by
    magnitude, with the relative error dropped reported; or a composable-sft folder or pytorch_diff.bin: exact.
    A Hub id org/name[@rev] is downloaded first. Pickles are read weights-only (never code).

    \b
    Examples:
      deltahub convert ./llama-sft-adapter --out ./llama-sft-delta
      deltahub convert ./llama-lora --base meta-llama/Llama-3.2-1B --density 0.01 --out ./lora-1pct
      deltahub convert ./llama-lora --density 1 --out ./lora-exact          # all of B @ A: merge_and_unload's
      deltahub convert ./composable-sft/pytorch_diff.bin --base ./llama --drop-head --out ./composable-delta
    """
    from .._atomic import check_output
    from ..convert import convert_adapter
    from ..format import save_delta

    check_output(out, overwrite=overwrite, keyword="out")  # a refusal should cost nothing
    delta = convert_adapter(
        _local(source, token),
        base=base,
        density=density,
        num=num,
        scope=scope,
        drop_head=drop_head,
        values_dtype=values_dtype,
        base_model=base_model,
        progress=not quiet,
    )
    save_delta(delta, out, max_shard_size=max_shard_size, overwrite=overwrite)
    if not quiet:
        prov = delta.provenance
        error = f"; relative error dropped {prov['relative_error']:.4g}" if "relative_error" in prov else ""
        dropped = f"; left out {len(prov['dropped'])} replaced tensor(s)" if prov.get("dropped") else ""
        click.echo(
            f"converted {prov['source_format']} {source}: {len(delta)} parameters, nnz {delta.nnz:,} "
            f"(density {delta.density:.4g}){error}{dropped}; base {delta.base_model or '?'} -> {out}"
        )
