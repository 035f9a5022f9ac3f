"""``save_pretrained`` / ``push_to_hub`` on a prepared model: they offer the delta, as peft's do the adapter.

``get_sft_model`` binds these on the model instance, so ``model.save_pretrained(dir)``, ``Trainer.save_model``
(which calls it) and ``model.push_to_hub(repo_id)`` write or upload a deltahub delta folder (``delta.safetensors``,
``delta_config.json``, the card) instead of a full copy of the base. The plain full model, with the trained
values merged into the weights, stays one keyword away: ``full_model=True`` (or
``unwrap_sft_model(model).save_pretrained(dir)``, which also drops the SFT layers).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

import deltahub
from deltahub.format.spec import CARD_FILE, CONFIG_FILE, INDEX_FILE, SINGLE_FILE

_DELTA_FILES = (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, "delta-*-of-*.safetensors", CARD_FILE)
# transformers' save_pretrained options that mean nothing for a delta folder (the Trainer passes some of them)
_IGNORED = {"state_dict", "safe_serialization", "save_function", "variant", "save_peft_format"}


def _is_delta_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _DELTA_FILES)


def write_delta_into(
    delta: deltahub.SparseDelta, folder: str | os.PathLike, max_shard_size: Any = None
) -> Path:
    """Write ``delta``'s files into ``folder``, which may hold other files (a Trainer's output folder with its
    checkpoints, a tokenizer): those stay; delta files of an earlier save that the new one lacks are removed.
    The delta is written and validated in a hidden sibling first, then moved in file by file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".deltahub-save-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        deltahub.save_delta(delta, tmp, **kwargs)
        new = {p.name for p in tmp.iterdir()}
        for old in folder.iterdir():
            if old.is_file() and _is_delta_file(old.name) and old.name not in new:
                old.unlink()
        for name in sorted(new):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    full_model: bool = False,
    is_main_process: bool = True,
    max_shard_size: Any = None,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> None:
    """Write the trained delta into ``save_directory`` (a deltahub delta folder; other files there stay).

    Args:
        save_directory: the folder (created if needed).
        full_model: write the plain transformers model instead, with the trained values in its weights.
        is_main_process: only the main process writes (as in transformers).
        max_shard_size: shard the delta's values above this size (``"2GB"``); default deltahub's.
        push_to_hub: also push the delta to ``repo_id`` (default: the folder's name under your user), with
            ``token``.
    """
    if full_model:
        with _plain(model):
            model.save_pretrained(
                save_directory,
                is_main_process=is_main_process,
                push_to_hub=push_to_hub,
                **({} if repo_id is None else {"repo_id": repo_id}),
                **({} if token is None else {"token": token}),
                **({} if max_shard_size is None else {"max_shard_size": max_shard_size}),
                **kwargs,
            )
        return
    unknown = sorted(set(kwargs) - _IGNORED)
    if unknown:
        raise TypeError(
            f"save_pretrained of a sparse fine-tuned model writes its delta and takes no {unknown}; pass "
            "full_model=True for transformers' own save_pretrained and its options"
        )
    if not is_main_process:
        return
    write_delta_into(model.to_delta(), save_directory, max_shard_size)
    if push_to_hub:
        deltahub.push_delta(save_directory, repo_id or Path(save_directory).name, token=token)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    full_model: bool = False,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    **kwargs: Any,
):
    """Upload the trained delta to ``repo_id`` with ``deltahub.push_delta`` (validated, with its card); returns
    its ``PushResult``. ``full_model=True`` uploads the plain transformers model instead (transformers'
    ``push_to_hub`` with the same arguments)."""
    common = {
        "private": private,
        "revision": revision,
        "commit_message": commit_message,
        "create_pr": create_pr,
        "token": token,
    }
    if full_model:
        with _plain(model):
            return model.push_to_hub(repo_id, **common, **kwargs)
    if kwargs:
        raise TypeError(
            f"push_to_hub of a sparse fine-tuned model pushes its delta and takes no {sorted(kwargs)}; pass "
            "full_model=True for transformers' own push_to_hub and its options"
        )
    return deltahub.push_delta(model.to_delta(), repo_id, **common)


@contextlib.contextmanager
def _plain(model: nn.Module):
    """transformers' own save_pretrained / push_to_hub for the duration (its push_to_hub calls save_pretrained,
    which must then write the full model too). The weights already hold base + values, and the SFT layers keep
    their values out of the state dict, so what they write is the plain fine-tuned model."""
    bound = {
        name: model.__dict__.pop(name)
        for name in ("save_pretrained", "push_to_hub")
        if name in model.__dict__
    }
    for layer in model.sft_layers.values():
        layer.sft_sync()
    try:
        yield
    finally:
        model.__dict__.update(bound)
