"""Training data from local files, for ``deltahub train`` and the ``Trainer`` path.

- Plain text: a ``.txt``/``.md`` file is one document; records files (``.jsonl``, ``.json``, ``.parquet``,
  ``.csv``, read with the ``datasets`` library) hold one document per record under a text column. Documents
  are tokenized, joined with EOS and cut into fixed ``[n, seq_len]`` blocks (:func:`token_blocks`).
- Instruction data: a records file with a ``messages`` column (a list of ``{role, content}``; in CSV, its JSON
  text) is rendered with the tokenizer's chat template, with the loss on assistant tokens only
  (``training/instruct_data.py``), then packed into blocks or padded per batch.

:func:`load_instruction_dataset` gives a ``torch`` dataset and a collator for ``transformers.Trainer``.
Every bad file or record is a one-line ``SftConfigError`` naming the file, the record and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from deltahub.errors import MissingExtraError

from .errors import SftConfigError
from .instruct_data import (
    Example,
    pack,
    pad_batch,
    pad_id_of,
    tokenize_conversations,
    truncate,
)

RECORD_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = (".txt", ".md", "")
MESSAGES_FIELD = "messages"


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"no dataset file at {path}: pass a .txt, .jsonl, .json, .parquet or .csv file"
        )
    if path.suffix not in RECORD_BUILDERS and path.suffix not in TEXT_SUFFIXES:
        raise SftConfigError(
            f"unsupported dataset file {path.name!r}: use plain text (.txt, .md) or records (.jsonl, .json, "
            ".parquet, .csv)"
        )


def _first_bad_json_line(path: Path) -> str | None:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{number} is not valid JSON ({e.msg}); each line must be one JSON object"
            if not isinstance(record, dict):
                return f"{path}:{number} is a JSON {type(record).__name__}, not an object"
    return None


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_records(path: str | os.PathLike) -> Any:
    """The records of a ``.jsonl``/``.json``/``.parquet``/``.csv`` file as a ``datasets.Dataset`` (local file,
    no network); SftConfigError naming the file and what is wrong with it otherwise."""
    try:
        import datasets
    except ImportError as e:
        raise MissingExtraError(
            f"reading {Path(path).name} needs the datasets library: pip install 'deltahub[train]'"
        ) from e

    path = Path(path)
    _check_file(path)
    builder = RECORD_BUILDERS.get(path.suffix)
    if builder is None:
        raise SftConfigError(f"{path} is plain text, not a records file")
    if path.stat().st_size == 0:
        raise SftConfigError(f"{path} is empty")
    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel("CRITICAL")  # datasets logs each parse failure as well as raising it: one line is enough
    try:
        with _quiet_progress():
            records = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        detail = _first_bad_json_line(path) if builder == "json" and path.suffix == ".jsonl" else None
        raise SftConfigError(
            detail or f"{path} could not be read as {path.suffix[1:].upper()} ({_root_cause(e)})"
        ) from e
    finally:
        logger.setLevel(level)
    if len(records) == 0:
        raise SftConfigError(f"{path} holds no records")
    return records


@contextlib.contextmanager
def _quiet_progress():
    import datasets

    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def is_text_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix in TEXT_SUFFIXES


def column(records: Any, name: str, path: Path, keyword: str) -> list[Any]:
    if name not in records.column_names:
        raise SftConfigError(
            f"{path} has no column {name!r} (its columns: {', '.join(records.column_names)}); choose one with "
            f"`{keyword}`"
        )
    return records[name]


def read_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The documents in ``path``: a text file is one document; a records file has one per record, under
    ``text_field``."""
    path = Path(path)
    _check_file(path)
    if is_text_file(path):
        return [path.read_text(encoding="utf-8")]
    texts = column(load_records(path), text_field, path, "text_field")
    for number, text in enumerate(texts, 1):
        if not isinstance(text, str):
            raise SftConfigError(
                f"{path}: record {number} has no string field {text_field!r} (got {text!r:.40}); choose the "
                "field with `text_field`"
            )
    return texts


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
            f"the dataset has {len(stream)} tokens, fewer than two blocks of `seq_len` {seq_len}; give more text "
            "or a shorter `seq_len`"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def read_conversations(
    path: str | os.PathLike, tokenizer: Any, messages_field: str = MESSAGES_FIELD
) -> list[Example]:
    """Every record's conversation, rendered and labelled (see ``training/instruct_data.py``)."""
    path = Path(path)
    _check_file(path)
    if is_text_file(path):
        raise SftConfigError(
            f"{path} is plain text; conversations need a records file with a {messages_field!r} column"
        )
    return tokenize_conversations(
        tokenizer, column(load_records(path), messages_field, path, "messages_field"), str(path)
    )


