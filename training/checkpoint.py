"""Saving and loading the selector's state (positions, values, base values, window statistics) as safetensors.

Nested state is flattened to ``sft/<weight>.indices``-style tensor names; scalars go into the header metadata.
Never pickle: a checkpoint folder may come from elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import SftStateError

FILE_NAME = "sft_state.safetensors"
FORMAT = "deltahub.sft_state"


def save_selector_state(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    tensors = {f"sft/{k}": v.detach().contiguous().cpu() for k, v in state["sft"].items()}
    for layer, stats in state["stats"].items():
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                tensors[f"stats/{layer}/{key}"] = value.detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "global_step": str(state["global_step"]),
        "stats_steps": json.dumps({layer: s["steps"] for layer, s in state["stats"].items()}),
    }
    path = Path(folder) / FILE_NAME
    save_file(tensors, str(path), metadata=meta)
    return path


def load_selector_state(
    folder: str | os.PathLike, device: torch.device | str = "cpu"
) -> dict[str, Any] | None:
    """The state saved in ``folder``, or None when it has none (a checkpoint written without SFT)."""
    path = Path(folder) / FILE_NAME
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise SftStateError(f"{path} is not a deltahub SFT state file (format {meta.get('format')!r})")
    tensors = load_file(str(path), device=str(device))
    stats_steps = json.loads(meta["stats_steps"])
    state: dict[str, Any] = {"global_step": int(meta["global_step"]), "sft": {}, "stats": {}}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "sft":
            state["sft"][rest] = tensor
        else:
            layer, _, key = rest.rpartition("/")
            state["stats"].setdefault(
                layer, {"candidates": None, "sum_g": None, "sum_g2": None, "current": None}
            )
            state["stats"][layer][key] = tensor
    for layer, steps in stats_steps.items():
        state["stats"].setdefault(layer, {"candidates": None, "sum_g": None, "sum_g2": None, "current": None})
        state["stats"][layer]["steps"] = steps
    return state
