"""``convert_adapter``: the artifacts users already hold, as deltahub deltas.

One module per source format:

- ``sft_fork``: adapters of the SFT fork of peft (``AlanAnsell/peft``): exact.
- ``lora``: peft LoRA adapters: the exact dense ``B @ A * scaling``, kept to a density or count by magnitude,
  with the relative error of what was dropped.
- ``composable``: composable-sft's ``pytorch_diff.bin`` (``cambridgeltl/composable-sft``): exact.

Pickles are read only with ``torch.load(weights_only=True)``. The base (a folder, a Hub id, a module or a state
dict; by default the one the adapter records) supplies each weight's shape and dtype and the fingerprint, so the
delta refuses a wrong base like any other.

Example:
    >>> delta = convert_adapter("./llama-sft-adapter")            # the base its adapter_config.json names
    >>> delta = convert_adapter("./llama-lora", base="meta-llama/Llama-3.2-1B", density=0.01)
    >>> delta.provenance["relative_error"]
    0.21...
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._dtypes import VALUE_DTYPES, parse_dtype
from ..delta import SparseDelta
from ..errors import ConversionError, PathNotFoundError
from ..format.spec import CONFIG_FILE
from .base import BaseLike
from .detect import COMPOSABLE_SFT, FORMATS, PEFT_LORA, SFT_FORK, detect_format

__all__ = ["FORMATS", "convert_adapter", "detect_format"]


def convert_adapter(
    source: str | os.PathLike[str],
    *,
    base: BaseLike | None = None,
    density: float | None = None,
    num: int | None = None,
    scope: str = "parameter",
    drop_head: bool = False,
    values_dtype: torch.dtype | str | None = None,
    base_model: str | None = None,
    progress: bool = True,
) -> SparseDelta:
    """Turn another tool's adapter into a :class:`~deltahub.SparseDelta` (save it with ``save_delta``).

    Args:
        source: an SFT-fork or LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
            ``.bin``), or a composable-sft folder or ``pytorch_diff.bin`` file. Local paths only (download a
            Hub adapter with ``huggingface_hub.snapshot_download`` first, or use ``deltahub convert``).
        base: the base model the adapter was trained on: a model folder, a Hub id ``org/name[@rev]``, a module
            or a state dict. Default: the one ``adapter_config.json`` records (composable-sft records none).
        density, num, scope: LoRA only, exactly one of ``density`` (fraction of each weight's entries kept, in
            (0, 1]) or ``num`` (entries kept in all); ``scope`` ``"parameter"`` (each weight keeps its share) or
            ``"global"`` (the largest entries over all weights), as in :func:`deltahub.extract_delta`.
        drop_head: leave out the parts that replace base weights rather than add to them (composable-sft's
            head, peft's ``modules_to_save``) instead of refusing the adapter.
        values_dtype: dtype of the stored values (default: the adapter's own for exact formats, float32 for LoRA).
        base_model: the base's Hub id ``org/name[@rev]`` to record (default: the base's own id, when it has one).
        progress: a progress bar over LoRA modules.

    Returns:
        The delta, fingerprinted on the base, with ``provenance["source_format"]`` (and for LoRA
        ``relative_error``, the Frobenius norm of what was dropped over that of the full change).

    Raises:
        ConversionError: an unsupported layout or variant, a pickle that is not weights-only, parts that
            replace weights (without ``drop_head``), or a base that does not fit.
    """
    from ..identity import parse_model_id

    path = Path(source)
    if not path.exists():
        raise PathNotFoundError(f"no adapter at {os.fspath(source)!r}")
    kind = detect_format(path)
    if kind is None:
        if (path / CONFIG_FILE).is_file():
            raise ConversionError(f"{path} is already a deltahub delta; load it with deltahub.load_delta")
        raise ConversionError(
            f"{path} is not an adapter deltahub converts: expected an SFT-fork or LoRA folder (adapter_config.json "
            "with adapter_model.safetensors or .bin) or a composable-sft pytorch_diff.bin"
        )
    vd = (
        parse_dtype(values_dtype, allowed=VALUE_DTYPES, what="values_dtype")
        if values_dtype is not None
        else None
    )
    if kind != PEFT_LORA and (density is not None or num is not None):
        raise ConversionError(f"{path} is exact ({kind}); density and num apply to LoRA adapters only")
    if kind == SFT_FORK:
        from .sft_fork import convert_sft_fork

        delta = convert_sft_fork(
            path if path.is_dir() else path.parent, base=base, drop_head=drop_head, values_dtype=vd
        )
    elif kind == PEFT_LORA:
        from .lora import convert_lora

        delta = convert_lora(
            path if path.is_dir() else path.parent,
            base=base,
            density=density,
            num=num,
            scope=scope,
            drop_head=drop_head,
            values_dtype=vd,
            progress=progress,
        )
    else:
        assert kind == COMPOSABLE_SFT
        from .composable import convert_composable

        delta = convert_composable(path, base=base, drop_head=drop_head, values_dtype=vd)
    if base_model is not None:
        repo_id, revision = parse_model_id(base_model)
        delta = delta.replace(base_model=repo_id, base_revision=revision)
    return delta
