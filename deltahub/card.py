"""The ``README.md`` model card written next to a saved delta (the Hub renders it as the repo's front page).

The metadata is built with ``huggingface_hub.ModelCardData`` and the card with ``ModelCard``, so it follows the
Hub's own rules: ``library_name: deltahub`` (the Hub can show deltahub's snippet), ``base_model`` with
``base_model_relation: adapter`` (links the delta into its base's model tree; only a Hub id, never a local
path), ``tags`` and ``license``. Metadata that is already on a Hub card (a license, extra tags, datasets) can be
carried over with ``metadata=``.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ._dtypes import dtype_name
from .delta import SparseDelta

# Beyond this many rows the table stops being readable; delta_config.json lists every parameter anyway.
MAX_TABLE_ROWS = 200
# Provenance can carry long lists (skipped parameters); the card shows the start, the config holds it all.
MAX_PROVENANCE_CHARS = 4000


def algorithm_of(provenance: dict[str, Any]) -> str | None:
    """The training algorithm the provenance names (``algorithm``, else ``selection_algorithm``), if any."""
    for key in ("algorithm", "selection_algorithm"):
        value = provenance.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _tag(text: str) -> str:
    # Hub tags are lowercase words joined by dashes; anything else would be a tag nobody can search for.
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# Keys the card owns: a carried-over card's values for them are replaced, not merged.
_OWNED = ("library_name", "base_model", "base_model_relation")


def card_data(
    delta: SparseDelta, *, license: str | None = None, metadata: Mapping[str, Any] | None = None
) -> ModelCardData:
    """The card's metadata: ``metadata`` (what a Hub card already has) with deltahub's keys set over it. Tags
    are merged (ours first); ``license`` wins over the carried-over one."""
    from .identity import is_hub_id

    carried = {k: v for k, v in dict(metadata or {}).items() if k not in _OWNED and v is not None}
    tags = ["deltahub", "sparse-delta"]
    algorithm = _tag(algorithm_of(delta.provenance) or "")
    if algorithm and algorithm not in tags:
        tags.append(algorithm)
    extra = carried.pop("tags", None) or []
    tags += [
        t for t in ([extra] if isinstance(extra, str) else extra) if isinstance(t, str) and t not in tags
    ]
    if license is not None:
        carried["license"] = license
    fields: dict[str, Any] = {"library_name": "deltahub", **carried, "tags": tags}
    if is_hub_id(delta.base_model):
        fields["base_model"] = delta.base_model
        fields["base_model_relation"] = "adapter"
    return ModelCardData(**fields)


def _modules_table(delta: SparseDelta) -> list[str]:
    rows = ["| parameter | shape | nnz | density |", "| --- | --- | ---: | ---: |"]
    for i, (name, p) in enumerate(delta.items()):
        if i == MAX_TABLE_ROWS:
            rows.append(f"| ... and {len(delta) - MAX_TABLE_ROWS} more (see `delta_config.json`) | | | |")
            break
        shape = "x".join(str(s) for s in p.shape) or "scalar"
        rows.append(f"| `{_cell(name)}` | {shape} | {p.nnz:,} | {p.density:.4g} |")
    return rows


def _provenance(delta: SparseDelta) -> list[str]:
    lines = []
    if delta.base_model:
        rev = f" at revision `{delta.base_revision}`" if delta.base_revision else ""
        lines.append(f"- base model: `{delta.base_model}`{rev}")
    algorithm = algorithm_of(delta.provenance)
    if algorithm:
        lines.append(f"- training algorithm: {algorithm}")
    if delta.provenance:
        text = json.dumps(delta.provenance, indent=2, ensure_ascii=False, default=str)
        if len(text) > MAX_PROVENANCE_CHARS:
            text = text[:MAX_PROVENANCE_CHARS] + "\n... (truncated; the full record is in delta_config.json)"
        lines += ["", "```json", text, "```"]
    return lines or ["No provenance was recorded."]


def model_card(
    delta: SparseDelta,
    *,
    location: str | None = None,
    license: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """The model card for ``delta``: Hub metadata (:func:`card_data`), usage, provenance and size.

    Args:
        delta: the delta being saved or pushed.
        location: where users will load it from (a folder or Hub repo id); a placeholder when None.
        license: a license id for the metadata (e.g. ``"apache-2.0"``); else ``provenance["license"]`` when it
            is a string; else the carried-over one, if any.
        metadata: metadata to carry over (an existing Hub card's), see :func:`card_data`.

    Returns:
        The card as Markdown text with YAML front matter.
    """
    from .identity import is_hub_id

    if license is None and isinstance(delta.provenance.get("license"), str):
        license = delta.provenance["license"]
    where = location or "path/to/this-delta"
    vd = delta.values_dtype
    on_hub = is_hub_id(delta.base_model)
    on = f"`{delta.base_model}`" if delta.base_model else "its base model"
    if on_hub:
        rev = f", revision={delta.base_revision!r}" if delta.base_revision else ""
        usage = [
            "# The base this delta records is loaded by its id and checked against the delta's fingerprint.",
            f"model = deltahub.load_model(deltas=[{where!r}])",
            "# Or name the base (a local copy of it works too):",
            f"model = deltahub.load_model({delta.base_model!r}, deltas=[{where!r}]{rev})",
        ]
        base_arg = delta.base_model + (f"@{delta.base_revision}" if delta.base_revision else "")
    else:
        base_arg = delta.base_model or "path/to/base-model"
        usage = [f"model = deltahub.load_model({base_arg!r}, deltas=[{where!r}])"]
    body = [
        "",
        "# Sparse delta" + (f" for {delta.base_model}" if delta.base_model else ""),
        "",
        f"A sparse weight delta made with deltahub. It stores only the changed entries of {len(delta)} "
        f"parameters of {on} as flat positions and values, and is added to the base weights when the model "
        "is loaded; untouched weights stay bit-identical to the base.",
        "",
        "## Usage",
        "",
        "```python",
        "import deltahub",
        "",
        *usage,
        "```",
        "",
        "Or write a standalone merged checkpoint that plain `transformers` loads:",
        "",
        "```bash",
        f"deltahub merge {shlex.quote(base_arg)} {shlex.quote(where)} --out merged",
        "```",
        "",
        "## Provenance",
        "",
        *_provenance(delta),
        "",
        "## Size",
        "",
        f"- nnz: {delta.nnz:,} of {delta.numel:,} elements of the touched parameters",
        f"- density: {delta.density:.6g}",
        f"- values dtype: {dtype_name(vd) if vd else 'mixed'}",
        "",
        "## Touched parameters",
        "",
        *_modules_table(delta),
        "",
    ]
    data = card_data(delta, license=license, metadata=metadata)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body)))
