"""The merged model's README.md: base, every delta with weight and revision, method, and the merge.yaml that
reproduces it."""

from __future__ import annotations

import json

from .._dtypes import dtype_name
from .._version import __version__
from .plan import MergePlan


def _yaml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def model_card(plan: MergePlan) -> str:
    """The ``README.md`` of a merged model: the base, every delta with weight and revision, the method, and the
    ``merge.yaml`` that reproduces it."""
    front = [
        "---",
        "library_name: transformers",
        f"base_model: {_yaml_str(plan.base)}",
        "base_model_relation: merge",
        "tags:",
        "- deltahub",
        "- merge",
        "---",
    ]
    rows = [
        f"| {i} | `{d.source}` | {d.revision or '-'} | {d.weight:g} | {d.params} | {d.nnz:,} |"
        for i, d in enumerate(plan.deltas)
    ]
    opts = ", ".join(f"{k}={v}" for k, v in plan.options.items()) or "none"
    config = plan.config.to_yaml().splitlines() if plan.config is not None else []
    body = [
        "",
        f"# {plan.out.name}",
        "",
        f"`{plan.base}`"
        + (f" (revision `{plan.base_revision}`)" if plan.base_revision else "")
        + f" with {len(plan.deltas)} sparse delta(s) merged in by deltahub {__version__}. A standard "
        "transformers checkpoint: it loads with `AutoModelForCausalLM.from_pretrained` and needs no deltahub.",
        "",
        "## Deltas",
        "",
        "| # | delta | revision | weight | parameters | nnz |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Method: `{plan.method}` (options: {opts}). Output dtype: "
        f"{dtype_name(plan.dtype) if plan.dtype else 'as the base'}. Changed tensors: {len(plan.touched)} of "
        f"{len(plan.tensors)}; every other tensor is byte-identical to the base.",
        "",
        "## Reproduce",
        "",
        "This folder's `merge.yaml`:",
        "",
        "```yaml",
        *config,
        "```",
        "",
        "```bash",
        f"deltahub merge --config {plan.out.name}/merge.yaml --out {plan.out.name}-again",
        "```",
        "",
    ]
    return "\n".join(front + body)
