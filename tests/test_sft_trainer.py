"""SftTrainer with the real transformers Trainer: training, adapter-only checkpoints and an exact resume (also
under DDP), the delta from save_model / save_pretrained / push_to_hub."""

from pathlib import Path

import pytest
import torch
from launch import TORCHRUN, two_processes
from tiny import tiny_llama, tokens
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import deltahub
from training import SftAdamW, SftConfig, SftSM3, SftStateError, SftTrainer
from training.checkpoint import FILE_NAME, read_checkpoint

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
    out,
    algorithm="rigl",
    max_steps=12,
    save_steps=6,
    grad_acc=1,
    density=0.03,
    lr=1e-2,
    model=None,
    use_cpu=True,
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
    model = tiny_llama() if model is None else model
    return SftTrainer(Trainer)(model=model, args=args, train_dataset=Sequences(), sft_config=config)


def _files(folder):
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_adapter_only_checkpoint_resumes_bit_exactly(tmp_path, algorithm):
    # step 5 is inside a selection window (reselections after steps 2, 6, 10): RigL's statistics are in flight
    full = make_trainer(tmp_path / "full", algorithm, save_steps=5)
    assert isinstance(full.create_optimizer(), SftAdamW if algorithm == "rigl" else SftSM3)
    result = full.train()
    checkpoint = tmp_path / "full" / "checkpoint-5"
    files = _files(checkpoint)
    # the SFT state and the Trainer's own small files; no base weights, no pickled optimizer
    assert set(files) == {FILE_NAME, "trainer_state.json", "rng_state.pth", "scheduler.pt"}, files
    # even for a 23K-parameter model with RigL's window statistics in flight and one tensor name per piece
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    assert sum(files.values()) < base_bytes, (files, base_bytes)
    saved = read_checkpoint(checkpoint)
    assert saved.global_step == 5 and saved.optimizer["class"] == type(full.sft_selector.optimizer).__name__
    if algorithm == "rigl":
        assert saved.stats and all(s["steps"] == 1 for s in saved.stats.values())
    delta = full.model.to_delta()
    assert delta.provenance["steps"] == 12
    resumed = make_trainer(tmp_path / "resumed", algorithm)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    again = resumed.model.to_delta()
    assert list(again) == list(delta)
    for name in delta:
        assert torch.equal(again[name].indices, delta[name].indices), name
        assert torch.equal(again[name].values, delta[name].values), name
    ours, theirs = full.sft_selector.optimizer, resumed.sft_selector.optimizer
    params = zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True)
    for p_full, p_resumed in params:
        assert ours.state[p_full].keys() == theirs.state[p_resumed].keys()
        for key, value in ours.state[p_full].items():
            assert torch.equal(theirs.state[p_resumed][key], value), key
    assert result.training_loss > 0


def test_resuming_on_another_base_or_config_is_refused(tmp_path):
    full = make_trainer(tmp_path / "full", save_steps=6)
    full.train()
    checkpoint = str(tmp_path / "full" / "checkpoint-6")
    other_base = make_trainer(tmp_path / "other", model=tiny_llama(seed=1))
    with pytest.raises(SftStateError, match="was trained on a different base model"):
        other_base.train(resume_from_checkpoint=checkpoint)
    other_config = make_trainer(tmp_path / "other2", density=0.05)
    with pytest.raises(
        SftStateError, match=r"another SftConfig \(density=0.03; this model has density=0.05\)"
    ):
        other_config.train(resume_from_checkpoint=checkpoint)
    with pytest.raises(
        SftStateError, match=r"holds no sft_state\.safetensors: it is not a deltahub SFT checkpoint"
    ):
        make_trainer(tmp_path / "x").train(resume_from_checkpoint=str(tmp_path))


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


def _same_delta(a, b):
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        assert torch.equal(a[name].values, b[name].values), name


def test_save_model_writes_the_delta_and_the_full_model_on_request(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=6, save_steps=3)
    trainer.train()
    model = trainer.model
    delta = model.to_delta()
    trainer.save_model()  # Trainer -> model.save_pretrained(output_dir): the delta, next to the checkpoints
    out = tmp_path / "run"
    assert {"delta.safetensors", "delta_config.json", "README.md", "checkpoint-3"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "model.safetensors").exists()
    assert (out / "checkpoint-3" / FILE_NAME).exists()  # saving the delta kept the folder's other files
    _same_delta(deltahub.load_delta(out), delta)
    x = tokens()
    with torch.no_grad():
        trained = model(x).logits
        fresh = tiny_llama()
        deltahub.apply_deltas(fresh, out)
        assert torch.equal(fresh(x).logits, trained)
    model.save_pretrained(tmp_path / "full", full_model=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert not (tmp_path / "full" / "delta_config.json").exists()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, trained)
    model.save_pretrained(tmp_path / "again")  # the delta again: the full save restored the delta saver
    assert (tmp_path / "again" / "delta_config.json").exists()
    with pytest.raises(TypeError, match=r"takes no \['max_shard_sizes'\]; pass full_model=True"):
        model.save_pretrained(tmp_path / "bad", max_shard_sizes="1GB")


def test_push_to_hub_uploads_the_delta_and_the_full_model_on_request(tmp_path, hub_env):
    trainer = make_trainer(tmp_path / "run", max_steps=4, save_steps=100)
    trainer.train()
    model = trainer.model
    repo_id = hub_env.new_repo_id("sft")
    result = model.push_to_hub(repo_id)
    assert result.repo_id == repo_id
    assert "delta_config.json" in hub_env.api.list_repo_files(repo_id)
    _same_delta(deltahub.load_delta(repo_id), model.to_delta())
    full_repo = hub_env.new_repo_id("sft-full")
    model.push_to_hub(full_repo, full_model=True)
    files = set(hub_env.api.list_repo_files(full_repo))
    assert "model.safetensors" in files and "delta_config.json" not in files
    trainer.args.hub_model_id = hub_env.new_repo_id("sft-trainer")
    trainer.push_to_hub()  # the Trainer's own push: save_model (the delta) and its folder
    pushed = deltahub.load_delta(trainer.args.hub_model_id)
    _same_delta(pushed, model.to_delta())
    card = Path(hub_env.api.hf_hub_download(trainer.args.hub_model_id, "README.md"))
    assert "library_name: deltahub" in card.read_text(encoding="utf-8")  # deltahub's card, not the Trainer's


@pytest.mark.slow
def test_trainer_under_ddp_resumes_bit_exactly_on_every_rank(tmp_path):
    proc = two_processes([*TORCHRUN, Path(__file__).parent / "ddp_trainer.py", "--out", tmp_path])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for algorithm in ("rigl", "sm3"):
        # rank 0 wrote the checkpoint; both ranks resumed from it
        assert set(_files(tmp_path / algorithm / "full" / "checkpoint-5")) >= {FILE_NAME, "rng_state_1.pth"}
        full = deltahub.load_delta(tmp_path / algorithm / "full-delta-rank0")
        for name in ("full-delta-rank1", "resumed-delta-rank0", "resumed-delta-rank1"):
            _same_delta(deltahub.load_delta(tmp_path / algorithm / name), full)
