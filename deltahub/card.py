"""The ``README.md`` model card written next to a saved delta (the Hub renders it as the repo's front page).

The YAML front matter is what the Hub indexes: ``library_name: deltahub`` (so the Hub can show deltahub's
snippet), ``base_model`` (links the delta to its base's model tree), ``tags`` and ``license``. It follows the
Hub's metadata rules (``/api/validate-yaml``): every value is a string or a list of strings.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from ._dtypes import dtype_name
from .delta import SparseDelta
from .hub_ids import is_repo_id

# Beyond this many rows the table stops being readable; delta_config.json lists every parameter anyway.
MAX_TABLE_ROWS = 200
# Provenance can carry long lists (skipped parameters); the card shows the start, the config holds it all.
MAX_PROVENANCE_CHARS = 4000


def _yaml_str(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, so ids with ':' or '#' cannot break the front matter.
    return json.dumps(text, ensure_ascii=False)


def is_hub_model_id(text: str | None) -> bool:
    """Whether ``text`` has the shape of a Hub model id, ``name`` or ``namespace/name`` (and so may go in
    ``base_model``, which the Hub resolves to a model page); a local path ("./base") does not."""
    return is_repo_id(text, namespaced=False)


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


def _front_matter(delta: SparseDelta, license: str | None) -> list[str]:
    front = ["---", "library_name: deltahub"]
    if is_hub_model_id(delta.base_model):
        front.append(f"base_model: {_yaml_str(delta.base_model)}")
    front += ["tags:", "- deltahub", "- sparse-delta"]
    algorithm = _tag(algorithm_of(delta.provenance) or "")
    if algorithm and algorithm not in ("deltahub", "sparse-delta"):
        front.append(f"- {_yaml_str(algorithm)}")
    if license:
        front.append(f"license: {_yaml_str(license)}")
    return [*front, "---"]


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


def model_card(delta: SparseDelta, *, location: str | None = None, license: str | None = None) -> str:
    """The model card for ``delta``: Hub front matter, usage, provenance and size.

    Args:
        delta: the delta being saved or pushed.
        location: where users will load it from (a folder or Hub repo id); a placeholder when None.
        license: a license id for the front matter (e.g. ``"apache-2.0"``); else ``provenance["license"]``
            when it is a string; else none.

    Returns:
        The card as Markdown text.
    """
    if license is None and isinstance(delta.provenance.get("license"), str):
        license = delta.provenance["license"]
    base = delta.base_model or "path/to/base-model"
    where = location or "path/to/this-delta"
    vd = delta.values_dtype
    on = f"`{delta.base_model}`" if delta.base_model else "its base model"
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
        f"model = deltahub.load_model({base!r}, deltas=[{where!r}])",
        "```",
        "",
        "Or write a standalone merged checkpoint that plain `transformers` loads:",
        "",
        "```bash",
        f"deltahub merge {shlex.quote(base)} {shlex.quote(where)} --out merged",
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
    return "\n".join(_front_matter(delta, license) + body)
