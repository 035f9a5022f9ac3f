"""What the two peft formats (the SFT fork's adapters and LoRA adapters) share on disk: ``adapter_config.json``
next to ``adapter_model.safetensors`` (or ``.bin``), whose keys name a module and a part of its adapter."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from .detect import ADAPTER_WEIGHTS, read_adapter_config
from .weights import read_state_dict


def adapter_weights(folder: Path) -> Path:
    """The adapter's weights file: safetensors preferred over the pickle."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(
        f"{folder} has {', '.join(ADAPTER_WEIGHTS)} neither; the adapter's weights are missing"
    )


def read_adapter(
    folder: Path, key: re.Pattern[str], what: str, *, drop_head: bool, kept: str
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], list[str]]:
    """``(config, {module: {part: tensor}}, replaced keys)``: the adapter's tensors grouped by module through
    ``key`` (groups ``module`` and ``part``). Any other tensor replaces a base weight (peft's
    ``modules_to_save``): refused unless ``drop_head``; ``kept`` says in the message what converts without them."""
    config = read_adapter_config(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replaced = []
    for name, tensor in read_state_dict(adapter_weights(folder)).items():
        match = key.fullmatch(name)
        if match is None:
            replaced.append(name)
            continue
        parts.setdefault(match.group("module"), {})[match.group("part")] = tensor
    if replaced and not drop_head:
        raise ConversionError(
            f"{what} also holds {len(replaced)} tensor(s) that replace base weights instead of adding to them "
            f"(modules_to_save, e.g. {replaced[:3]}); a delta only adds. Pass drop_head=True (--drop-head) to "
            f"convert {kept} without them"
        )
    return config, parts, replaced
