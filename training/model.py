"""Preparing a transformers model for sparse fine-tuning, and exporting what it learned as a ``SparseDelta``."""

from __future__ import annotations

import hashlib
import math
import re
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import deltahub
from deltahub import ParamDelta, SparseDelta
from deltahub.fingerprint import fingerprint_of

from . import sddmm
from .config import SftConfig
from .errors import SftConfigError, SftStateError
from .layer import SftLayerMixin, attach, detach, layer_classes
from .saving import push_to_hub, save_pretrained


@dataclass(frozen=True)
class ActiveDelta:
    """A live view of one weight's trainable delta: the tensors change in place as training moves slots."""

    name: str  # the weight's state-dict name, e.g. "model.layers.0.mlp.up_proj.weight"
    module: SftLayerMixin

    @property
    def values(self) -> nn.Parameter:
        return self.module.sft_values

    @property
    def indices(self) -> torch.Tensor:
        return self.module.sft_indices

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    @property
    def k(self) -> int:
        return self.module.sft_indices.numel()

    @property
    def dense_numel(self) -> int:
        """Elements of the whole weight (the SFT fork's name)."""
        return self.module.weight.numel()


def _linear_like(model: nn.Module) -> dict[str, nn.Module]:
    classes = tuple(layer_classes())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if type(m) in classes and m is not head and name}


def find_targets(model: nn.Module, target_modules: tuple[str, ...] | str | None) -> dict[str, nn.Module]:
    """The modules ``target_modules`` selects (see :class:`SftConfig`); SftConfigError naming the candidates
    when it selects nothing."""
    candidates = _linear_like(model)
    if target_modules is None:
        chosen = candidates
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise SftConfigError(
                f"target_modules {target_modules!r} is not a valid regular expression: {e}"
            ) from e
        chosen = {n: m for n, m in candidates.items() if pattern.fullmatch(n)}
    else:
        chosen = {
            n: m for n, m in candidates.items() if any(n == t or n.endswith("." + t) for t in target_modules)
        }
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise SftConfigError(
            f"target_modules {target_modules!r} matches no linear layer of this model; its linear layers are named "
            f"{', '.join(kinds)} (e.g. {next(iter(candidates), 'none')!r}): pass suffixes like {kinds[:2]} or a "
            "regular expression over full names"
        )
    return chosen


