"""The SFT fork's README code runs with one change: ``from peft import ...`` becomes ``from training import ...``.

The snippets below are the code blocks of the README of ``AlanAnsell/peft`` (commit 73b455b480c5, "Creating an SFT
model", "SFT with a custom training loop", "SFT with Trainer"), copied verbatim as test data. The harness supplies
what they leave to the reader (``model_name_or_path`` points at a tiny Llama uploaded to the loopback Hub under the
README's own id; ``train_dataloader``, ``learning_rate``...; the README's schematic ``loss = model(**batch)`` gets a
model whose call returns the loss) and replaces exactly one line, the ``...`` placeholder inside the Trainer's
argument list (a syntax error as written), with ``train_dataset=train_dataset,``. Nothing else is edited.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers import Trainer, TrainingArguments

import deltahub

PREPARE = """
from transformers import AutoModelForCausalLM
from peft import get_peft_config, get_peft_model, SftConfig, TaskType
model_name_or_path = "meta-llama/Llama-2-7b-hf"

peft_config = SftConfig(
    task_type=TaskType.CAUSAL_LM,
    inference_mode=False,
    density=0.01,
    selection_algorithm="rigl", # or "sm3" for moment approximation SFT
    target_modules=["q_proj", "o_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "down_proj"],
)

model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
model = get_peft_model(model, peft_config)
"""

TRAINER = """
from peft import SftTrainer

...

trainer_cls = SftTrainer(MyTrainer) # MyTrainer = Trainer or any subclass thereof
trainer = trainer_cls(
    model=model,
    args=training_args,
    ...
    sft_config=peft_config,
)

"""

CUSTOM_LOOP = """
from peft import SftAdamW, SftSM3, SftSelector

...

optimizer_grouped_parameters = [
    {
        "params": [
            p for n, p in model.named_parameters()
            if p.requires_grad
        ],
        "weight_decay": weight_decay,
    },
]

if peft_config.selection_algorithm == "sm3":
    deltas = {
        delta.values: delta
        for _1, _2, delta in model.active_deltas()
    }
    optimizer = SftSM3(
        optimizer_grouped_parameters,
        deltas,
        lr=learning_rate,
    )
else:
    optimizer = SftAdamW(
        optimizer_grouped_parameters,
        lr=learning_rate,
        momentum_dtype=torch.float32,
    )

...

selector = SftSelector(
    model,
    optimizer,
    peft_config,
    num_train_steps, # total expected duration of training in update steps
    gradient_accumulation_steps, # grad accumulation steps per update step
)
"""

STEP = """
for i, batch in enumerate(train_dataloader):
    ...
    loss = model(**batch)
    loss.backward()
    ...

    if (i + 1) % grad_accumulation_steps == 0:
        ...
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
"""

README_ID = "meta-llama/Llama-2-7b-hf"


def only_the_import_changed(snippet: str) -> str:
    assert snippet.count("from peft import") == 1
    return snippet.replace("from peft import", "from training import")


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (a learnable task for a tiny model), as a data loader would yield them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = (torch.randint(0, 64, (4, 1), generator=gen) + torch.arange(16)) % 64
        out.append({"input_ids": ids, "labels": ids})
    return out


class LossOf:
    """What the README's ``loss = model(**batch)`` stands for: the model's loss on the batch."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **batch):
        return self.model(**batch).loss


@pytest.fixture
def readme_base(hub_env, monkeypatch):
    """A tiny Llama on the loopback Hub under the README's id, so ``from_pretrained(model_name_or_path)`` is real."""
    monkeypatch.setitem(hub_env.server.orgs, "meta-llama", [hub_env.user])
    hub_env.api.create_repo(README_ID, exist_ok=True)
    folder = hub_env.root.parent / "readme-base"
    if not folder.exists():
        tiny_llama().save_pretrained(folder)
    hub_env.api.upload_folder(repo_id=README_ID, folder_path=str(folder))
    return folder


def prepare(algorithm: str) -> dict:
    namespace: dict = {}
    code = only_the_import_changed(PREPARE)
    if algorithm == "sm3":  # the README's own alternative, named in its comment
        code = code.replace('selection_algorithm="rigl", # or "sm3"', 'selection_algorithm="sm3", # or "sm3"')
    with pytest.warns(UserWarning, match="SftConfig ignores task_type='CAUSAL_LM' and inference_mode=False"):
        exec(compile(code, "README: Creating an SFT model", "exec"), namespace)
    return namespace


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_custom_loop_snippet_runs_verbatim(readme_base, algorithm, monkeypatch):
    import training.config

    monkeypatch.setattr(training.config, "_noted", False)  # the note is once per process
    ns = prepare(algorithm)
    model = ns["model"]
    assert model.name_or_path == README_ID and ns["peft_config"].selection_algorithm == algorithm
    assert callable(ns["get_peft_config"]) and ns["get_peft_model"] is ns["get_peft_model"]
    start = {name: d.indices.clone() for _, name, d in model.active_deltas()}
    loader = batches(40)
    ns.update(
        torch=torch,
        weight_decay=0.0,
        learning_rate=0.05 if algorithm == "sm3" else 1e-2,
        num_train_steps=20,
        gradient_accumulation_steps=2,
        grad_accumulation_steps=2,
        train_dataloader=loader,
    )
    exec(compile(only_the_import_changed(CUSTOM_LOOP), "README: custom loop", "exec"), ns)
    assert type(ns["optimizer"]).__name__ == ("SftSM3" if algorithm == "sm3" else "SftAdamW")
    with torch.no_grad():
        before = sum(model(**b).loss.item() for b in loader[:4])
    ns["model"] = LossOf(model)
    exec(compile(STEP, "README: the step", "exec"), ns)

    # It trained: 20 update steps, the positions were reselected, the loss fell, and the delta it exports
    # reproduces the model on a fresh copy of the base.
    assert ns["selector"].global_step == 20
    moved = sum(
        int((d.indices.sort().values != start[name].sort().values).any())
        for _, name, d in model.active_deltas()
    )
    assert moved == len(start)
    with torch.no_grad():
        after = sum(model(**b).loss.item() for b in loader[:4])
    assert after < before
    delta = model.to_delta()
    assert delta.base_model == README_ID and delta.provenance["algorithm"] == algorithm
    fresh = deltahub.load_model(deltas=[delta])  # its base, by the id it records, from the loopback Hub
    x = loader[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    # the mapping view stays, under its own name
    by_name = model.active_deltas_by_name()
    assert list(by_name) == [name for _, name, _ in model.active_deltas()]
    assert all(module + ".weight" == name for module, name, _ in model.active_deltas())


class Sequences(torch.utils.data.Dataset):
    def __init__(self):
        self.items = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in batches(64, seed=1)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.slow
def test_trainer_snippet_runs_verbatim(readme_base, tmp_path):
    ns = prepare("rigl")
    code = only_the_import_changed(TRAINER)
    placeholder = "    args=training_args,\n    ...\n"
    assert code.count(placeholder) == 1
    code = code.replace(placeholder, "    args=training_args,\n    train_dataset=train_dataset,\n")
    ns.update(
        MyTrainer=Trainer,
        train_dataset=Sequences(),
        training_args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=12,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            lr_scheduler_type="constant",
        ),
    )
    exec(compile(code, "README: SFT with Trainer", "exec"), ns)
    trainer = ns["trainer"]
    trainer.train()
    assert trainer.model.to_delta().provenance["steps"] == 12
