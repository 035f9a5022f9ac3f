"""The merged model's README.md: base, every delta with weight and revision, method, and the merge.yaml that
reproduces it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._dtypes import dtype_name
from .._version import __version__
from .plan import MergePlan

if (
    TYPE_CHECKING
):  # huggingface_hub's card module costs 0.25 s to import (tqdm, the Hub API): only when writing one
    from huggingface_hub import ModelCardData


def card_metadata(hub_base: str | None, hub_deltas: Sequence[str]) -> ModelCardData:
    """The merged model's Hub metadata: ``base_model`` lists what went in (the base, then each delta repo) by Hub
    id, and ``base_model_relation: merge``; a base or delta known only by a local path is left out of it."""
    from huggingface_hub import ModelCardData

    models = list(dict.fromkeys([*([hub_base] if hub_base else []), *hub_deltas]))
    data = ModelCardData(library_name="transformers", tags=["deltahub", "merge"])
    if models:
        data.base_model = models
        data.base_model_relation = "merge"
    return data


def model_card(plan: MergePlan, *, hub_base: str | None = None, hub_deltas: Sequence[str] = ()) -> str:
    """The ``README.md`` of a merged model: Hub metadata (:func:`card_metadata`), the base, every delta with weight
    and revision, the method, and the ``merge.yaml`` that reproduces it.

    Args:
        plan: the merge's plan.
        hub_base: the base's Hub id, when it has one (the card links the model tree to it).
        hub_deltas: the Hub ids of the deltas that came from the Hub.
    """
    data = card_metadata(hub_base, hub_deltas)
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
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body)))
