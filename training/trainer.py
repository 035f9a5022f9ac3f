"""``SftTrainer(TrainerCls)``: sparse fine-tuning inside any ``transformers.Trainer`` subclass.

The returned subclass takes ``sft_config=``, prepares the model (unless already prepared), builds ``SftAdamW`` or
``SftSM3`` from the usual ``TrainingArguments`` (learning_rate, adam betas/epsilon, weight_decay) and steps an
``SftSelector`` after every optimizer step.

Checkpoints are adapter-only: each ``checkpoint-N`` folder holds ``sft_state.safetensors`` (positions, values,
selection statistics and the optimizer's state over the values; see ``training/checkpoint.py``), the Trainer's
own small files (``trainer_state.json``, ``rng_state.pth``, ``scheduler.pt``) and the tokenizer, never the base
weights, and ``train(resume_from_checkpoint=...)`` on a freshly prepared base continues bit-identically.
``trainer.save_model()`` and ``trainer.model.save_pretrained(dir)`` write the delta folder (``full_model=True``
on the model for the plain fine-tuned model), and ``trainer.push_to_hub()`` uploads it with deltahub's card.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .checkpoint import has_checkpoint, load_optimizer_state, read_checkpoint, write_checkpoint
from .config import SftConfig
from .errors import SftConfigError
from .model import get_sft_model
from .optim import SftAdamW, SftSM3, unwrap_optimizer
from .selector import SftSelector

SCHEDULER_FILE = "scheduler.pt"  # the Trainer's own name for its scheduler state


class _SelectorCallback(TrainerCallback):
    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.sft_selector = SftSelector(
            trainer.model,
            trainer.optimizer,
            total_update_steps=state.max_steps,
            grad_accumulation_steps=args.gradient_accumulation_steps,
        )
        if trainer._sft_resume is not None:
            trainer.sft_selector.load_state_dict(trainer._sft_resume.selector_state())
            trainer._sft_resume = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sft_selector.step()


def SftTrainer(trainer_cls: type[Trainer] = Trainer) -> type[Trainer]:
    """A subclass of ``trainer_cls`` (``Trainer`` or any subclass, e.g. trl's ``SFTTrainer``) that trains sparse
    deltas.

    Example:
        >>> trainer = SftTrainer(Trainer)(model=model, args=args, train_dataset=ds, sft_config=SftConfig(density=0.01))
        >>> trainer.train()
        >>> trainer.model.to_delta()
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"SftTrainer needs transformers.Trainer or a subclass of it; got {trainer_cls!r}")

    class _SftTrainer(trainer_cls):
        def __init__(self, *args: Any, sft_config: SftConfig | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if self.args.fsdp or self.args.deepspeed:
                raise SftConfigError(
                    "SftTrainer does not run under the Trainer's FSDP or DeepSpeed integration (they would shard "
                    "the trainable values too); for a sharded base use training.shard_sft_model in your own loop "
                    "or `deltahub train --fsdp` under torchrun (docs/training.md); DDP works as is"
                )
            model = self.model
            prepared = getattr(model, "sft_config", None)
            if prepared is None:
                if sft_config is None:
                    raise SftConfigError(
                        "pass sft_config=SftConfig(...) or a model already prepared with get_sft_model"
                    )
                get_sft_model(model, sft_config)
            elif sft_config is not None and sft_config != prepared:
                raise SftConfigError("the model was prepared with a different SftConfig than sft_config")
            self.sft_selector: SftSelector | None = None
            self._sft_resume = None
            self._sft_checkpointing = False
            self.add_callback(_SelectorCallback(self))

        def create_optimizer(self, model: nn.Module | None = None):
            if self.optimizer is None:
                model = self.model if model is None else model
                model = getattr(model, "module", model)
                params = [p for p in model.parameters() if p.requires_grad]
                args = self.args
                if model.sft_config.selection_algorithm == "sm3":
                    self.optimizer = SftSM3(
                        params, model.active_deltas(), lr=args.learning_rate, weight_decay=args.weight_decay
                    )
                else:
                    self.optimizer = SftAdamW(
                        params,
                        lr=args.learning_rate,
                        betas=(args.adam_beta1, args.adam_beta2),
                        eps=args.adam_epsilon,
                        weight_decay=args.weight_decay,
                    )
            return self.optimizer

        # -- saving: checkpoints hold the SFT state; save_model writes the delta -------------------------------
        def _save_checkpoint(self, model, trial):
            self._sft_checkpointing = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._sft_checkpointing = False

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            if not self._sft_checkpointing:
                super().save_model(output_dir, _internal_call)  # -> model.save_pretrained: the delta folder
                return
            if self.args.should_save and self.sft_selector is not None:
                write_checkpoint(
                    output_dir, self.model, self.sft_selector.state_dict(), self.sft_selector.optimizer
                )
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            # The optimizer's state went into sft_state.safetensors with the values it belongs to.
            if self.args.should_save and self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            # push_to_hub calls this after save_model: keep the delta's own card (library_name: deltahub,
            # base_model, how to apply it) rather than replace it with a card for a full model.
            if os.path.isfile(os.path.join(self.args.output_dir, "delta_config.json")):
                return
            super().create_model_card(*args, **kwargs)

        # -- resuming ------------------------------------------------------------------------------------------
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            checkpoint = read_checkpoint(resume_from_checkpoint)
            checkpoint.check_fits(self.model)
            # positions first: the optimizer state loaded next follows them
            self.model.load_sft_state_dict(checkpoint.sft)
            self._sft_resume = checkpoint

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            saved = self._sft_resume if self._sft_resume is not None else read_checkpoint(checkpoint)
            if saved.optimizer is not None:
                load_optimizer_state(unwrap_optimizer(self.optimizer), self.model, saved.optimizer)
            scheduler = os.path.join(checkpoint, SCHEDULER_FILE)
            if os.path.isfile(scheduler) and self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

        def _load_best_model(self) -> None:
            best = self.state.best_model_checkpoint
            if best is None or not has_checkpoint(best):
                return
            checkpoint = read_checkpoint(best)
            checkpoint.check_fits(self.model)
            self.model.load_sft_state_dict(checkpoint.sft)

    _SftTrainer.__name__ = _SftTrainer.__qualname__ = f"Sft{trainer_cls.__name__}"
    return _SftTrainer
