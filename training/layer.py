"""The sparse fine-tuning op: a linear layer whose weight is ``W + scatter(values at indices)``.

How it avoids the reference implementation's cost:
- No dense clone of W per call. The effective weight lives in W itself: the k active positions hold
  ``round(base + values)`` (the base values there are kept in ``sft_base``, O(k)), re-written only when the
  values changed (an optimizer step bumps their autograd version counter). The forward is then a plain
  ``F.linear`` and ``grad_x = grad_y @ W`` is the same product a frozen model computes.
- No dense weight gradient: the values' gradient is ``(grad_y^T @ x)`` sampled at the k positions, a sampled
  dense-dense product (SDDMM): deltahub's C kernel on CPU (``kernels.py``), its Triton kernel on CUDA
  (``triton_sddmm.py``), ``torch.sparse.sampled_addmm``, or one dense product and a gather where that is
  faster (``sddmm.py`` holds the rules and the ``DELTAHUB_SDDMM_KERNEL`` switch). The dense product is always
  formed while RigL gathers selection statistics (``sft_observer`` set), and handed to the observer.

The written weight equals what ``deltahub.apply_deltas`` gives for the exported delta on a fresh base (same
float32 sum, rounded once), so exported deltas reproduce the trained model exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import fsdp, sddmm

try:  # GPT-2 style models use transformers' Conv1D: a linear layer with a transposed [in, out] weight.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

Observer = Callable[[torch.Tensor], None]


class SftLayerMixin:
    """Shared behaviour of the sparse-delta layers; mixed in before ``nn.Linear`` or ``Conv1D``.

    Attributes set by :func:`attach`: ``sft_values`` (trainable, k), ``sft_indices`` (int64 flat positions into
    the weight, k, unsorted: slot order), ``sft_base`` (base values at those positions, weight dtype),
    ``sft_name`` (the weight's state-dict name), ``sft_observer`` (RigL's dense-gradient hook or None).
    """

    sft_transposed = False  # weight stored [in, out] (Conv1D) instead of [out, in]

    sft_shard = None  # under FSDP2 (training/fsdp.py): the weight's sharded parameter, which outlives forward

    def sft_sync(self) -> None:
        """Write ``round(base + values)`` into the weight at the active positions if the values changed."""
        values = self.sft_values
        if values._version == self._sft_synced_version:
            return
        with torch.no_grad():
            effective = self.sft_base.to(torch.float32) + values.detach().to(torch.float32)
            self.sft_write(self.sft_indices, effective)
        self._sft_synced_version = values._version

    def sft_write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Set the weight at flat ``positions`` (rounded once into its dtype)."""
        weight = self.weight
        if fsdp.is_sharded(weight):
            self.__dict__["sft_shard"] = weight
        fsdp.write(weight, positions, values)
        if self.sft_shard is not None and self.sft_shard is not weight:
            # inside an FSDP forward: ``weight`` is the gathered copy in use now; the shard feeds later gathers
            fsdp.write(self.sft_shard, positions, values)

    def sft_read(self, positions: torch.Tensor) -> torch.Tensor:
        """The weight at flat ``positions`` (a collective on a sharded weight: every rank must call it)."""
        return fsdp.read(self.sft_shard if self.sft_shard is not None else self.weight, positions)

    def sft_mark_synced(self) -> None:
        self._sft_synced_version = self.sft_values._version

    def sft_pattern(self) -> sddmm.Pattern:
        """The active positions sorted for the sampled products (cached until the positions change)."""
        if self._sft_pattern is None:
            self._sft_pattern = sddmm.Pattern(self.sft_indices, self.sft_matrix_shape)
        return self._sft_pattern

    def sft_invalidate_pattern(self) -> None:
        self._sft_pattern = None

    @property
    def sft_matrix_shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sft_sync()
        return _SparseDeltaLinear.apply(x, self.weight, self.bias, self.sft_values, self)

    # The trainable state is not part of the model's own state dict: ``save_pretrained`` then writes a plain
    # model (the weights hold the merged values), and SFT state travels through ``sft_state_dict``.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "sft_values", None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "sft_values" in missing_keys:
            missing_keys.remove(prefix + "sft_values")
        # A plain checkpoint overwrote the weight: the active positions must be rewritten from the values.
        self._sft_synced_version = -1


class SftLinear(SftLayerMixin, nn.Linear):
    pass


if Conv1D is not None:

    class SftConv1D(SftLayerMixin, Conv1D):
        sft_transposed = True


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.amp.is_autocast_available(device_type):  # e.g. meta: asking would raise
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, layer):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.compute_dtype = _autocast_dtype(x.device.type)
        ctx.save_for_backward(x)
        if layer.sft_transposed:
            out_features = weight.shape[1]
            flat = (
                torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
                if bias is not None
                else x.reshape(-1, x.shape[-1]) @ weight
            )
            return flat.view(*x.shape[:-1], out_features)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        weight = layer.weight
        needs_x, _, needs_bias, needs_values, _ = ctx.needs_input_grad
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_values = None
        if needs_x:
            dtype = ctx.compute_dtype or gy.dtype
            w = weight.to(dtype)
            gx = gy.to(dtype) @ (w.t() if layer.sft_transposed else w)
            grad_x = gx.view(*x.shape[:-1], gx.shape[-1]).to(x.dtype)
        if needs_bias and ctx.has_bias:
            grad_bias = gy.sum(0).to(layer.bias.dtype)
        if needs_values:
            grad_values = sddmm.values_grad(layer, gy, x2d, ctx.compute_dtype).to(layer.sft_values.dtype)
        return grad_x, None, grad_bias, grad_values, None


def layer_classes() -> dict[type, type]:
    """Base layer class -> its sparse-delta counterpart (exact classes: subclasses are not swapped)."""
    classes = {nn.Linear: SftLinear}
    if Conv1D is not None:
        classes[Conv1D] = SftConv1D
    return classes


def attach(module: nn.Module, name: str, indices: torch.Tensor, values_dtype: torch.dtype) -> SftLayerMixin:
    """Turn ``module`` (an ``nn.Linear`` or ``Conv1D``) into its sparse-delta layer in place, with values 0 at
    ``indices``. The weight is frozen; the module keeps its identity, parameters and hooks."""
    cls = layer_classes()[type(module)]
    weight = module.weight
    if not weight.is_contiguous():
        raise ValueError(f"{name}: sparse fine-tuning needs a contiguous weight")
    weight.requires_grad_(False)
    module.__class__ = cls
    device = weight.device
    indices = indices.to(device=device, dtype=torch.int64)
    module.sft_values = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype, device=device))
    module.register_buffer("sft_indices", indices, persistent=False)
    module.register_buffer("sft_base", weight.detach().view(-1).index_select(0, indices), persistent=False)
    module.sft_name = name
    module.sft_observer = None
    module._sft_pattern = None
    module.sft_mark_synced()
    return module


def detach(module: SftLayerMixin, *, merge: bool) -> nn.Module:
    """Undo :func:`attach`: ``merge=True`` keeps the trained values in the weight, ``False`` restores the base."""
    with torch.no_grad():
        if merge:
            module._sft_synced_version = -1
            module.sft_sync()
        else:
            module.sft_write(module.sft_indices, module.sft_base)
    base_cls = next(c for c, s in layer_classes().items() if s is type(module))
    del module.sft_values
    del module._buffers["sft_indices"], module._buffers["sft_base"]
    for attr in ("sft_name", "sft_observer", "_sft_pattern", "_sft_synced_version", "sft_shard"):
        module.__dict__.pop(attr, None)
    module.__class__ = base_cls
    return module
