"""``SftSelector``: drives reselection from a plain training loop (the Trainer integration uses it too).

    optimizer.step(); optimizer.zero_grad(); selector.step()

After each update step it folds the step's statistics, reselects when the schedule says so (drop the smallest
|values|, grow the best inactive positions by the algorithm's score, reset or seed the moved slots' optimizer
state) and switches RigL's dense-gradient observation on for the steps of the next window only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_optimizer_state, read_checkpoint, write_checkpoint
from .config import SftConfig
from .errors import SftConfigError, SftStateError
from .model import prepared_layers
from .optim import SftAdamW, SftSM3, unwrap_optimizer
from .selection.rigl import RiglStats, grow_rigl
from .selection.schedule import Schedule
from .selection.sm3 import grow_sm3


class SftSelector:
    """Reselects the trainable positions of a model prepared with ``get_sft_model``.

    Args:
        model: the prepared model (or its DDP wrapper).
        optimizer: ``SftAdamW`` or ``SftSM3`` over the model's values (``sm3`` selection needs ``SftSM3``).
        config: defaults to ``model.sft_config``.
        total_update_steps: T, the number of optimizer steps of the run (the rate decays to 0 there).
        grad_accumulation_steps: micro-batches per update step (statistics are per update step).

    Example:
        >>> selector = SftSelector(model, optimizer, total_update_steps=1000)
        >>> for batch in loader:
        ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad(); selector.step()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SftConfig | None = None,
        total_update_steps: int | None = None,
        grad_accumulation_steps: int = 1,
    ):
        self.model = getattr(model, "module", model)
        self.layers = prepared_layers(self.model)
        self.config = config or self.model.sft_config
        if not isinstance(total_update_steps, int) or total_update_steps < 1:
            raise SftConfigError(f"total_update_steps must be a positive integer; got {total_update_steps!r}")
        if not isinstance(grad_accumulation_steps, int) or grad_accumulation_steps < 1:
            raise SftConfigError(
                f"grad_accumulation_steps must be a positive integer; got {grad_accumulation_steps!r}"
            )
        optimizer = unwrap_optimizer(optimizer)  # accelerate (and so Trainer) wraps it; slot resets need ours
        if self.config.selection_algorithm == "sm3" and not isinstance(optimizer, SftSM3):
            raise SftConfigError(
                "selection_algorithm='sm3' scores positions with SftSM3's row/column accumulators; build the "
                f"optimizer with SftSM3(params, model.active_deltas(), ...), not {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.schedule = Schedule(
            self.config.reselection_steps,
            self.config.selection_accumulation_steps,
            total_update_steps,
            self.config.initial_reselection_rate,
            self.config.reselection_rate_policy,
        )
        self.grad_accumulation_steps = grad_accumulation_steps
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A group of our own, so the collectives issued inside backward never interleave with DDP's.
            self.group = dist.new_group()
        self.global_step = 0
        self.stats: dict[str, RiglStats] = {}
        self._observe(self.schedule.in_window(1))

    # -- the training-loop hook ----------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every optimizer step (after ``zero_grad``)."""
        self.global_step += 1
        self.model.sft_steps = self.global_step
        for stats in self.stats.values():
            stats.end_step()
        if self.schedule.is_reselection(self.global_step):
            self.reselect(self.schedule.rate(self.global_step))
        self._observe(self.schedule.in_window(self.global_step + 1))

    def _observe(self, on: bool) -> None:
        if self.config.selection_algorithm != "rigl":
            return
        for name, layer in self.layers.items():
            if on and name not in self.stats:
                self.stats[name] = RiglStats(layer.weight.numel(), layer.sft_indices.numel(), self.group)
            layer.sft_observer = self.stats[name].observe if on else None

    # -- reselection ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def reselect(self, rate: float) -> dict[str, int]:
        """Move ``floor(k * rate)`` slots of every layer; returns how many moved per layer."""
        moved = {}
        for name, layer in self.layers.items():
            moved[name] = self._reselect_layer(name, layer, math.floor(layer.sft_indices.numel() * rate))
        self.stats.clear()
        return moved

    def _reselect_layer(self, name: str, layer, n: int) -> int:
        """Move ``n`` slots of one layer; returns how many moved."""
        values, indices = layer.sft_values, layer.sft_indices
        if n == 0:
            return 0
        # Drop the n smallest |values| (ranks hold identical values, so topk picks identically on each).
        dropped = torch.topk(values.detach().abs().to(torch.float32), n, largest=False, sorted=False).indices
        # Flat masks (1 byte per weight element, transient) answer "is this position kept / dropped / grown?"
        # in O(1) per query; torch.isin sorts both sides and dominated the reselection time.
        kept_mask = torch.zeros(layer.weight.numel(), dtype=torch.bool, device=indices.device)
        kept_mask[indices] = True
        kept_mask[indices[dropped]] = False
        seeds: dict[str, Any] = {}
        if self.config.selection_algorithm == "rigl":
            stats = self.stats.get(name)
            if stats is None or stats.candidates is None:
                return 0  # no gradient observed in the window (e.g. the layer was unused)
            grown, grad_mean, grad_sq_mean = grow_rigl(stats, kept_mask, n)
            seeds = {"grad_mean": grad_mean, "grad_sq_mean": grad_sq_mean, "steps": stats.steps}
        else:
            accumulators = self.optimizer.accumulators(values)
            if accumulators is None:
                return 0
            grown = grow_sm3(*accumulators, kept_mask, n)
        if grown.numel() < n:  # too few candidates: move only as many as can be replaced
            return self._reselect_layer(name, layer, grown.numel())
        old_positions = indices[dropped]
        # A dropped position that is grown again keeps its slot, value and optimizer state.
        was_dropped = torch.zeros_like(kept_mask)
        was_dropped[old_positions] = True
        regrown = was_dropped[grown]
        new_positions = grown[~regrown]
        is_grown = torch.zeros_like(kept_mask)
        is_grown[grown] = True
        freed = dropped[~is_grown[old_positions]]
        if seeds:
            seeds = {
                **seeds,
                "grad_mean": seeds["grad_mean"][~regrown],
                "grad_sq_mean": seeds["grad_sq_mean"][~regrown],
            }
        self._move(layer, freed, new_positions, seeds)
        return int(freed.numel())

    def _move(self, layer, slots: torch.Tensor, positions: torch.Tensor, seeds: dict[str, Any]) -> None:
        if slots.numel() == 0:
            return
        layer.sft_sync()  # the last optimizer step's values must reach the weight before we mark it synced
        layer.sft_write(layer.sft_indices[slots], layer.sft_base[slots])  # old positions back to base
        layer.sft_indices[slots] = positions
        layer.sft_base[slots] = layer.sft_read(positions)  # inactive until now: these are base values
        layer.sft_values[slots] = 0  # new slots add nothing yet, so the weight needs no rewrite
        layer.sft_invalidate_pattern()
        layer.sft_mark_synced()
        if isinstance(self.optimizer, SftAdamW):
            self.optimizer.reset_slots(layer.sft_values, slots, **seeds)
        elif hasattr(self.optimizer, "reset_slots"):
            self.optimizer.reset_slots(layer.sft_values, slots)
        else:
            raise SftStateError(
                f"{type(self.optimizer).__name__} cannot reset the state of moved slots; use SftAdamW or SftSM3"
            )

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write an adapter-only checkpoint (``sft_state.safetensors``: positions, values, window statistics and
        the optimizer's state, never the base) into ``folder``; call it on one rank (the state is replicated)."""
        return write_checkpoint(folder, self.model, self.state_dict(), self.optimizer)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Resume from :meth:`save_checkpoint`'s folder on a freshly prepared copy of the same base (every rank
        calls it). Training continues bit-identically to a run that was never interrupted, provided the loop
        feeds the same batches from here on."""
        checkpoint = read_checkpoint(folder)
        checkpoint.check_fits(self.model)
        self.load_state_dict(checkpoint.selector_state())
        if checkpoint.optimizer is not None:
            load_optimizer_state(self.optimizer, self.model, checkpoint.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step, window statistics and the model's SFT state (positions,
        values). Works with ``accelerator.register_for_checkpointing(selector)``."""
        return {
            "global_step": self.global_step,
            "stats": {name: s.state_dict() for name, s in self.stats.items()},
            "sft": self.model.sft_state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_sft_state_dict(state["sft"])
        self.global_step = int(state["global_step"])
        self.model.sft_steps = self.global_step
        self.stats = {}
        for name, s in state["stats"].items():
            layer = self.layers[name]
            self.stats[name] = RiglStats(layer.weight.numel(), layer.sft_indices.numel(), self.group)
            device = layer.sft_values.device
            self.stats[name].load_state_dict(
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            )
        self._observe(self.schedule.in_window(self.global_step + 1))
