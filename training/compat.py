"""Names that code written for the SFT fork of peft (``AlanAnsell/peft``) imports, so its README runs after
``from peft import ...`` becomes ``from training import ...``.

- ``TaskType``: peft's task enum; ``SftConfig`` accepts ``task_type=`` (and ``inference_mode=``) and ignores them.
- ``get_peft_model``: :func:`training.get_sft_model` (prepares the model in place and returns it).
- ``get_peft_config``: an ``SftConfig`` from a dict, as peft's builds a config from ``peft_type`` and fields.
- ``model.active_deltas()`` yields ``(module name, weight name, delta)`` as the fork's does.
"""

from __future__ import annotations

import enum
from typing import Any

from .config import SftConfig
from .errors import SftConfigError
from .model import get_sft_model


class TaskType(str, enum.Enum):
    """peft's task types (accepted by ``SftConfig(task_type=...)``, which does not need one)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


get_peft_model = get_sft_model


def get_peft_config(config_dict: dict[str, Any]) -> SftConfig:
    """An :class:`SftConfig` from a dict of its fields (a ``peft_type`` entry, if any, must be ``"SFT"``).

    Example:
        >>> get_peft_config({"peft_type": "SFT", "density": 0.01, "selection_algorithm": "sm3"})
    """
    data = dict(config_dict)
    peft_type = str(getattr(data.get("peft_type", "SFT"), "value", data.get("peft_type", "SFT")))
    data.pop("peft_type", None)
    if peft_type.upper() != "SFT":
        raise SftConfigError(f"get_peft_config builds SFT configs only (peft_type 'SFT'); got {peft_type!r}")
    return SftConfig.from_dict(data)
