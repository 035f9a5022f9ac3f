"""SftTrainer with the real transformers Trainer: training, checkpoints, and an exact resume."""

import pytest
import torch
from tiny import tiny_llama
from transformers import Trainer, TrainingArguments

from training import SftAdamW, SftConfig, SftSM3, SftTrainer
from training.checkpoint import FILE_NAME

# real Trainer runs
pytestmark = pytest.mark.slow


class Sequences(torch.utils.data.Dataset):
    """Counting sequences: a learnable task for a tiny model."""

    def __init__(self, n=64, length=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (n, 1), generator=gen)
        self.ids = (start + torch.arange(length)) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(
    out, algorithm="rigl", max_steps=12, save_steps=6, grad_acc=1, density=0.03, lr=1e-2, use_cpu=True
):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        gradient_accumulation_steps=grad_acc,
        save_steps=save_steps,
        save_strategy="steps",
        logging_steps=100,
        report_to=[],
        disable_tqdm=True,
        use_cpu=use_cpu,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    config = SftConfig(
        density=density, selection_algorithm=algorithm, reselection_steps=4, selection_accumulation_steps=2
    )
    return SftTrainer(Trainer)(model=tiny_llama(), args=args, train_dataset=Sequences(), sft_config=config)


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_trainer_trains_and_resume_continues_exactly(tmp_path, algorithm):
    full = make_trainer(tmp_path / "full", algorithm)
    assert isinstance(full.create_optimizer(), SftAdamW if algorithm == "rigl" else SftSM3)
    result = full.train()
    assert (tmp_path / "full" / "checkpoint-6" / FILE_NAME).exists()
    delta = full.model.to_delta()
    assert delta.provenance["steps"] == 12
    resumed = make_trainer(tmp_path / "resumed", algorithm)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    again = resumed.model.to_delta()
    assert list(again) == list(delta)
    for name in delta:
        assert torch.equal(again[name].indices, delta[name].indices), name
        assert torch.equal(again[name].values, delta[name].values), name
    assert result.training_loss > 0


def test_loss_falls_with_both_algorithms(tmp_path):
    for algorithm in ("rigl", "sm3"):
        trainer = make_trainer(
            tmp_path / algorithm,
            algorithm,
            max_steps=40,
            save_steps=1000,
            density=0.1,
            lr=3e-2 if algorithm == "rigl" else 0.1,
        )
        batch = Sequences(n=32, seed=1)[:32]
        model = trainer.model
        with torch.no_grad():
            before = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
        trainer.train()
        model.eval()
        with torch.no_grad():
            after = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
        assert after < before - 0.3, (algorithm, before, after)


def test_trainer_needs_a_config(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="pass sft_config=SftConfig"):
        SftTrainer(Trainer)(model=tiny_llama(), args=args, train_dataset=Sequences())
    with pytest.raises(TypeError, match=r"needs transformers\.Trainer"):
        SftTrainer(dict)
