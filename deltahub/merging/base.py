"""Reading the base for the merge: a local folder or a Hub snapshot, safetensors headers and byte ranges,
and the few sampled elements the fingerprint check needs (never whole tensors)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._dtypes import SAFETENSORS_DTYPES
from ..checkpoint import INDEX_NAME, Checkpoint
from ..errors import CheckpointError, PathNotFoundError
from ..fingerprint import sample_positions
from ..format.header import read_header
from ..hub_ids import is_ref, parse_ref

SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
TMP_TAG = "merge"
MARKER = ".deltahub-merge-in-progress"
# Files of the base never copied: its weights (in any format: a stale copy would contradict the merged ones),
# its model card (we write our own) and hidden files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SKIP_FILES = frozenset({INDEX_NAME, "pytorch_model.bin.index.json", "README.md", "merge.yaml"})
# What a Hub base needs: weights in transformers' naming, configs, tokenizer files, chat template, custom code.
HUB_PATTERNS = [
    "model*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.py",
    "LICENSE*",
]
COPY_CHUNK = 16 << 20
LOOKAHEAD = 4  # touched tensors combined ahead of the writer


# --------------------------------------------------------------------------------------------------------------
# The base: headers, byte ranges, sampled elements


def resolve_model(ref: str | os.PathLike) -> tuple[Path, str, str | None]:
    """A model folder on disk for ``ref``: a local folder, or a Hub id ``org/name`` or ``org/name@revision``
    downloaded with ``huggingface_hub.snapshot_download`` (weights, configs, tokenizer files only).

    Returns:
        ``(folder, model id, revision)``; for a Hub id (or a folder in the HF cache) the model id is the repo id
        and the revision the resolved commit; for another local folder, its path and None.
    """
    path = Path(ref)
    if path.exists():
        # An HF-cache snapshot folder is named by its repo id and commit: say those, not the cache path.
        from ..identity import model_identity

        model_id, revision = model_identity(path)
        return path, model_id or str(ref), revision
    text = os.fspath(ref)
    if not is_ref(text):
        raise PathNotFoundError(
            f"no model at {text!r}: expected a local folder written by save_pretrained, or a Hub id like "
            "'org/name' or 'org/name@revision'"
        )
    repo_id, revision = parse_ref(text)
    from ..hub import fetch_snapshot

    # The same guarded download as a delta's pull: one-line HubErrors, nothing written outside the cache.
    folder, commit = fetch_snapshot(
        repo_id, revision, allow_patterns=HUB_PATTERNS, action="download the model"
    )
    return folder, repo_id, commit


@dataclass(frozen=True)
class _Stored:
    """Where one base tensor's bytes are."""

    file: str
    start: int  # absolute file offset of the first byte
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _read_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``{name: (absolute start, byte length)}`` from a safetensors header, read by the format's one parser."""
    header, problems = read_header(path, path.name, dtypes=SAFETENSORS_DTYPES)
    if header is None:
        raise CheckpointError(
            f"cannot read the base shard {path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return {k: (header.data_start + t.begin, t.end - t.begin) for k, t in header.tensors.items()}


class BaseFiles:
    """The base checkpoint as byte ranges, plus the :class:`~deltahub.apply.BaseView` that check_base reads.

    Tied aliases (a delta naming ``lm_head.weight`` where the checkpoint stores only the tied
    ``model.embed_tokens.weight``) resolve to the stored tensor through ``aliases``.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        with Checkpoint(folder) as ckpt:  # validates the index and every shard's header
            self.config: dict[str, Any] | None = ckpt.config
            self.model_id = ckpt.model_id
            self.weight_files = list(ckpt.files)
            self.tensors: dict[str, _Stored] = {}
            for file, names in ckpt.files.items():
                offsets = _read_offsets(ckpt.folder / file)
                for name in names:
                    start, nbytes = offsets[name]
                    self.tensors[name] = _Stored(file, start, nbytes, ckpt.shape(name), ckpt.dtype(name))
            self.weights_folder = ckpt.folder
        self.aliases: dict[str, str] = {}
        self._fds: dict[str, int] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def stored(self, name: str) -> _Stored:
        return self.tensors[self.aliases.get(name, name)]

    # BaseView
    def names(self) -> set[str]:
        return set(self.tensors) | set(self.aliases)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.stored(name).dtype

    def problem(self, name: str) -> str | None:
        return None

    def samples(self, name: str) -> tuple[float, ...]:
        # Positions come from the name the delta uses (an alias hashes differently), values from the stored tensor.
        s = self.stored(name)
        size = s.dtype.itemsize
        values = []
        for pos in sample_positions(name, math.prod(s.shape)):
            raw = os.pread(self.fd(s.file), size, s.start + pos * size)
            values.append(float(torch.frombuffer(bytearray(raw), dtype=s.dtype).to(torch.float32)))
        return tuple(values)

    def fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.weights_folder / file, os.O_RDONLY)
        return self._fds[file]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with pread (no memory map: see the module docstring) into a scratch buffer reused
        for every read: valid until the next call. Reusing it saves the kernel zeroing and faulting in fresh
        pages for every tensor, which measured as a third of the merge's system time."""
        s = self.tensors[name]
        if self._scratch.numel() < s.nbytes:
            self._scratch = torch.empty(0, dtype=torch.uint8)  # free the old one before allocating the new
            self._scratch = torch.empty(s.nbytes, dtype=torch.uint8)
        buf = self._scratch[: s.nbytes]
        view, done, fd = memoryview(buf.numpy()), 0, self.fd(s.file)
        while done < s.nbytes:
            got = os.preadv(fd, [view[done:]], s.start + done)
            if got == 0:
                raise CheckpointError(f"{self.weights_folder / s.file} ended early while reading {name}")
            done += got
        return buf.view(s.dtype).view(s.shape)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        self._scratch = torch.empty(0, dtype=torch.uint8)
        for fd in fds.values():
            os.close(fd)

    def resolve_aliases(self, wanted: Sequence[str]) -> None:
        """Map tied names the checkpoint does not store to the tensor it does (needs the config's model class)."""
        missing = [n for n in wanted if n not in self.tensors]
        if not missing or not self.config:
            return
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.folder)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception:  # an unknown architecture: the names simply stay missing and are reported as such
            return
        by_param: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(p), []).append(n)
        for names in by_param.values():
            stored = [n for n in names if n in self.tensors]
            for n in names:
                if n in missing and stored:
                    self.aliases[n] = stored[0]
