"""Adapter-only training checkpoints: everything sparse fine-tuning needs to resume exactly, and not the base.

One safetensors file, ``sft_state.safetensors``, holds per trained weight ``W``:

- ``sft/W.indices`` (int32 below 2^31 elements, else int64) and ``sft/W.values``: positions and values in slot
  order (the order the optimizer state follows; sorted order would change how ties among equal |values| are
  broken at the next drop, and the resumed run would drift from the uninterrupted one);
- ``stats/W/*``: RigL's statistics of a selection window in progress;
- ``optimizer/<parameter name>/*``: the optimizer's state over the values (AdamW's moments and per-slot ages,
  SM3's row/column accumulators and momentum), in their own dtypes.

The header metadata holds the rest as JSON: format and version, update step, the SftConfig, the base's
fingerprint (a checkpoint of another base is refused), the optimizer's class and hyper-parameters. Base
values at the positions are not stored: the base model supplies them when the checkpoint is loaded. Never
pickle: a checkpoint folder may come from elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SftConfig
from .errors import SftStateError
from .model import prepared_layers

FILE_NAME = "sft_state.safetensors"
FORMAT = "deltahub.sft_state"
VERSION = 2
_STATS_KEYS = ("candidates", "sum_g", "sum_g2", "current")


@dataclass
class SftCheckpoint:
    """What :func:`read_checkpoint` found: apply with ``model.load_sft_state_dict(ck.sft)``,
    :func:`load_optimizer_state` and ``selector.load_state_dict(ck.selector_state())``."""

    path: Path
    global_step: int
    sft: dict[str, torch.Tensor]
    stats: dict[str, dict[str, Any]]
    config: dict[str, Any]
    fingerprint: dict[str, list[float]]
    optimizer: dict[str, Any] | None = field(default=None)

    def selector_state(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "stats": self.stats, "sft": self.sft}

    def check_fits(self, model: nn.Module) -> None:
        """Refuse a checkpoint of another base or another SftConfig (the fix: resume on the model it trained)."""
        model = getattr(model, "module", model)
        live = {name: list(samples) for name, samples in model.sft_fingerprint.items()}
        if live != self.fingerprint:
            differing = sorted(
                n for n in set(live) | set(self.fingerprint) if live.get(n) != self.fingerprint.get(n)
            )
            raise SftStateError(
                f"{self.path} was trained on a different base model (fingerprints differ at {differing[:3]}): "
                "resume with the base the checkpoint was trained from"
            )
        live_config = model.sft_config.to_dict()
        if live_config != self.config:
            fields = sorted(k for k in live_config if live_config[k] != self.config.get(k))
            raise SftStateError(
                f"{self.path} was trained with another SftConfig ({', '.join(f'{k}={self.config.get(k)!r}' for k in fields)}"
                f"; this model has {', '.join(f'{k}={live_config[k]!r}' for k in fields)}): prepare the model with "
                "the checkpoint's config"
            )


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters() if p.requires_grad}


def _json_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)``: the optimizer's per-parameter tensors named ``optimizer/<parameter>/<key>``, and its
    class and parameter groups (hyper-parameters, parameters by name) as JSON-able data."""
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        name = names.get(id(param))
        if name is None:
            raise SftStateError(
                "the optimizer holds a parameter that is not a trainable parameter of the model"
            )
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise SftStateError(
                    f"{type(optimizer).__name__} state {key!r} is not a tensor; cannot save it"
                )
            tensors[f"optimizer/{name}/{key}"] = value.detach().contiguous().cpu()
    groups = []
    for group in optimizer.param_groups:
        saved: dict[str, Any] = {"params": [names[id(p)] for p in group["params"]]}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, (tuple, list)) and all(_json_number(v) for v in value):
                saved[key] = list(value)
            elif _json_number(value) or isinstance(value, (bool, str)) or value is None:
                saved[key] = value
            else:
                raise SftStateError(f"optimizer hyper-parameter {key}={value!r} cannot be saved as JSON")
        groups.append(saved)
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups}


