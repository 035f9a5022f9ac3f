"""Training text for ``deltahub train``: a .txt file or a .jsonl file of records, cut into token blocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import SftConfigError


def read_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The documents in ``path``: a ``.txt`` file is one document; ``.jsonl`` has one JSON object per line with
    the text under ``text_field``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}: pass a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SftConfigError(
                        f"{path}:{number} is not valid JSON ({e.msg}); each line must be an object"
                    ) from e
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise SftConfigError(
                        f"{path}:{number} has no string field {text_field!r}; choose the field with `text_field` "
                        f"(this line has {sorted(record) if isinstance(record, dict) else type(record).__name__})"
                    )
                texts.append(record[text_field])
        return texts
    if path.suffix in (".txt", ".md", ""):
        return [path.read_text(encoding="utf-8")]
    raise SftConfigError(f"unsupported dataset file {path.name!r}: use a .txt (or .md) file or a .jsonl file")


def token_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate the tokenized documents (an end-of-sequence token between them when the tokenizer has one)
    and cut the stream into ``[n, seq_len]`` blocks; the ragged tail is dropped."""
    stream: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n < 2:
        raise SftConfigError(
            f"the dataset has {len(stream)} tokens, fewer than two blocks of `seq_len` {seq_len}; give more text or "
            "a shorter `seq_len`"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
