"""Recognising adapters of other tools in a folder, so every verb can say ``deltahub convert`` instead of failing
on a missing ``delta_config.json``."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from ..errors import ConversionError, UnconvertedAdapterError
from ..format.spec import CONFIG_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
COMPOSABLE_FILE = "pytorch_diff.bin"


SFT_FORK = "sft-fork"
PEFT_LORA = "peft-lora"
COMPOSABLE_SFT = "composable-sft"
FORMATS = (SFT_FORK, PEFT_LORA, COMPOSABLE_SFT)
_PEFT_TYPES = {"SFT": SFT_FORK, "LORA": PEFT_LORA}
_MAX_CONFIG_BYTES = 10_000_000


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` of a peft adapter folder, parsed (ConversionError when it is not valid)."""
    path = folder / ADAPTER_CONFIG
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ConversionError(
            f"{path} is larger than {_MAX_CONFIG_BYTES} bytes; it is not a peft adapter config"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return config


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """Which adapter format ``path`` (a folder, or a file in one) holds: ``"sft-fork"`` (peft_type SFT),
    ``"peft-lora"`` (peft_type LORA), ``"composable-sft"`` (``pytorch_diff.bin``), or None (anything else,
    including a deltahub delta). Raises ConversionError for a peft adapter of another type, naming it."""
    p = Path(path)
    if p.is_file():
        if p.name == COMPOSABLE_FILE:
            return COMPOSABLE_SFT
        if p.name not in ADAPTER_WEIGHTS:
            return None
        p = p.parent
    if not p.is_dir() or (p / CONFIG_FILE).is_file():
        return None
    if (p / ADAPTER_CONFIG).is_file():
        peft_type = str(read_adapter_config(p).get("peft_type", "")).upper()
        if peft_type not in _PEFT_TYPES:
            raise ConversionError(
                f"{p} is a peft {peft_type or 'adapter of unknown type'} adapter; deltahub converts the SFT fork's "
                "adapters (peft_type SFT) and LoRA adapters (peft_type LORA)"
            )
        return _PEFT_TYPES[peft_type]
    if (p / COMPOSABLE_FILE).is_file():
        return COMPOSABLE_SFT
    return None


def convert_hint(ref: str) -> str:
    name = Path(ref.rstrip("/\\").split("@")[0]).name or "adapter"
    return (
        f"convert it once with `deltahub convert {shlex.quote(ref)} --out {shlex.quote(name + '-delta')}` "
        "(or deltahub.convert_adapter in Python), then use the converted folder"
    )


_WHAT = {
    SFT_FORK: "an adapter of the SFT fork of peft (adapter_config.json with peft_type SFT)",
    PEFT_LORA: "a peft LoRA adapter (adapter_config.json with peft_type LORA)",
    COMPOSABLE_SFT: "a composable-sft diff (pytorch_diff.bin)",
}


def unconverted_error(path: Path) -> UnconvertedAdapterError | None:
    """The error for a local path that holds another tool's adapter rather than a delta, else None."""
    try:
        kind = detect_format(path)
    except ConversionError as err:
        return UnconvertedAdapterError(f"{err}; it is not a deltahub delta")
    if kind is None:
        return None
    return UnconvertedAdapterError(
        f"{os.fspath(path)} is {_WHAT[kind]}, not a deltahub delta: {convert_hint(os.fspath(path))}"
    )
