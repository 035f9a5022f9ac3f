"""Tiny real transformers models and random deltas for tests (offline: built from configs)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from deltahub import ParamDelta, SparseDelta
from deltahub.demo import tiny as demo_tiny
from deltahub.fingerprint import fingerprint_of


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    return demo_tiny.tiny_llama(dtype, seed)


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight``."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


def random_delta(
    model: torch.nn.Module,
    density: float = 0.05,
    seed: int = 0,
    *,
    names: list[str] | None = None,
    scale: float = 0.05,
    values_dtype: torch.dtype = torch.float32,
    base_model: str = "tiny",
) -> SparseDelta:
    """A delta touching a random ``density`` of each named 2-D parameter (default: every matrix but embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    state = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in state.items() if p.dim() == 2 and "embed" not in n and "wte" not in n]
    params = {}
    for name in names:
        p = state[name]
        k = max(1, int(density * p.numel()))
        idx = torch.randperm(p.numel(), generator=gen)[:k].sort().values
        vals = (torch.randn(k, generator=gen) * scale).to(values_dtype)
        params[name] = ParamDelta(idx, vals, tuple(p.shape), p.dtype)
    return SparseDelta(params, base_model=base_model, fingerprint=fingerprint_of(state, names))


def tokens(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?'\n"


def save_char_tokenizer(folder) -> None:
    """A character-level fast tokenizer (ids < 64, so it fits the tiny models' vocabulary), built offline."""
    demo_tiny.char_tokenizer(CHARS).save_pretrained(folder)


CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# A ChatML-like template: each turn is <|role|>content<|end|> and a newline.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer(template: str | None = CHAT_TEMPLATE):
    """The character tokenizer plus one special token per chat marker (ids 37-40, within the tiny vocabulary),
    with ``template`` as its chat template."""
    tokenizer = demo_tiny.char_tokenizer(CHARS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.chat_template = template
    return tokenizer
