"""The ``README.md`` model card written next to a saved delta (the Hub renders it as the repo's front page)."""

from __future__ import annotations

import json

from ._dtypes import dtype_name
from .delta import SparseDelta


def _yaml_str(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, so ids with ':' or '#' cannot break the front matter.
    return json.dumps(text, ensure_ascii=False)


def model_card(delta: SparseDelta, *, location: str | None = None) -> str:
    """A minimal model card for ``delta``: Hub front matter, one paragraph, usage and size.

    Args:
        delta: the delta being saved.
        location: where users will load it from (a folder or Hub repo id); a placeholder when None.

    Returns:
        The card as Markdown text.
    """
    front = ["---", "library_name: deltahub"]
    if delta.base_model:
        front.append(f"base_model: {_yaml_str(delta.base_model)}")
    front += ["tags:", "- deltahub", "- sparse-delta", "---"]
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
        "## Size",
        "",
        f"- nnz: {delta.nnz:,} of {delta.numel:,} elements of the touched parameters",
        f"- density: {delta.density:.6g}",
        f"- values dtype: {dtype_name(vd) if vd else 'mixed'}",
        "",
    ]
    return "\n".join(front + body)