def budget(model: nn.Module, targets: dict[str, nn.Module], config: SftConfig) -> dict[str, int]:
    """Trainable values per target: ``floor(N * numel_W / sum numel)``, N from density (over all parameters,
    embeddings included, as in the paper) or num_tunable_weights."""
    total_params = sum(p.numel() for p in model.parameters())
    sizes = {name: m.weight.numel() for name, m in targets.items()}
    target_total = sum(sizes.values())
    n = (
        math.floor(config.density * total_params)
        if config.density is not None
        else config.num_tunable_weights
    )
    if n > target_total:
        raise SftConfigError(
            f"the budget of {n:,} trainable values exceeds the {target_total:,} weights of the targeted modules; "
            "lower density/num_tunable_weights or target more modules"
        )
    ks = {name: (n * size) // target_total for name, size in sizes.items()}
    if not any(ks.values()):
        raise SftConfigError(f"a budget of {n} values gives every targeted weight 0 slots; raise the budget")
    return ks


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"deltahub.sft\0{seed}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def random_positions(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random k-subset of range(numel), without materialising a permutation of numel elements
    when k is small (a 4096 x 11008 weight would need 360 MB for one)."""
    if k * 4 >= numel:
        return torch.randperm(numel, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draw = torch.randint(0, numel, (int((k - chosen.numel()) * 1.2) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    # The distinct draws are a uniform random subset of their size; a uniform k-subset of them is uniform too.
    return chosen[torch.randperm(chosen.numel(), generator=generator)[:k]]


def get_sft_model(model: nn.Module, config: SftConfig) -> nn.Module:
    """Prepare ``model`` for sparse fine-tuning, in place, and return it.

    Every parameter is frozen; each targeted linear layer gets ``k_W`` trainable values (zero, so the model is
    unchanged) at uniformly random positions. The model still trains, evaluates and generates like itself (its
    weights hold base + values). It gains: ``model.sft_config``, ``model.active_deltas()`` (and
    ``model.active_deltas_by_name()``), ``model.to_delta()``, ``model.sft_state_dict()`` and
    ``model.load_sft_state_dict(state)``, and its ``save_pretrained(dir)`` / ``push_to_hub(repo_id)`` write /
    upload the delta (``full_model=True``: the plain fine-tuned model).

    Example:
        >>> model = get_sft_model(AutoModelForCausalLM.from_pretrained(path), SftConfig(density=0.01))
    """
    if getattr(model, "sft_config", None) is not None:
        raise SftStateError(
            "this model is already prepared for sparse fine-tuning (get_sft_model was called)"
        )
    if not isinstance(config, SftConfig):
        raise TypeError(f"config must be an SftConfig; got {type(config).__name__}")
    targets = find_targets(model, config.target_modules)
    ks = budget(model, targets, config)
    sddmm.check(next(iter(targets.values())).weight.device)  # a DELTAHUB_SDDMM_KERNEL that cannot run here
    names = {name: f"{name}.weight" for name in targets}
    fingerprint = fingerprint_of({names[n]: m.weight for n, m in targets.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, module in targets.items():
        if ks[name] == 0:
            continue
        positions = random_positions(module.weight.numel(), ks[name], _generator(config.seed, names[name]))
        layers[names[name]] = attach(module, names[name], positions, config.values_dtype)
    model.sft_config = config
    model.sft_layers = layers
    model.sft_fingerprint = {n: fingerprint[n] for n in layers}
    model.sft_steps = 0
    for fn in _BOUND:
        setattr(model, fn.__name__, types.MethodType(fn, model))
    return model


def prepared_layers(model: nn.Module) -> dict[str, SftLayerMixin]:
    model = getattr(model, "module", model)  # DistributedDataParallel
    layers = getattr(model, "sft_layers", None)
    if layers is None:
        raise SftStateError(
            "this model is not prepared for sparse fine-tuning: call get_sft_model(model, config)"
        )
    return layers


def active_deltas_by_name(model: nn.Module) -> dict[str, ActiveDelta]:
    """``{weight name: ActiveDelta}``: live views of the trainable positions and values."""
    return {name: ActiveDelta(name, layer) for name, layer in prepared_layers(model).items()}


def active_deltas(model: nn.Module) -> Iterator[tuple[str, str, ActiveDelta]]:
    """``(module name, weight name, ActiveDelta)`` for every tuned weight, as the SFT fork iterates them, so its
    ``{delta.values: delta for _1, _2, delta in model.active_deltas()}`` works unchanged. The mapping view is
    :func:`active_deltas_by_name`."""
    for name, delta in active_deltas_by_name(model).items():
        yield name.removesuffix(".weight"), name, delta


def to_delta(
    model: nn.Module, *, device: torch.device | str | None = "cpu", base_model: str | None = None
) -> SparseDelta:
    """What the model learned, as a ``deltahub.SparseDelta`` (positions sorted, values in ``values_dtype``)
    with the base's identity and fingerprint and the training provenance. ``deltahub.apply_deltas`` on a fresh
    copy of the base reproduces this model exactly.

    Sorting and casting run where the model is; ``device`` is where the result goes: the CPU by default (where
    files, the Hub and other deltas are), ``None`` to keep it on the model's device (to apply it to another
    model there without a round trip through the host).

    Args:
        base_model: the base's Hub id ``"org/name[@rev]"`` to record. Default: what ``from_pretrained`` was
            given (a Hub id with its commit; a folder in the HF cache becomes its repo id and commit; another
            folder is recorded as its path, which ``push_delta`` leaves out of what it uploads).
    """
    from deltahub.identity import model_identity, parse_model_id

    model = getattr(model, "module", model)
    config: SftConfig = model.sft_config
    params = {}
    for name, layer in prepared_layers(model).items():
        order = torch.argsort(layer.sft_indices)
        indices, values = layer.sft_indices[order], layer.sft_values.detach()[order].to(config.values_dtype)
        if device is not None:
            indices, values = indices.to(device), values.to(device)
        params[name] = ParamDelta(indices, values, tuple(layer.weight.shape), layer.weight.dtype)
    hf_config = getattr(model, "config", None)
    if base_model is not None:
        base_id, base_revision = parse_model_id(base_model)
    else:
        base_id, base_revision = model_identity(
            getattr(hf_config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None,
            getattr(hf_config, "_commit_hash", None),
        )
    return SparseDelta(
        params,
        base_model=base_id,
        base_revision=base_revision,
        fingerprint=model.sft_fingerprint,
        provenance={
            "method": "sft",
            "algorithm": config.selection_algorithm,
            "hyperparameters": config.to_dict(),
            "steps": int(model.sft_steps),
            "deltahub_version": deltahub.__version__,
        },
    )


def sft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Positions and values of every layer, in slot order (the order optimizer state follows), for
    checkpoints. The base values at the positions are not included: loading reads them from the base."""
    out = {}
    for name, layer in prepared_layers(model).items():
        out[f"{name}.indices"] = layer.sft_indices.detach().clone()
        out[f"{name}.values"] = layer.sft_values.detach().clone()
    return out