def write_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    selector_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``sft_state.safetensors`` into ``folder`` (created if needed); returns its path.

    Args:
        folder: the checkpoint folder.
        model: the prepared model (or its DDP/FSDP wrapper).
        selector_state: ``SftSelector.state_dict()``.
        optimizer: the optimizer over the values (its state is included), or None.
    """
    model = getattr(model, "module", model)
    layers = prepared_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in selector_state["sft"].items():
        weight = key.rsplit(".", 1)[0]
        if key.endswith(".indices"):
            value = value.to(_index_dtype(layers[weight].weight.numel()))
        tensors[f"sft/{key}"] = value.detach().contiguous().cpu()
    for layer, stats in selector_state["stats"].items():
        for key in _STATS_KEYS:
            value = stats.get(key)
            if not isinstance(value, torch.Tensor) or (key == "current" and not value.any()):
                continue  # between update steps the micro-batch sum is zero: rebuilt on load
            if key == "candidates":
                value = value.to(_index_dtype(layers[layer].weight.numel()))
            tensors[f"stats/{layer}/{key}"] = value.detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "global_step": str(int(selector_state["global_step"])),
        "stats_steps": json.dumps({layer: int(s["steps"]) for layer, s in selector_state["stats"].items()}),
        "config": json.dumps(model.sft_config.to_dict()),
        "fingerprint": json.dumps({n: list(s) for n, s in model.sft_fingerprint.items()}),
    }
    if optimizer is not None:
        optimizer_tensors, optimizer_meta = optimizer_state(optimizer, model)
        tensors.update(optimizer_tensors)
        meta["optimizer"] = json.dumps(optimizer_meta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    tmp = folder / f".{FILE_NAME}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated state file under the real name
    return path


def has_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / FILE_NAME).is_file()


def read_checkpoint(folder: str | os.PathLike) -> SftCheckpoint:
    """Read ``folder/sft_state.safetensors`` (onto the CPU: loading moves each tensor where it belongs);
    SftStateError naming the file and the problem otherwise."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        raise SftStateError(
            f"{folder} holds no {FILE_NAME}: it is not a deltahub SFT checkpoint (pass a checkpoint-N folder "
            "written by SftTrainer or training.checkpoint.write_checkpoint)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SftStateError(
            f"{path} is not a readable safetensors file ({e}); the checkpoint is damaged"
        ) from e
    if meta.get("format") != FORMAT:
        raise SftStateError(f"{path} is not a deltahub SFT state file (format {meta.get('format')!r})")
    version = meta.get("version", "1")
    if version != str(VERSION):
        raise SftStateError(
            f"{path} is SFT state version {version}; this deltahub reads version {VERSION} (checkpoints of "
            "deltahub 0.1's first trainer, which held the full model, cannot be resumed: start from the base)"
        )
    try:
        stats_steps = json.loads(meta["stats_steps"])
        config = json.loads(meta["config"])
        fingerprint = json.loads(meta["fingerprint"])
        optimizer = json.loads(meta["optimizer"]) if "optimizer" in meta else None
        global_step = int(meta["global_step"])
    except (KeyError, ValueError) as e:
        raise SftStateError(f"{path} has incomplete or invalid metadata ({e!r})") from e
    sft: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, Any]] = {
        layer: {**dict.fromkeys(_STATS_KEYS), "steps": steps} for layer, steps in stats_steps.items()
    }
    optimizer_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "sft":
            sft[rest] = tensor.to(torch.int64) if rest.endswith(".indices") else tensor
        elif kind == "stats":
            layer, _, key = rest.rpartition("/")
            if layer not in stats or key not in _STATS_KEYS:
                raise SftStateError(f"{path}: unexpected tensor {name!r}")
            stats[layer][key] = tensor.to(torch.int64) if key == "candidates" else tensor
        elif kind == "optimizer":
            param, _, key = rest.rpartition("/")
            optimizer_tensors.setdefault(param, {})[key] = tensor
        else:
            raise SftStateError(f"{path}: unexpected tensor {name!r}")
    for layer in stats.values():
        if layer["current"] is None and layer["sum_g"] is not None:
            layer["current"] = torch.zeros_like(layer["sum_g"])
    if optimizer is not None:
        optimizer["state"] = optimizer_tensors
    return SftCheckpoint(path, global_step, sft, stats, config, fingerprint, optimizer)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` saved into ``optimizer`` (same class, same parameters by name).

    The state tensors are set as saved (dtypes kept: ``torch.optim.Optimizer.load_state_dict`` would cast
    them to the parameters' dtype), on the parameters' devices."""
    model = getattr(model, "module", model)
    if saved["class"] != type(optimizer).__name__:
        raise SftStateError(
            f"the checkpoint's optimizer is {saved['class']}, this run's is {type(optimizer).__name__}: resume "
            "with the same selection algorithm and optimizer"
        )
    by_name = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
        [by_name.get(n) for n in g["params"]] != list(group["params"])
        for g, group in zip(groups, optimizer.param_groups, strict=False)
    ):
        raise SftStateError("the checkpoint's optimizer parameter groups do not match this optimizer's")
    for g, group in zip(groups, optimizer.param_groups, strict=True):
        for key, value in g.items():
            if key != "params":
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    for name, state in saved["state"].items():
        param = by_name.get(name)
        if param is None:
            raise SftStateError(f"the checkpoint has optimizer state for {name!r}, which this model lacks")
        for key, t in state.items():
            # per-slot state has one entry per value; SM3's row/column accumulators are 1-D per weight side
            if t.dim() != 1 or (key not in ("row", "col") and t.numel() != param.numel()):
                raise SftStateError(
                    f"the checkpoint's optimizer state {name}/{key} has shape {tuple(t.shape)}, which does not "
                    f"fit a parameter of {param.numel()} values"
                )
    optimizer.state.clear()
    for name, state in saved["state"].items():
        param = by_name[name]
        optimizer.state[param] = {key: t.to(param.device) for key, t in state.items()}


def checkpoint_config(folder: str | os.PathLike) -> SftConfig:
    """The SftConfig a checkpoint was trained with (to prepare a fresh base for resuming)."""
    return SftConfig.from_dict(read_checkpoint(folder).config)
