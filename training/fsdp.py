"""Sparse fine-tuning on an FSDP2-sharded base (``torch.distributed.fsdp.fully_shard``).

The frozen base weights are sharded by rows across the ranks; the trainable values, their positions and the
optimizer state over them stay replicated (they are small: the budget of the whole model). How the pieces fit:

- **The weight write goes into the shard.** Each rank writes ``round(base + values)`` only at the active
  positions inside its own row shard (a flat range ``[start, start + numel_local)``), when the values changed,
  exactly as an unsharded layer writes its whole weight. FSDP's all-gather then assembles a weight that is
  already correct, in forward and again in backward, at no per-call cost. (The alternative, adding the values
  to the gathered weight after every all-gather, pays O(k) per forward and per backward re-gather instead of per
  optimizer step; ``benchmarks/fsdp_step.py`` measures both.) Inside a forward whose all-gather already ran,
  the layer also writes the gathered weight in use.
- **The values are not FSDP's.** :func:`shard_sft_model` passes them as ``ignored_params``, so they stay plain
  replicated parameters, and all-reduces (averages) their gradients once per backward in one flat collective,
  as DDP does.
- **Reading base values at newly grown positions** (reselection, loading a checkpoint) is a collective: each
  rank contributes the positions it owns and a sum over ranks fills the rest (exact: every other rank adds
  ``-0.0``).
- **Selection is identical on every rank** because everything it reads is: the values, the averaged gradients
  and SM3's accumulators built from them, and RigL's statistics, which ``SftSelector`` all-reduces.
- **``model.to_delta()`` is complete on every rank** (the delta is replicated state): save it on rank 0.

Example (run under ``torchrun --nproc_per_node 2 train.py``):
    >>> dist.init_process_group("gloo")            # or "nccl"
    >>> model = get_sft_model(AutoModelForCausalLM.from_pretrained(path), SftConfig(density=0.01))
    >>> shard_sft_model(model)                      # fully_shard on every decoder block and on the root
    >>> optimizer = SftAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    >>> selector = SftSelector(model, optimizer, total_update_steps=1000)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

try:  # public since torch 2.4; FSDP2's sharded parameters are DTensors
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = Shard = None

from .errors import SftStateError


def is_sharded(weight: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(weight, DTensor)


# Where each sharded weight's local rows start, by the sharded parameter's identity (the layout never changes
# for one parameter object; FSDP makes a new one when it re-shards, e.g. after model.to()). The weak reference
# tells a live entry from one whose id was reused.
_STARTS: dict[int, tuple[weakref.ref, int]] = {}


def local_range(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(flat local tensor, flat position of its first element)`` of a row-sharded DTensor weight.

    A row shard of a row-major weight is one contiguous range of flat positions; any other sharding is refused.
    """
    ref, start = _STARTS.get(id(weight), (None, None))
    if ref is None or ref() is not weight:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            weight.shape, weight.device_mesh, weight.placements
        )
        if tuple(shape[1:]) != tuple(weight.shape[1:]) or any(offset[1:]):
            raise SftStateError(
                f"sparse fine-tuning needs weights sharded by rows (Shard(0)); got placements {weight.placements} "
                f"for a weight of shape {tuple(weight.shape)}: drop the shard_placement_fn that shards other dims"
            )
        row = weight.numel() // weight.shape[0] if weight.shape[0] else 0
        start = offset[0] * row
        key = id(weight)
        _STARTS[key] = (weakref.ref(weight, lambda _: _STARTS.pop(key, None)), start)
    return weight.to_local().view(-1), start


def _shard_groups(weight: torch.Tensor) -> list:
    """Process groups of the mesh dimensions the weight is sharded over (one for FSDP, one per dim for HSDP's
    shard dimension; replicated dims hold copies and take no part)."""
    mesh = weight.device_mesh
    return [mesh.get_group(d) for d, p in enumerate(weight.placements) if isinstance(p, Shard)]


