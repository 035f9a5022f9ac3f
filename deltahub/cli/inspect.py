"""`deltahub inspect`: a thin shell over :func:`deltahub.load_delta`, :func:`deltahub.overlap_report` and
:mod:`deltahub.report`."""

from __future__ import annotations

import json
from pathlib import Path

import click


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
