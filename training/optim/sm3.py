"""``SftSM3``: the SM3 optimizer (Anil et al., 2019) on sparse-delta values, with row and column accumulators.

For a weight of shape [rows, cols] it keeps ``r[rows]`` and ``c[cols]`` instead of a per-element second moment.
For an active entry (i, j) with gradient g: ``nu = min(r_i, c_j) + g^2``, the update is ``g / sqrt(nu + eps)``,
then ``r_i = max(r_i, nu)`` and ``c_j = max(c_j, nu)`` over the active entries of that row / column. The
accumulators double as the SM3 selection score: an inactive (i, j) is worth ``r_i * c_j``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def _delta_objects(deltas: Any) -> list[Any]:
    """The delta objects in any of the accepted spellings (a mapping's values; triples' last item; objects)."""
    items = deltas.values() if isinstance(deltas, Mapping) else deltas
    out = [d[-1] if isinstance(d, tuple) else d for d in items]
    bad = [type(d).__name__ for d in out if not hasattr(d, "values") or not hasattr(d, "indices")]
    if bad:
        raise TypeError(
            f"SftSM3 deltas must have .values and .indices (pass model.active_deltas()); got {sorted(set(bad))}"
        )
    return out


class SftSM3(torch.optim.Optimizer):
    """SM3 for sparse fine-tuning.

    Args:
        params: parameters or groups (the model's ``sft_values``; other parameters get per-element
            Adagrad-style accumulators, which is what SM3 reduces to for them).
        deltas: which parameter is which weight's values, and their positions: ``model.active_deltas()`` (its
            ``(module, weight, delta)`` triples), ``model.active_deltas_by_name()``, or any mapping or iterable
            of objects with ``.values`` and ``.indices`` (the SFT fork's ``{delta.values: delta ...}`` works).
        lr: step size (SM3 is scale-free like Adagrad: 0.1 is a usual start).
        momentum: in [0, 1); 0 disables the per-slot momentum buffer.
        eps: added under the square root.
        weight_decay: decoupled, pulls values toward 0 (the base).

    Unknown keyword arguments are an error (the reference implementation silently ignored them).
    """

    def __init__(
        self,
        params: Iterable,
        deltas: Mapping[str, Any],
        lr: float = 0.1,
        momentum: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(
                f"SftSM3 got unknown arguments {sorted(unknown)}; it takes lr, momentum, eps, weight_decay "
                "(SM3 has no betas: its second moments are row/column maxima)"
            )
        problems = []
        if not lr >= 0:
            problems.append(f"lr must be >= 0; got {lr}")
        if not 0 <= momentum < 1:
            problems.append(f"momentum must be in [0, 1); got {momentum}")
        if not eps >= 0:
            problems.append(f"eps must be >= 0; got {eps}")
        if not weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0; got {weight_decay}")
        if problems:
            raise ValueError("invalid SftSM3 arguments: " + "; ".join(problems))
        super().__init__(params, {"lr": lr, "momentum": momentum, "eps": eps, "weight_decay": weight_decay})
        self._deltas = {id(d.values): d for d in _delta_objects(deltas)}

    def delta_of(self, param: torch.Tensor):
        return self._deltas.get(id(param))

    def _state(self, p: torch.Tensor, momentum: float) -> dict:
        state = self.state[p]
        if not state:
            delta = self.delta_of(p)
            if delta is not None:
                rows, cols = delta.module.sft_matrix_shape
                state["row"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
                state["col"] = torch.zeros(cols, dtype=torch.float32, device=p.device)
            else:
                state["acc"] = torch.zeros_like(p, dtype=torch.float32)
            if momentum:
                state["momentum"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, eps, wd = group["lr"], group["momentum"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p, beta)
                grad = p.grad.to(torch.float32)
                if "row" in state:
                    cols = state["col"].numel()
                    idx = self.delta_of(p).indices
                    r, c = idx // cols, idx % cols
                    nu = torch.minimum(state["row"][r], state["col"][c]).addcmul_(grad, grad)
                    state["row"].scatter_reduce_(0, r, nu, "amax")
                    state["col"].scatter_reduce_(0, c, nu, "amax")
                else:
                    nu = state["acc"].addcmul_(grad, grad)
                update = grad / (nu + eps).sqrt()
                if beta:
                    update = state["momentum"].mul_(beta).add_(update, alpha=1 - beta)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss

    def accumulators(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(row, col)`` accumulators of a values parameter, or None before its first step."""
        state = self.state.get(param)
        return (state["row"], state["col"]) if state and "row" in state else None

    @torch.no_grad()
    def reset_slots(self, param: torch.Tensor, slots: torch.Tensor, **_: Any) -> None:
        """Moved slots start with no momentum; row/column accumulators belong to rows and columns, not slots,
        so they stay (that is what makes them a selection score)."""
        state = self.state.get(param)
        if state and "momentum" in state:
            state["momentum"][slots] = 0
