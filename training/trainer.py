"""``SftTrainer(TrainerCls)``: sparse fine-tuning inside any ``transformers.Trainer`` subclass.

The returned subclass takes ``sft_config=``, prepares the model (unless already prepared), builds ``SftAdamW`` or
``SftSM3`` from the usual ``TrainingArguments`` (learning_rate, adam betas/epsilon, weight_decay), steps an
``SftSelector`` after every optimizer step, and adds the selector's state to each checkpoint so that
``train(resume_from_checkpoint=...)`` continues exactly.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback

from .checkpoint import load_selector_state, save_selector_state
from .config import SftConfig
from .errors import SftConfigError
from .model import get_sft_model
from .optim import SftAdamW, SftSM3
from .selector import SftSelector


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
        if trainer._sft_resume_state is not None:
            trainer.sft_selector.load_state_dict(trainer._sft_resume_state)
            trainer._sft_resume_state = None

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
            self._sft_resume_state: dict | None = None
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

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.sft_selector is not None:
                folder = self._get_output_dir(trial=trial)
                save_selector_state(
                    f"{folder}/checkpoint-{self.state.global_step}", self.sft_selector.state_dict()
                )

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            state = load_selector_state(resume_from_checkpoint, device=self.args.device)
            if state is not None:
                self.model.load_sft_state_dict(state["sft"])  # before the optimizer state is loaded
                self._sft_resume_state = state

    _SftTrainer.__name__ = _SftTrainer.__qualname__ = f"Sft{trainer_cls.__name__}"
    return _SftTrainer
