"""Instruction data: conversations rendered with the tokenizer's chat template, loss on assistant tokens only.

A conversation is a list of ``{"role", "content"}`` messages (the ``messages`` column of a JSONL/JSON/Parquet/
CSV file; see ``training/data.py``). :func:`tokenize_conversation` renders it with the chat template and labels
every token ``-100`` except those of assistant turns, found robustly for any template:

- a template with ``{% generation %}`` markers says itself which tokens the assistant wrote
  (``apply_chat_template(..., return_assistant_tokens_mask=True)``);
- otherwise turn ``i``'s text runs from the end of ``render(messages[:i], add_generation_prompt=True)`` (the
  prompt, up to and including the assistant header) to the end of ``render(messages[:i + 1])`` (its content and
  end-of-turn tokens, which the model must learn to emit). Both renders must be prefixes of the whole
  conversation's render; a template that renders earlier turns differently once later ones follow (some drop
  earlier reasoning) is refused with the fix, never mislabelled. Tokens are matched to that text through the
  fast tokenizer's character offsets, so merges across a turn boundary cannot shift the mask.

:func:`pack` and :func:`pad_batch` turn the examples into training batches (``--packing`` or padding).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SftConfigError

IGNORE = -100  # the label transformers' losses skip
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def check_chat_template(tokenizer: Any, source: str = "the tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SftConfigError(
            f"{source} has no chat template, which the messages column needs; use a chat (instruct) model's "
            "tokenizer, or pass one with `chat_template` (a Jinja template file)"
        )


def parse_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation from a record's messages field: a list of {role, content} (a JSON string in CSV files)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SftConfigError(f"{where}: the messages field is a string but not JSON ({e.msg})") from e
    if not isinstance(value, (list, tuple)) or not value:
        raise SftConfigError(
            f"{where}: messages must be a non-empty list of {{'role': ..., 'content': ...}}; got {value!r:.80}"
        )
    messages = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise SftConfigError(f"{where}: message {i} has no string 'role' ({message!r:.80})")
        if message["role"] not in ROLES:
            raise SftConfigError(
                f"{where}: message {i} has role {message['role']!r}; roles are {', '.join(ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise SftConfigError(f"{where}: message {i} ({message['role']}) has no string 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise SftConfigError(
            f"{where}: the conversation has no assistant message, so nothing to learn from it"
        )
    return messages


def _render(tokenizer, messages, where: str, **kwargs) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        raise SftConfigError(f"{where}: the chat template refused this conversation: {e}") from e


def _opening(tokenizer) -> str:
    """What the template renders before a conversation that starts with the assistant (a BOS, a default system
    prompt), or "" where it refuses an empty conversation."""
    try:
        return tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
    except Exception:  # templates index messages[0] freely; an empty conversation is not theirs to support
        return ""


def _has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "generation" in template and "endgeneration" in template


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], where: str = "conversation"
) -> Example:
    """``input_ids`` of the rendered conversation and ``labels``: the ids on assistant tokens, -100 elsewhere."""
    if _has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        return Example(ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)])
    text = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else _opening(tokenizer)
        )
        through = _render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(through) and through.startswith(before)):
            raise SftConfigError(
                f"{where}: the chat template renders turn {i} differently once later turns follow, so the "
                "assistant's tokens cannot be located by rendering prefixes; add {% generation %} ... "
                "{% endgeneration %} around assistant content in the template (`chat_template`)"
            )
        spans.append((len(before), len(through)))
    if not getattr(tokenizer, "is_fast", False):
        return _label_by_token_prefixes(tokenizer, text, spans, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    span_index = 0
    for t, (start, _end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            labels[t] = ids[t]
    return Example(ids, labels)


def _label_by_token_prefixes(tokenizer, text: str, spans, where: str) -> Example:
    """Slow tokenizers have no character offsets: tokenize the span boundaries' prefixes and require each to be
    a token prefix of the whole."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)

    def boundary(chars: int) -> int:
        prefix = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if ids[: len(prefix)] != prefix:
            raise SftConfigError(
                f"{where}: this (slow) tokenizer merges tokens across a turn boundary; use its fast version "
                "(AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        return len(prefix)

    for start, end in spans:
        a, b = boundary(start), boundary(end)
        labels[a:b] = ids[a:b]
    return Example(ids, labels)


def tokenize_conversations(
    tokenizer: Any, conversations: Sequence[Any], source: str = "dataset"
) -> list[Example]:
    """:func:`tokenize_conversation` over raw messages fields (record ``i`` is named ``source: record i+1``)."""
    check_chat_template(tokenizer)
    return [
        tokenize_conversation(
            tokenizer, parse_messages(value, f"{source}: record {i + 1}"), f"{source}: record {i + 1}"
        )
        for i, value in enumerate(conversations)
    ]


def pack(examples: Sequence[Example], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the examples and cut ``[n, seq_len]`` blocks of ``(input_ids, labels)``; the ragged tail is
    dropped. Attention crosses conversation boundaries inside a block (plain packing); labels stay exact."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    n = len(ids) // seq_len
    if n == 0:
        raise SftConfigError(
            f"the conversations have {len(ids)} tokens in all, less than one block of `seq_len` {seq_len}; "
            "give more data or a shorter `seq_len`"
        )
    shape = (n, seq_len)
    return (
        torch.tensor(ids[: n * seq_len]).view(shape),
        torch.tensor(labels[: n * seq_len]).view(shape),
    )


def truncate(examples: Sequence[Example], seq_len: int) -> tuple[list[Example], int, int]:
    """Cut each example to ``seq_len`` tokens; returns ``(kept, n_truncated, n_dropped)``, dropping those left
    with no assistant token (a batch of them would have no loss)."""
    kept, truncated, dropped = [], 0, 0
    for e in examples:
        if len(e.input_ids) > seq_len:
            truncated += 1
            e = Example(e.input_ids[:seq_len], e.labels[:seq_len])
        if all(t == IGNORE for t in e.labels[1:]):  # the first label is never predicted (nothing precedes it)
            dropped += 1
            continue
        kept.append(e)
    return kept, truncated, dropped


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` (``pad_id``), ``labels`` (-100) and ``attention_mask``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