def write(weight: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Set ``weight`` at flat ``positions`` to ``values`` (cast to the weight's dtype); on a row-sharded weight,
    only the positions this rank holds are written (no communication)."""
    if not is_sharded(weight):
        weight.data.view(-1).index_copy_(0, positions, values.to(weight.dtype))
        return
    flat, start = local_range(weight)
    mine = (positions >= start) & (positions < start + flat.numel())
    flat.index_copy_(0, positions[mine] - start, values[mine].to(flat.dtype))


def read(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``weight`` at flat ``positions``. On a row-sharded weight this is a collective (every rank of the shard
    group must call it with the same positions): each rank fills what it holds and a sum fills the rest."""
    if not is_sharded(weight):
        return weight.data.view(-1).index_select(0, positions)
    flat, start = local_range(weight)
    mine = (positions >= start) & (positions < start + flat.numel())
    # -0.0 is the identity of float addition for every value including +-0.0, so the sum over ranks is
    # exactly the owner's value, sign of zero included (gloo has no bf16 sum: float32 holds every base dtype).
    out = torch.full((positions.numel(),), -0.0, dtype=torch.float32, device=flat.device)
    out[mine] = flat.index_select(0, positions[mine] - start).to(torch.float32)
    for group in _shard_groups(weight):
        dist.all_reduce(out, group=group)
    return out.to(weight.dtype)


class _GradientSync:
    """Averages the replicated values' gradients over the ranks once per backward, in one flat all-reduce per
    dtype (DDP's job, which FSDP does not do for ignored parameters).

    Reducing after every micro-batch of an accumulation is exact: the already-averaged part is the same on
    every rank, so averaging again leaves it unchanged.
    """

    def __init__(self, params: list[nn.Parameter], group):
        self.params, self.group, self.queued = params, group, False
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            # runs once at the end of this backward, after every gradient is accumulated
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    @torch.no_grad()
    def _reduce(self) -> None:
        self.queued = False
        world = dist.get_world_size(self.group)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules whose class ``model._no_split_modules`` names (the classes
    transformers and accelerate shard by)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise SftStateError(
            f"{type(model).__name__} names no transformer block class in _no_split_modules ({sorted(names)}): "
            "pass blocks=[...] (e.g. model.model.layers) to shard_sft_model"
        )
    return blocks


def shard_sft_model(
    model: nn.Module,
    *,
    blocks: Iterable[nn.Module] | None = None,
    mesh=None,
    reshard_after_forward: bool | int = True,
    mp_policy=None,
    group=None,
) -> nn.Module:
    """Shard a prepared model's frozen base with FSDP2, in place: ``fully_shard`` on each block and on the
    root, with the SFT values kept replicated (``ignored_params``) and their gradients averaged over ranks.

    Call it after ``get_sft_model`` (every rank must prepare the same positions: same config seed) and before
    building the optimizer and the selector. The process group must be initialized.

    Args:
        model: a model prepared with ``get_sft_model``.
        blocks: the modules to shard one by one (default: the classes ``model._no_split_modules`` names).
        mesh: a 1-D (FSDP) or 2-D (HSDP) ``DeviceMesh``; default every rank of the default group.
        reshard_after_forward, mp_policy: passed to ``fully_shard``.
        group: the process group for the values' gradient all-reduce (default: a new group of all ranks).

    Returns:
        ``model`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .model import prepared_layers

    if not (dist.is_available() and dist.is_initialized()):
        raise SftStateError(
            "shard_sft_model needs an initialized process group: call dist.init_process_group"
        )
    layers = prepared_layers(model)
    values = [layer.sft_values for layer in layers.values()]
    if any(is_sharded(layer.weight) for layer in layers.values()):
        raise SftStateError(
            "this model is already sharded; call shard_sft_model once, on the unsharded model"
        )
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "ignored_params": set(values),
    }
    for block in decoder_blocks(model) if blocks is None else list(blocks):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for name, layer in layers.items():
        if not is_sharded(layer.weight):
            raise SftStateError(f"{name} was not sharded: pass blocks that contain every SFT layer")
        local_range(layer.weight)  # refuses a non-row sharding now, not at the first write
        layer.__dict__["sft_shard"] = layer.weight  # not registered: FSDP swaps module.weight in forward

    def refresh_shards(module, args):
        # Before any all-gather of this forward: adopt sharded parameters that were replaced since the last
        # call (model.to, load_state_dict(assign=True)) and write changed values into the shards, so the
        # gathered weights are right the first time.
        for layer in layers.values():
            if is_sharded(layer.weight):
                layer.__dict__["sft_shard"] = layer.weight
                layer.sft_sync()

    model.register_forward_pre_hook(refresh_shards, prepend=True)
    model.sft_gradient_sync = _GradientSync(values, group if group is not None else dist.new_group())
    return model


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters this rank holds: ``{"base": frozen (local shards), "trainable": the SFT
    values, "full_base": what the frozen base takes unsharded}``."""
    out = {"base": 0, "trainable": 0, "full_base": 0}
    for p in model.parameters():
        size = p.element_size()
        if p.requires_grad:
            out["trainable"] += p.numel() * size
            continue
        local = p.to_local() if is_sharded(p) else p
        out["base"] += local.numel() * size
        out["full_base"] += p.numel() * size
    return out