def load_sft_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`sft_state_dict` (in place: the values Parameter objects, and so optimizer references,
    stay the same) and rewrite the weights' active positions. The model must hold the same base it was trained
    on (its weights supply the base values at the restored positions); under FSDP every rank must call this."""
    layers = prepared_layers(model)
    expected = {f"{n}.{part}" for n in layers for part in ("indices", "values")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise SftStateError(f"SFT state does not fit this model: missing {missing}, unexpected {extra}")
    problems = []
    for name, layer in layers.items():
        indices, values = state[f"{name}.indices"], state[f"{name}.values"]
        k, numel = layer.sft_indices.numel(), layer.weight.numel()
        if indices.shape != (k,) or values.shape != (k,):
            problems.append(f"{name}: saved state has {indices.numel()} slots, the model {k}")
        elif indices.dtype.is_floating_point or (
            k and not 0 <= int(indices.min()) <= int(indices.max()) < numel
        ):
            problems.append(f"{name}: saved positions are not integers in [0, {numel})")
        elif torch.unique(indices).numel() != k:
            problems.append(f"{name}: saved positions repeat")
    if problems:
        raise SftStateError("SFT state does not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for name, layer in layers.items():
            indices, values = state[f"{name}.indices"], state[f"{name}.values"]
            device = layer.sft_indices.device
            # Put the current active positions back to base first: the new positions may differ.
            layer.sft_write(layer.sft_indices, layer.sft_base)
            layer.sft_indices.copy_(indices.to(device))
            layer.sft_base.copy_(layer.sft_read(layer.sft_indices))
            layer.sft_values.copy_(values.to(device))
            layer.sft_invalidate_pattern()
            layer._sft_synced_version = -1
            layer.sft_sync()


def unwrap_sft_model(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Turn a prepared model back into a plain one: ``merge=True`` keeps what it learned in the weights,
    ``merge=False`` restores the base exactly."""
    for layer in prepared_layers(model).values():
        detach(layer, merge=merge)
    for attr in ("sft_config", "sft_layers", "sft_fingerprint", "sft_steps", *(f.__name__ for f in _BOUND)):
        model.__dict__.pop(attr, None)
    return model


_BOUND: Iterable = (
    active_deltas,
    active_deltas_by_name,
    to_delta,
    sft_state_dict,
    load_sft_state_dict,
    save_pretrained,
    push_to_hub,
)
