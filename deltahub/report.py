"""Describing deltas for people: per-parameter statistics, the text summary ``deltahub inspect`` prints, and the
``--plot`` heatmaps. Plain functions over :class:`~deltahub.SparseDelta` (and an overlap report's ``to_dict()``),
so the CLI, the demo and notebooks show the same figures.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._dtypes import dtype_name
from .delta import SparseDelta
from .errors import MissingExtraError


def _value_stats(values: torch.Tensor) -> dict[str, float | None]:
    if values.numel() == 0:
        return dict.fromkeys(("min", "max", "mean", "std", "mean_abs"))
    v = values.to(torch.float32)
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "mean_abs": float(v.abs().mean()),
    }


def delta_summary(delta: SparseDelta, source: str) -> dict[str, Any]:
    """Per-parameter nnz, density and value statistics of one delta, with its base and provenance (JSON-able)."""
    vd = delta.values_dtype
    return {
        "source": source,
        "base_model": delta.base_model,
        "base_revision": delta.base_revision,
        "origin": dict(delta.origin),
        "provenance": delta.provenance,
        "params_count": len(delta),
        "nnz": delta.nnz,
        "numel": delta.numel,
        "density": delta.density,
        "values_dtype": dtype_name(vd) if vd else "mixed",
        "params": {
            name: {
                "shape": list(p.shape),
                "dtype": dtype_name(p.dtype),
                "nnz": p.nnz,
                "numel": p.numel,
                "density": p.density,
                **_value_stats(p.values),
            }
            for name, p in delta.items()
        },
    }


def headline(s: dict[str, Any]) -> str:
    """One line for a :func:`delta_summary`: size, density, dtype and base."""
    return (
        f"{s['source']}: {s['params_count']} parameters, nnz {s['nnz']:,} of {s['numel']:,} "
        f"(density {s['density']:.4g}), values {s['values_dtype']}, base {s['base_model'] or '?'}"
        + (f" @ {s['base_revision']}" if s["base_revision"] else "")
    )


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The headline, the provenance and a table row per parameter, as ``deltahub inspect`` prints them."""
    lines = [headline(s)]
    if s["provenance"]:
        lines.append(f"  provenance: {json.dumps(s['provenance'], default=str)}")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    rows = [("parameter", "shape", "nnz", "density", "min", "max", "mean|v|")]
    for name, p in s["params"].items():
        rows.append((name, "x".join(map(str, p["shape"])), f"{p['nnz']:,}", f"{p['density']:.4g}",
                     fmt(p["min"]), fmt(p["max"]), fmt(p["mean_abs"])))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    return lines


# --------------------------------------------------------------------------------------------------------------
# the heatmaps

_LAYER = re.compile(r"^(?:.*?\.)?(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.weight|\.bias)?$")


def layer_and_module(name: str) -> tuple[int, str] | None:
    """``"model.layers.3.mlp.down_proj.weight"`` -> ``(3, "mlp.down_proj")``; None for a name outside the
    repeated blocks (embeddings, the final norm, the LM head)."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class Grid:
    """One heatmap: ``values[module][layer]`` (NaN where that module of that layer is untouched)."""

    modules: list[str]
    layers: int
    values: list[list[float]]
    left_out: list[str]  # parameters outside the layers: not drawn


def grid(values: dict[str, float]) -> Grid:
    cells: dict[tuple[str, int], float] = {}
    left_out = []
    for name, value in values.items():
        where = layer_and_module(name)
        if where:
            cells[(where[1], where[0])] = value
        else:
            left_out.append(name)
    modules = sorted({m for m, _ in cells})
    layers = 1 + max((layer for _, layer in cells), default=-1)
    rows = [[cells.get((m, i), math.nan) for i in range(layers)] for m in modules]
    return Grid(modules, layers, rows, left_out)


@dataclass(frozen=True)
class PlotResult:
    """What :func:`plot_summary` drew, and which parameters it could not place on a layer grid."""

    path: Path
    panels: list[str]
    left_out: list[str]
    scales: dict[str, tuple[float, float]]  # colour scale per kind of panel ("density", "overlap")
    layer_ticks: list[int]  # the x ticks: whole layer numbers


def plot_summary(
    summaries: Sequence[dict[str, Any]], overlap: dict[str, Any] | None, path: str | Path
) -> PlotResult:
    """Heatmaps of density per layer and module type, one per delta, plus the overlap fraction for 2+ deltas.

    The density panels share one colour scale starting at 0, so deltas compare at a glance and a spread of
    0.05420-0.05428 is one colour, not the two ends of the map. Parameters outside the repeated layers
    (embeddings, final norm, LM head) are listed under the figure and in the returned ``left_out``.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(
            "plotting needs matplotlib: pip install 'deltahub[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = [
        (f"density: {s['source']}", "density", {n: p["density"] for n, p in s["params"].items()})
        for s in summaries
    ]
    if overlap:
        panels.append(
            (
                "overlap (positions in 2+ deltas / numel)",
                "overlap",
                {n: p["overlap"] / p["numel"] for n, p in overlap["params"].items()},
            )
        )
    grids = [grid(values) for _, _, values in panels]
    top: dict[str, float] = {}
    for (_, kind, _), g in zip(panels, grids, strict=True):
        finite = [v for row in g.values for v in row if not math.isnan(v)]
        top[kind] = max([top.get(kind, 0.0), *finite])
    left_out = sorted({n for g in grids for n in g.left_out})
    scales = {kind: (0.0, value or 1.0) for kind, value in top.items()}
    layers = max((g.layers for g in grids), default=0)
    ticks = list(range(0, layers, max(1, math.ceil(layers / 16))))  # at most 16, always whole layers
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.5 + 2.2 * len(panels)), squeeze=False)
    for ax, (title, kind, _), g in zip(axes[:, 0], panels, grids, strict=True):
        if not g.modules:
            ax.text(0.5, 0.5, "no per-layer parameters", ha="center", va="center")
            ax.set_axis_off()
            continue
        image = ax.imshow(
            g.values,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            vmin=scales[kind][0],
            vmax=scales[kind][1],
        )
        ax.set_yticks(range(len(g.modules)), g.modules, fontsize=7)
        ax.set_xticks([t for t in ticks if t < g.layers])
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
    if left_out:
        shown = ", ".join(left_out[:6]) + (f" and {len(left_out) - 6} more" if len(left_out) > 6 else "")
        fig.text(0.01, 0.005, f"not shown (outside the layers): {shown}", fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if left_out else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return PlotResult(path, [t for t, _, _ in panels], left_out, scales, ticks)
