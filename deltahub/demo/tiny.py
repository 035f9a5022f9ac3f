"""The tiny random Llama and the character-level tokenizer that ``deltahub demo --fast`` and the tests build
offline (no download): real transformers classes, sized for seconds on a CPU."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    """A 2-layer ``LlamaConfig``; ``overrides`` change any field (vocab size, width, tied embeddings...)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**fields, **overrides})


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A ``LlamaForCausalLM`` with random weights from ``seed`` (see :func:`tiny_llama_config`), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()


def char_tokenizer(chars: str):
    """A fast tokenizer with one id per character of ``chars`` (ids 2...), ``<unk>`` = 0 and ``<eos>`` = 1."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def build_fast_base(folder: Path, seed: int) -> Path:
    """``--fast``'s base: a tiny Llama (random weights, bf16 and tied embeddings like SmolLM2) and a
    character-level tokenizer over ``string.printable``, saved as a model folder."""
    model = tiny_llama(
        torch.bfloat16,
        seed,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=192,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=1,
    )
    model.save_pretrained(folder)
    char_tokenizer(string.printable).save_pretrained(folder)
    return folder
