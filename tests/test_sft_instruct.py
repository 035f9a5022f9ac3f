"""Instruction data: chat-template rendering with exact prompt masking, records files through `datasets`, packing
and padding, and one-line errors for bad files."""

import json

import pandas as pd
import pytest
import torch
from tiny import CHARS, chat_tokenizer

from training.data import Batches, load_instruction_dataset, read_conversations, read_texts, split_held_out
from training.errors import SftConfigError
from training.instruct_data import IGNORE, pack, pad_batch, tokenize_conversation, truncate

CONVERSATION = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo!"},
    {"role": "user", "content": "why?"},
    {"role": "assistant", "content": "fun."},
]
MARKED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}"
    "<|end|>{% endgeneration %}\n{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def ids(tokenizer, *pieces):
    """Token ids of pieces: special markers as one id, anything else one id per character."""
    out = []
    for piece in pieces:
        if piece.startswith("<|"):
            out.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            out.extend(CHARS.index(c) + 2 for c in piece)
    return out


def expected(tokenizer, conversation, newline_in_turn: bool):
    """Input ids and labels built by hand from the template's layout: <|role|>content<|end|>\\n per turn;
    the assistant's content and end-of-turn (and the newline, when the template keeps it in the turn) are
    labelled, everything else is -100."""
    all_ids, labels = [], []
    for m in conversation:
        header = ids(tokenizer, f"<|{m['role']}|>")
        body = ids(tokenizer, m["content"], "<|end|>")
        newline = ids(tokenizer, "\n") if newline_in_turn or m["role"] != "assistant" else []
        all_ids += header + body + newline
        if m["role"] == "assistant":
            labels += [IGNORE] * len(header) + body + ([*newline] if newline_in_turn else [])
        else:
            labels += [IGNORE] * (len(header) + len(body) + len(newline))
    return all_ids, labels


def test_prompt_tokens_are_masked_exactly_by_rendering_prefixes():
    tokenizer = chat_tokenizer()
    example = tokenize_conversation(tokenizer, CONVERSATION)
    want_ids, want_labels = expected(tokenizer, CONVERSATION, newline_in_turn=True)
    assert example.input_ids == want_ids
    assert example.labels == want_labels
    # the labelled text is exactly the two replies with their end-of-turn markers
    labelled = "".join(tokenizer.convert_ids_to_tokens([t for t in example.labels if t != IGNORE]))
    assert labelled == "yo!<|end|>\nfun.<|end|>\n"


def test_generation_markers_take_precedence_when_the_template_has_them():
    tokenizer = chat_tokenizer(MARKED_TEMPLATE)
    example = tokenize_conversation(tokenizer, CONVERSATION)
    want_ids, want_labels = expected(tokenizer, CONVERSATION, newline_in_turn=False)
    assert example.input_ids == want_ids and example.labels == want_labels


def test_a_template_that_rewrites_earlier_turns_is_refused_not_mislabelled():
    # the last assistant turn gets an extra <|end|>: a prefix's render is not a prefix of the whole
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% if loop.last and m['role'] == 'assistant' %}<|end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(
        SftConfigError, match=r"renders turn 2 differently once later turns follow.*generation"
    ):
        tokenize_conversation(chat_tokenizer(template), CONVERSATION)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_json_parquet_and_csv_give_the_same_examples(tmp_path):
    tokenizer = chat_tokenizer()
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    jsonl = write_jsonl(tmp_path / "chats.jsonl", records)
    (tmp_path / "chats.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "chats.parquet")
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in records]}).to_csv(tmp_path / "chats.csv")
    reference = read_conversations(jsonl, tokenizer)
    assert reference[1] == tokenize_conversation(tokenizer, CONVERSATION[1:3])
    for name in ("chats.json", "chats.parquet", "chats.csv"):
        assert read_conversations(tmp_path / name, tokenizer) == reference, name


