"""``SftAdamW``: AdamW whose state can be reset (or seeded) slot by slot when reselection moves positions.

Each element keeps its own step count ("age") for bias correction, so a slot that starts over mid-training is
corrected like a fresh parameter instead of inheriting the global step, and a slot seeded from gradient
statistics gathered over ``a`` steps is corrected as if it had seen them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from deltahub._dtypes import VALUE_DTYPES, parse_dtype


class SftAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay and per-element bias correction.

    Args:
        params: parameters or parameter groups (usually the model's trainable ``sft_values``).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``. Weight decay on SFT values pulls the delta
            toward zero, i.e. the model toward its base.
        momentum_dtype: dtype of the two moment buffers (``torch.bfloat16`` halves optimizer memory).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_dtype: torch.dtype | str = torch.float32,
    ):
        problems = []
        if not lr >= 0:
            problems.append(f"lr must be >= 0; got {lr}")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            problems.append(f"betas must be two numbers in [0, 1); got {betas}")
        if not eps > 0:
            problems.append(f"eps must be > 0; got {eps}")
        if not weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0; got {weight_decay}")
        if problems:
            raise ValueError("invalid SftAdamW arguments: " + "; ".join(problems))
        momentum_dtype = parse_dtype(momentum_dtype, allowed=VALUE_DTYPES, what="momentum_dtype")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.momentum_dtype = momentum_dtype

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=self.momentum_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.momentum_dtype)
            state["age"] = torch.zeros_like(p, dtype=torch.int32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                grad = p.grad.to(torch.float32)
                age = state["age"].add_(1)
                m = state["exp_avg"].to(torch.float32).lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].to(torch.float32).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                agef = age.to(torch.float32)
                m_hat = m / (1 - torch.pow(beta1, agef))
                v_hat = v / (1 - torch.pow(beta2, agef))
                update = m_hat / (v_hat.sqrt_() + eps)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss

    @torch.no_grad()
    def reset_slots(
        self,
        param: torch.Tensor,
        slots: torch.Tensor,
        *,
        grad_mean: torch.Tensor | None = None,
        grad_sq_mean: torch.Tensor | None = None,
        steps: int = 0,
    ) -> None:
        """Forget the state of ``slots`` (positions moved), or seed it from gradient statistics.

        With ``grad_mean``/``grad_sq_mean`` averaged over ``steps`` update steps (RigL's selection window), the
        moments are set so that their bias-corrected values equal those means, and the slots' age to ``steps``.
        """
        state = self._state(param)
        if grad_mean is None or steps <= 0:
            for key in ("exp_avg", "exp_avg_sq", "age"):
                state[key][slots] = 0
            return
        beta1, beta2 = self._betas(param)
        state["exp_avg"][slots] = (grad_mean * (1 - beta1**steps)).to(self.momentum_dtype)
        state["exp_avg_sq"][slots] = (grad_sq_mean * (1 - beta2**steps)).to(self.momentum_dtype)
        state["age"][slots] = steps

    def _betas(self, param: torch.Tensor) -> tuple[float, float]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group["betas"]
        raise KeyError("parameter is not managed by this optimizer")
