"""Sparse Fine-Tuning (SFT; Ansell et al., 2024): trains ``deltahub.SparseDelta`` objects.

Depends on deltahub; deltahub never imports this package.

Example:
    >>> from training import SftConfig, SftAdamW, SftSelector, get_sft_model
    >>> model = get_sft_model(model, SftConfig(density=0.01))
    >>> optimizer = SftAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    >>> selector = SftSelector(model, optimizer, total_update_steps=1000)
    >>> ...; optimizer.step(); optimizer.zero_grad(); selector.step()
    >>> delta = model.to_delta()
"""

from .compat import TaskType, get_peft_config, get_peft_model
from .config import SftConfig
from .data import load_instruction_dataset
from .errors import SftConfigError, SftStateError
from .fsdp import shard_sft_model
from .model import ActiveDelta, get_sft_model, unwrap_sft_model
from .optim import SftAdamW, SftSM3
from .selector import SftSelector
from .trainer import SftTrainer

__all__ = [
    "ActiveDelta",
    "SftAdamW",
    "SftConfig",
    "SftConfigError",
    "SftSM3",
    "SftSelector",
    "SftStateError",
    "SftTrainer",
    "TaskType",
    "get_peft_config",
    "get_peft_model",
    "get_sft_model",
    "load_instruction_dataset",
    "shard_sft_model",
    "unwrap_sft_model",
]
