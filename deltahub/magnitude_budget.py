"""Magnitude budgets: which entries a "keep the largest" budget keeps, shared by ``deltahub extract`` (the
differences of a fine-tune) and the LoRA converter (the products B @ A). Ties at the threshold are broken by
position, so the kept set has exactly the budget's size and is reproducible."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .errors import InvalidArgumentError

Budget = tuple[str, float | int]  # ("density", fraction) or ("num", count)


def check_budget(density: Any, num: Any, scope: str) -> Budget:
    """The budget from exactly one of ``density`` (a fraction in (0, 1]) or ``num`` (a count of entries), with
    its ``scope`` ("parameter": each tensor keeps its share; "global": one threshold over all of them)."""
    if (density is None) == (num is None):
        raise InvalidArgumentError(
            f"give exactly one of density (a fraction in (0, 1]) or num (a number of entries); got "
            f"density={density!r}, num={num!r}"
        )
    if scope not in ("parameter", "global"):
        raise InvalidArgumentError(f"scope must be 'parameter' or 'global'; got {scope!r}")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise InvalidArgumentError(
                f"density must be a fraction in (0, 1], e.g. 0.01 for 1%; got {density!r}"
            )
        return "density", float(density)
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num <= 0:
        raise InvalidArgumentError(f"num must be a positive integer number of entries; got {num!r}")
    return "num", int(num)


def entries_for(budget: Budget, size: int, total: int) -> int:
    """How many of a tensor's ``size`` entries the budget keeps, ``total`` the size of everything it spans."""
    kind, amount = budget
    if kind == "density":
        return round(amount * size)
    # Integer arithmetic: a float product would misround for counts beyond 2**53.
    return int(amount) * size // total if total else 0


def threshold_of(mag: torch.Tensor, k: int) -> tuple[float, int]:
    """The k-th largest magnitude and how many entries equal to it the top k include."""
    top = torch.topk(mag, k, sorted=False).values
    t = top.min()
    return float(t), k - int((top > t).sum())


def positions_above(mag: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """Sorted flat positions above ``threshold``, plus the first ``ties`` positions equal to it (none at zero:
    an exact zero is no change)."""
    keep = mag > threshold
    if ties > 0 and threshold > 0:
        keep[torch.nonzero(mag == threshold).flatten()[:ties]] = True
    return torch.nonzero(keep).flatten()
