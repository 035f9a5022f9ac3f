"""Tied tensors: several state-dict names, one tensor (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``).

One identity rule for everything that must change such a tensor once (apply, the merge, extraction's sources).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .delta import ParamDelta
from .errors import BaseMismatchError


def storage_key(t: torch.Tensor) -> tuple | None:
    """Equal keys mean the same memory viewed the same way (tied weights); None for a tensor that can share
    nothing: empty and meta tensors have no memory, and without this they would all look like one tensor."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def tied_groups(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Names grouped by tensor, in first-seen order; a name whose tensor shares nothing is a group of one."""
    groups: dict[object, list[str]] = {}
    for name, t in tensors:
        key = storage_key(t)
        groups.setdefault(key if key is not None else ("alone", name), []).append(name)
    return list(groups.values())


def check_tied(groups: Iterable[list[str]], change: Callable[[str], ParamDelta], where: str = "") -> None:
    """A tied tensor changed under two names must get the same change from both; raise BaseMismatchError."""
    for names in groups:
        if len(names) < 2:
            continue
        first = change(names[0])
        for other in names[1:]:
            if not first.equal(change(other)):
                raise BaseMismatchError(
                    f"{names[0]} and {other} are one tied tensor{where} in this model but the deltas change them "
                    "differently; keep one of the two names in the delta"
                )
