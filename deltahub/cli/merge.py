"""`deltahub merge`, `deltahub inspect`, `deltahub extract`: thin shells over :func:`deltahub.merge`,
:func:`deltahub.load_delta` + :func:`deltahub.overlap_report`, and :func:`deltahub.extract_delta`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..methods import available_methods, get_method

_DTYPES = ["float32", "bfloat16", "float16"]
_QUIET = click.option(
    "--quiet", "-q", is_flag=True, help="No progress bars or summaries; errors still print."
)


def _option_help(option: str) -> str:
    """Help for a method option, written once in the registry: which methods take it, and its range."""
    parts = []
    for name in available_methods():
        spec = get_method(name)
        if option in spec.options:
            o = spec.options[option]
            parts.append(f"{name}: {o.help}, {o.range}, default {o.default:g}")
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------------------------
# merge

_CONFIG_KEYS = {"base", "deltas", "method", "options", "dtype", "max_shard_size", "out"}
_DELTA_KEYS = {"path", "weight", "revision"}


def read_config(path: Path) -> dict[str, Any]:
    """A ``merge.yaml`` as merge() keyword arguments: base, deltas (with weights), method, method_options, dtype,
    max_shard_size and out. Raises ValueError listing every problem."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read the merge config {path}: {err}") from err
    problems = []
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a YAML mapping with keys {sorted(_CONFIG_KEYS)}")
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown}; valid: {sorted(_CONFIG_KEYS)}")
    if not isinstance(data.get("base"), str):
        problems.append("'base' must be a model folder or Hub id like 'org/name@revision'")
    entries = data.get("deltas")
    deltas, weights = [], []
    if not isinstance(entries, list) or not entries:
        problems.append("'deltas' must be a non-empty list of {path, weight, revision} entries")
        entries = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append(f"deltas[{i}] must be a path string or a mapping with a 'path'")
            continue
        bad = sorted(set(entry) - _DELTA_KEYS)
        if bad:
            problems.append(f"deltas[{i}] has unknown keys {bad}; valid: {sorted(_DELTA_KEYS)}")
        revision = entry.get("revision")
        deltas.append(entry["path"] + (f"@{revision}" if revision else ""))
        weights.append(entry.get("weight", 1.0))
    options = data.get("options") or {}
    if not isinstance(options, dict):
        problems.append("'options' must be a mapping like {density: 0.5}")
    if problems:
        raise ValueError(f"invalid merge config {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    config: dict[str, Any] = {
        "base": data["base"],
        "deltas": deltas,
        "weights": weights,
        "method_options": options,
    }
    for key in ("method", "dtype", "max_shard_size", "out"):
        if data.get(key) is not None:
            config[key] = str(data[key])
    return config


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
@click.option(
    "--method", type=click.Choice(available_methods()), help="How to combine the deltas.  [default: sum]"
)
@click.option("--density", type=float, help=_option_help("density"))
@click.option("--seed", type=int, help=_option_help("seed"))
@click.option(
    "--dtype", type=click.Choice(_DTYPES), help="Output dtype of floating tensors (default: the base's)."
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
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A merge.yaml with base, deltas (path, weight, revision), method, options, dtype, out.",
)
@_QUIET
@click.pass_context
def merge(
    ctx: click.Context,
    base: str | None,
    deltas: tuple[str, ...],
    out: Path | None,
    weights: tuple[float, ...],
    method: str | None,
    density: float | None,
    seed: int | None,
    dtype: str | None,
    max_shard_size: str | None,
    dry_run: bool,
    force: bool,
    overwrite: bool,
    config_path: Path | None,
    quiet: bool,
) -> None:
    """Merge sparse deltas into BASE and write a standard transformers model folder.

    BASE is a model folder or Hub id (org/name@revision); each DELTA a delta folder, file or Hub id. The base is
    streamed tensor by tensor (memory about one tensor plus the deltas); everything is validated before the first
    byte is written, and the output appears atomically. It loads with plain
    AutoModelForCausalLM.from_pretrained and matches deltahub.load_model's logits exactly.

    \b
    Examples:
      deltahub merge ./llama ./math-delta --out ./llama-math
      deltahub merge meta-llama/Llama-3.2-1B@main org/math@v1 org/code -w 1 -w 0.5 \\
          --method ties --density 0.3 --dtype bfloat16 --out ./llama-mix
      deltahub merge ./llama ./style-delta -w -1 --out ./llama-unstyled      # subtract a delta
      deltahub merge ./llama ./a ./b --dry-run --out ./x                     # plan, overlap, size
      deltahub merge --config merge.yaml --out ./merged

    \b
    merge.yaml:
      base: meta-llama/Llama-3.2-1B@main
      deltas:
        - {path: org/math-delta, revision: v1, weight: 1.0}
        - {path: ./code-delta, weight: 0.5}
      method: ties
      options: {density: 0.3}
      dtype: bfloat16
    """
    from ..merging import merge as run_merge

    kwargs: dict[str, Any] = {"method_options": {}}
    if config_path is not None:
        if base is not None or deltas:
            raise click.UsageError("give BASE and DELTA on the command line or in --config, not both")
        kwargs.update(read_config(config_path))
    else:
        if base is None or not deltas:
            raise click.UsageError("give BASE and at least one DELTA (or --config merge.yaml)")
        kwargs.update(base=base, deltas=list(deltas))
    # Flags given on the command line override the config file.
    if weights:
        kwargs["weights"] = list(weights)
    for key, value in (
        ("method", method),
        ("dtype", dtype),
        ("max_shard_size", max_shard_size),
        ("out", out),
    ):
        if value is not None:
            kwargs[key] = value
    for key, value in (("density", density), ("seed", seed)):
        if value is not None:
            kwargs["method_options"][key] = value
    if kwargs.get("out") is None:
        raise click.UsageError("--out is required (or 'out:' in --config)")
    result = run_merge(
        kwargs.pop("base"), kwargs.pop("deltas"), force=force, overwrite=overwrite, dry_run=dry_run,
        progress=not quiet, **kwargs,
    )  # fmt: skip
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