def has_messages(path: str | os.PathLike, messages_field: str = MESSAGES_FIELD) -> bool:
    path = Path(path)
    return not is_text_file(path) and messages_field in load_records(path).column_names


class Batches:
    """Batches of ``batch_size`` items, epoch after epoch, each epoch a seeded permutation; in multi-process runs
    rank ``r`` of ``w`` takes every ``w``-th batch-sized slice of the permutation, so ranks see disjoint data.

    ``items`` is an ``[n, seq_len]`` tensor pair (blocks: ``(input_ids, labels)``) or a list of ``Example``
    (padded per batch with ``pad_id``)."""

    def __init__(
        self,
        items: tuple[torch.Tensor, torch.Tensor] | Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pad_id: int = 0,
    ):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.rank, self.world, self.pad_id = rank, world, pad_id
        self.n = len(items[0]) if isinstance(items, tuple) else len(items)
        if self.n < batch_size * world:
            raise SftConfigError(
                f"{self.n} training examples are fewer than one batch ({batch_size} x {world} processes); lower "
                "`batch_size` or give more data"
            )

    @property
    def per_epoch(self) -> int:
        """Batches per epoch on each rank (the ragged tail of a permutation is dropped)."""
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            step = self.batch_size * self.world
            for start in range(0, self.per_epoch * step, step):
                chosen = order[
                    start + self.rank * self.batch_size : start + (self.rank + 1) * self.batch_size
                ]
                yield self.batch(chosen.tolist())
            epoch += 1

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        if isinstance(self.items, tuple):
            ids, labels = self.items
            return {"input_ids": ids[rows], "labels": labels[rows]}
        return pad_batch([self.items[r] for r in rows], self.pad_id)

    def steps_for(self, epochs: float, grad_accum: int) -> int:
        """Update steps in ``epochs`` passes over the data."""
        return max(1, math.ceil(epochs * self.per_epoch / grad_accum))


def split_held_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random ``fraction`` of ``items`` held out (at least one), the rest for training."""
    n_eval = max(1, round(len(items) * fraction))
    if n_eval >= len(items):
        raise SftConfigError(
            f"{len(items)} examples cannot spare {n_eval} for the held-out split; lower `eval_fraction` or give "
            "more data"
        )
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


class InstructionDataset(torch.utils.data.Dataset):
    """Chat examples for ``transformers.Trainer``: items ``{"input_ids", "labels"}``; batch them with
    :meth:`collator` (padding) or build it with ``packing=True`` (fixed blocks, the default collator works)."""

    def __init__(self, examples: Sequence[Example] | tuple[torch.Tensor, torch.Tensor], pad_id: int):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples[0]) if isinstance(self.examples, tuple) else len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(self.examples, tuple):
            return {"input_ids": self.examples[0][i], "labels": self.examples[1][i]}
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}

    def collator(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch([Example(list(f["input_ids"]), list(f["labels"])) for f in features], self.pad_id)


def load_instruction_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    seq_len: int,
    packing: bool = False,
    messages_field: str = MESSAGES_FIELD,
) -> InstructionDataset:
    """Conversations of ``path`` ready for ``Trainer``: ``Trainer(..., train_dataset=ds, data_collator=ds.collator)``.

    Example:
        >>> ds = load_instruction_dataset("chats.jsonl", tokenizer, seq_len=1024)
    """
    examples = read_conversations(path, tokenizer, messages_field)
    pad_id = pad_id_of(tokenizer)
    if packing:
        return InstructionDataset(pack(examples, seq_len), pad_id)
    kept, _, _ = truncate(examples, seq_len)
    if not kept:
        raise SftConfigError(f"no conversation of {path} keeps an assistant token within `seq_len` {seq_len}")
    return InstructionDataset(kept, pad_id)