def test_bad_files_and_records_are_one_line_errors(tmp_path):
    tokenizer = chat_tokenizer()
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + '{"messages": [\n')
    cases = [
        (bad_line, r"bad\.jsonl:2 is not valid JSON \(.*\); each line must be one JSON object"),
        (
            write_jsonl(tmp_path / "cols.jsonl", [{"conversation": CONVERSATION}]),
            r"cols\.jsonl has no column 'messages' \(its columns: conversation\); choose one with `messages_field`",
        ),
        (
            write_jsonl(
                tmp_path / "role.jsonl", [{"messages": CONVERSATION}, {"messages": [{"content": "x"}]}]
            ),
            r"role\.jsonl: record 2: message 0 has no string 'role'",
        ),
        (
            write_jsonl(tmp_path / "who.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]),
            r"who\.jsonl: record 1: message 0 has role 'bot'; roles are system, user, assistant",
        ),
        (
            write_jsonl(tmp_path / "mute.jsonl", [{"messages": CONVERSATION[:2]}]),
            r"mute\.jsonl: record 1: the conversation has no assistant message",
        ),
    ]
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    cases.append(
        (tmp_path / "broken.parquet", r"broken\.parquet could not be read as PARQUET \(.*magic bytes")
    )
    (tmp_path / "empty.jsonl").write_text("")
    cases.append((tmp_path / "empty.jsonl", r"empty\.jsonl is empty"))
    (tmp_path / "data.xml").write_text("<x/>")
    cases.append((tmp_path / "data.xml", r"unsupported dataset file 'data\.xml': use plain text"))
    for path, message in cases:
        with pytest.raises(SftConfigError, match=message) as info:
            read_conversations(path, tokenizer)
        assert "\n" not in str(info.value), str(info.value)
    with pytest.raises(SftConfigError, match="has no chat template, which the messages column needs"):
        read_conversations(
            write_jsonl(tmp_path / "ok.jsonl", [{"messages": CONVERSATION}]), chat_tokenizer(None)
        )
    pd.DataFrame({"text": ["a", None]}).to_csv(tmp_path / "texts.csv")
    with pytest.raises(SftConfigError, match=r"texts\.csv: record 2 has no string field 'text'"):
        read_texts(tmp_path / "texts.csv")


def test_packing_padding_truncation_and_batches():
    tokenizer = chat_tokenizer()
    examples = [
        tokenize_conversation(tokenizer, CONVERSATION),
        tokenize_conversation(tokenizer, CONVERSATION[1:3]),
    ]
    stream = examples[0].input_ids + examples[1].input_ids
    ids, labels = pack(examples, 8)
    assert ids.shape == (len(stream) // 8, 8) and ids.view(-1).tolist() == stream[: ids.numel()]
    assert labels.view(-1).tolist() == (examples[0].labels + examples[1].labels)[: ids.numel()]
    batch = pad_batch(examples, pad_id=1)
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    assert batch["input_ids"].shape == (2, n0) and batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (
        n0 - n1
    )
    assert batch["labels"][1, n1:].eq(IGNORE).all() and batch["input_ids"][1, n1:].eq(1).all()
    # truncation keeps examples with an assistant token left and drops the others
    # (the first conversation's first reply starts at token 18; the second's at token 6)
    kept, truncated, dropped = truncate(examples, 10)
    assert (truncated, dropped) == (2, 1) and len(kept) == 1
    assert kept[0].input_ids == examples[1].input_ids[:10] and kept[0].labels == examples[1].labels[:10]
    # batches: every rank takes disjoint rows of the same seeded permutation
    items = [
        tokenize_conversation(tokenizer, [CONVERSATION[1], {"role": "assistant", "content": c * (i + 1)}])
        for i, c in enumerate("abcdefgh")
    ]
    seen = []
    for rank in (0, 1):
        it = iter(Batches(items, 2, seed=3, rank=rank, world=2, pad_id=1))
        # each example has its own length: the batch's lengths name its rows
        seen.append([tuple(next(it)["attention_mask"].sum(1).tolist()) for _ in range(2)])
    flat = [x for rank in seen for pair in rank for x in pair]
    assert len(set(flat)) == 8
    train, held = split_held_out(list(range(20)), 0.1, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(20))


def test_trainer_dataset_pads_with_its_collator(tmp_path):
    path = write_jsonl(
        tmp_path / "chats.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    )
    ds = load_instruction_dataset(path, chat_tokenizer(), seq_len=64)
    batch = ds.collator([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2 and torch.equal(
        batch["labels"][0, : len(ds[0]["labels"])], torch.tensor(ds[0]["labels"])
    )
    packed = load_instruction_dataset(path, chat_tokenizer(), seq_len=8, packing=True)
    assert packed[0]["input_ids"].shape == (8,)


def test_the_trainer_trains_on_the_instruction_dataset(tmp_path):
    from tiny import tiny_llama
    from transformers import Trainer, TrainingArguments

    from training import SftConfig, SftTrainer

    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}] * 8
    ds = load_instruction_dataset(
        write_jsonl(tmp_path / "chats.jsonl", records), chat_tokenizer(), seq_len=64
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = SftTrainer(Trainer)(
        model=tiny_llama(),
        args=args,
        train_dataset=ds,
        data_collator=ds.collator,
        sft_config=SftConfig(density=0.05),
    )
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert trainer.model.to_delta().provenance["steps"] == 4