# --------------------------------------------------------------------------------------------------------------
# inspect


@click.command()
@click.argument("deltas", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write density (and overlap) heatmaps per layer and module type as a PNG (needs matplotlib: pip install 'deltahub[plot]').",
)
def inspect(deltas: tuple[str, ...], as_json: bool, plot: Path | None) -> None:
    """Describe sparse deltas: per parameter nnz, density and value statistics, base and provenance; with two or
    more, where they overlap and disagree in sign.

    Each DELTA is a delta folder, file or Hub id (org/name@revision).

    \b
    Examples:
      deltahub inspect ./math-delta
      deltahub inspect ./math-delta org/code-delta@v2 --json > report.json
      deltahub inspect ./a ./b --plot overlap.png
    """
    from ..inputs import validate_inputs
    from ..overlap import overlap_inputs
    from ..report import delta_summary, plot_summary, summary_lines

    inputs = validate_inputs(list(deltas))
    summaries = [delta_summary(d, src) for d, src in zip(inputs.deltas, deltas, strict=True)]
    report = overlap_inputs(inputs) if len(inputs.deltas) > 1 else None
    plotted = (
        plot_summary(summaries, report.to_dict() if report else None, plot) if plot is not None else None
    )
    if as_json:
        click.echo(
            json.dumps({"deltas": summaries, "overlap": report.to_dict() if report else None}, indent=2)
        )
        return
    for s in summaries:
        for line in summary_lines(s):
            click.echo(line)
    if report is not None:
        click.echo(str(report))
    if plotted is not None:
        click.echo(f"plot written to {plotted.path}")
        if plotted.left_out:
            click.echo(f"  not in the plot (outside the repeated layers): {', '.join(plotted.left_out)}")


# --------------------------------------------------------------------------------------------------------------
# extract


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
@click.option("--values-dtype", type=click.Choice(_DTYPES), default="float32", show_default=True,
              help="Dtype of the stored values (bfloat16 halves their size).")  # fmt: skip
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest delta file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@_QUIET
def extract(
    base: str,
    finetuned: str,
    out: Path,
    density: float | None,
    num: int | None,
    scope: str,
    values_dtype: str,
    max_shard_size: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Extract a sparse delta from a full fine-tune: the top entries of |FINETUNED - BASE|.

    BASE and FINETUNED are model folders or Hub ids (org/name@revision); both are streamed one tensor at a time.

    \b
    Examples:
      deltahub extract ./llama ./llama-sft --density 0.01 --out ./sft-delta
      deltahub extract meta-llama/Llama-3.2-1B org/llama-sft@main --num 5000000 --scope global \\
          --values-dtype bfloat16 --out ./sft-delta
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
        progress=not quiet,
    )
    if base_folder != Path(base):  # a Hub base: record its id and commit, not the cache folder
        delta = delta.replace(base_model=base_id, base_revision=base_rev)
    save_delta(delta, out, max_shard_size=max_shard_size, overwrite=overwrite)
    if not quiet:
        size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
        click.echo(
            f"extracted {len(delta)} parameters, nnz {delta.nnz:,} (density {delta.density:.4g}) from {ft_id}: "
            f"{out} ({size / 1e6:.1f} MB)"
        )
