"""`deltahub merge`: a thin shell over :func:`deltahub.merge`, with ``merge.yaml`` read as a
:class:`deltahub.merging.config.MergeConfig` (the same type the merged folder's ``merge.yaml`` is written from)."""

from __future__ import annotations

import inspect
from pathlib import Path

import click

from ..merging.config import EXAMPLE
from ._options import DTYPES, method_options, pop_method_options, quiet_option


def is_delta(ref: str) -> bool:
    """Whether the first argument of ``deltahub merge`` is a delta rather than a base: a local delta folder or
    file, or a Hub repo that holds one (an adapter that needs ``deltahub convert`` says so)."""
    from ..convert.detect import unconverted_error
    from ..errors import HubError
    from ..format.spec import CONFIG_FILE, FORMAT_NAME
    from ..hub_ids import is_ref
    from ..loading import load_delta

    path = Path(ref)
    if path.exists():
        problem = unconverted_error(path)
        if problem is not None:
            raise problem
        if path.is_dir():
            return (path / CONFIG_FILE).is_file()
        if path.suffix != ".safetensors":
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    if not is_ref(ref):
        return False
    try:
        load_delta(ref)  # only the delta's own files are fetched (into the cache the merge then reads)
    except HubError:  # not a delta (a model repo), or unreachable: it is the base, whose errors then tell
        return False
    return True


@click.command()
@click.argument("base", required=False)
@click.argument("deltas", nargs=-1)
@click.option(
    "--out", "-o", type=click.Path(path_type=Path), help="Folder to write (must not exist, or be empty)."
)
@click.option(
    "--weight",
    "-w",
    "weights",
    type=float,
    multiple=True,
    help="Weight per delta, in order (default 1.0; -1 subtracts).",
)
@method_options
@click.option(
    "--dtype", type=click.Choice(DTYPES), help="Output dtype of floating tensors (default: the base's)."
)
@click.option(
    "--max-shard-size", help="Largest output file, transformers' syntax: 5GB, 500MB, 2GiB.  [default: 5GB]"
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate and print the plan (touched tensors, overlap, size); write nothing.",
)
@click.option(
    "--force", is_flag=True, help="Skip the base fingerprint check (names and shapes are still checked)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (swapped in only once complete).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A merge.yaml with base, deltas (path, weight, revision), method, options, dtype, out; flags given "
    "as well override it. Every merged folder carries the merge.yaml that reproduces it.",
)
@quiet_option
def merge(
    base: str | None,
    deltas: tuple[str, ...],
    out: Path | None,
    weights: tuple[float, ...],
    method: str | None,
    dtype: str | None,
    max_shard_size: str | None,
    dry_run: bool,
    force: bool,
    overwrite: bool,
    config_path: Path | None,
    quiet: bool,
    **options: float | int | None,
) -> None:
    """Merge sparse deltas into BASE and write a standard transformers model folder.

    BASE is a model folder or Hub id (org/name@revision); each DELTA a delta folder, file or Hub id. Without
    BASE (the first argument is a delta) the base is the one the deltas record, loaded by its id and revision and
    checked against their fingerprints. Deltas of one base combine whatever names they record for it. The base is
    streamed tensor by tensor (memory about one tensor plus the deltas); everything is validated before the first
    byte is written, and the output appears atomically. It loads with plain
    AutoModelForCausalLM.from_pretrained and matches deltahub.load_model's logits exactly.

    \b
    Examples:
      deltahub merge ./llama ./math-delta --out ./llama-math
      deltahub merge acme/math-delta@v1 --out ./math-merged               # the base it records
      deltahub merge meta-llama/Llama-3.2-1B@main org/math@v1 org/code -w 1 -w 0.5 \\
          --method ties --density 0.3 --dtype bfloat16 --out ./llama-mix
      deltahub merge ./llama ./style-delta -w -1 --out ./llama-unstyled      # subtract a delta
      deltahub merge ./llama ./a ./b --dry-run --out ./x                     # plan, overlap, size
      deltahub merge --config ./llama-mix/merge.yaml --out ./llama-mix-again
    """
    from ..merging import merge as run_merge
    from ..merging.config import DeltaEntry, MergeConfig

    flags = pop_method_options(options)
    if config_path is not None:
        if base is not None or deltas:
            raise click.UsageError("give BASE and DELTA on the command line or in --config, not both")
        config = MergeConfig.from_yaml(config_path)
    else:
        if base is None:
            raise click.UsageError("give BASE and at least one DELTA, DELTA alone, or --config merge.yaml")
        if not deltas or is_delta(base):  # all are deltas: the base is the one they record
            base, deltas = None, (base, *deltas)
        config = MergeConfig(base, tuple(DeltaEntry(d) for d in deltas))
    # Flags given on the command line override the config file.
    if weights:
        if len(weights) != len(config.deltas):
            raise click.UsageError(
                f"got {len(weights)} --weight for {len(config.deltas)} deltas; give one per delta, in order"
            )
        config = config.replace(
            deltas=tuple(DeltaEntry(d.path, w, d.revision) for d, w in zip(config.deltas, weights, strict=True))
        )
    changes = {"method": method, "dtype": dtype, "max_shard_size": max_shard_size}
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    if out is not None:
        config = config.replace(out=str(out))
    if flags:
        config = config.replace(options={**config.options, **flags})
    if config.out is None:
        raise click.UsageError("--out is required (or 'out:' in --config)")
    result = run_merge(**config.merge_kwargs(), force=force, overwrite=overwrite, dry_run=dry_run,
                       progress=not quiet)  # fmt: skip
    if dry_run:
        click.echo(str(result.plan))
        click.echo("dry run: nothing written")
    elif not quiet:
        plan = result.plan
        click.echo(
            f"merged {len(plan.deltas)} delta(s) into {len(plan.touched)} of {len(plan.tensors)} tensors "
            f"({sum(result.nnz.values()):,} entries changed): {result.out} ({len(plan.shards)} file(s), "
            f"{plan.total_size / 1e9:.2f} GB)"
        )


merge.help = inspect.cleandoc(merge.help or "") + "\n\n\b\nmerge.yaml:\n" + "".join(f"  {line}\n" for line in EXAMPLE.splitlines())
