"""``SftConfig``: the hyper-parameters of Sparse Fine-Tuning (Ansell et al., 2024)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from deltahub._dtypes import VALUE_DTYPES, dtype_name, parse_dtype

from .errors import SftConfigError

ALGORITHMS = ("rigl", "sm3")
RATE_POLICIES = ("linear", "cosine")


_IGNORED = ("task_type", "inference_mode")
_noted = False


def _note_ignored(task_type: Any, inference_mode: bool) -> None:
    global _noted
    if not _noted:
        _noted = True
        warnings.warn(
            f"SftConfig ignores task_type={getattr(task_type, 'value', task_type)!r} and "
            f"inference_mode={inference_mode!r} (accepted for code written for the SFT fork of peft): the "
            "model is tuned in place whatever its head; load a trained delta with deltahub.load_model",
            UserWarning,
            stacklevel=4,
        )


@dataclass(frozen=True)
class SftConfig:
    """What to train and how positions are reselected.

    Args:
        density: trainable values as a fraction of ALL model parameters (embeddings included), in (0, 1].
        num_tunable_weights: or an absolute number of trainable values (give exactly one of the two).
        selection_algorithm: ``"rigl"`` (grow where the accumulated dense gradient is largest) or ``"sm3"``
            (grow where SM3's row x column second-moment estimate is largest; needs ``SftSM3``).
        reselection_steps: update steps between reselections (R).
        selection_accumulation_steps: update steps of statistics gathered before each reselection (A <= R).
        initial_reselection_rate: fraction of each weight's slots moved at the second reselection; the first
            replaces the whole random initial set.
        reselection_rate_policy: how the rate decays to 0 at the last step: ``"linear"`` or ``"cosine"``.
        target_modules: module names to tune: a list of name suffixes (``["q_proj", "v_proj"]``) or one regular
            expression matched against the full name; default every ``nn.Linear`` (and GPT-2 ``Conv1D``) except
            the output embedding (LM head).
        values_dtype: dtype of the trainable values (float32 default, even on bf16 bases).
        seed: seeds the random initial positions.
        task_type, inference_mode: accepted for code written for the SFT fork of peft
            (``SftConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, ...)``) and ignored: the model is
            tuned in place whatever its head, and a delta is loaded for inference with ``deltahub.load_model``.
            A note says so once per process.

    Example:
        >>> SftConfig(density=0.01, selection_algorithm="sm3")
    """

    density: float | None = None
    num_tunable_weights: int | None = None
    selection_algorithm: str = "rigl"
    reselection_steps: int = 20
    selection_accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    reselection_rate_policy: str = "linear"
    target_modules: tuple[str, ...] | str | None = None
    values_dtype: Any = torch.float32
    seed: int = 0
    task_type: Any = dataclasses.field(default=None, repr=False, compare=False)
    inference_mode: bool = dataclasses.field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.task_type is not None or self.inference_mode:
            _note_ignored(self.task_type, self.inference_mode)
        problems = []

        def number(value: Any, integral: bool = False) -> bool:
            kind = numbers.Integral if integral else numbers.Real
            return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)

        if (self.density is None) == (self.num_tunable_weights is None):
            problems.append(
                "give exactly one of density (a fraction of all parameters) and num_tunable_weights (a count); "
                f"got density={self.density!r}, num_tunable_weights={self.num_tunable_weights!r}"
            )
        if self.density is not None and not (number(self.density) and 0 < self.density <= 1):
            problems.append(f"density must be a number in (0, 1]; got {self.density!r}")
        if self.num_tunable_weights is not None and not (
            number(self.num_tunable_weights, integral=True) and self.num_tunable_weights > 0
        ):
            problems.append(
                f"num_tunable_weights must be a positive integer; got {self.num_tunable_weights!r}"
            )
        if self.selection_algorithm not in ALGORITHMS:
            problems.append(
                f"selection_algorithm must be one of {', '.join(ALGORITHMS)}; got {self.selection_algorithm!r}"
            )
        if not (number(self.reselection_steps, integral=True) and self.reselection_steps >= 1):
            problems.append(f"reselection_steps must be an integer >= 1; got {self.reselection_steps!r}")
        elif not (
            number(self.selection_accumulation_steps, integral=True)
            and 1 <= self.selection_accumulation_steps <= self.reselection_steps
        ):
            problems.append(
                f"selection_accumulation_steps must be an integer in [1, reselection_steps={self.reselection_steps}]"
                f"; got {self.selection_accumulation_steps!r}"
            )
        if not (number(self.initial_reselection_rate) and 0 < self.initial_reselection_rate <= 1):
            problems.append(
                f"initial_reselection_rate must be a number in (0, 1]; got {self.initial_reselection_rate!r}"
            )
        if self.reselection_rate_policy not in RATE_POLICIES:
            problems.append(
                f"reselection_rate_policy must be one of {', '.join(RATE_POLICIES)}; got {self.reselection_rate_policy!r}"
            )
        targets = self.target_modules
        if targets is not None:
            if isinstance(targets, str):
                pass
            elif (
                isinstance(targets, (list, tuple))
                and targets
                and all(isinstance(t, str) and t for t in targets)
            ):
                object.__setattr__(self, "target_modules", tuple(targets))
            else:
                problems.append(
                    "target_modules must be a non-empty list of module name suffixes or one regular expression; "
                    f"got {targets!r}"
                )
        try:
            object.__setattr__(
                self,
                "values_dtype",
                parse_dtype(self.values_dtype, allowed=VALUE_DTYPES, what="values_dtype"),
            )
        except ValueError as e:
            problems.append(str(e))
        if not number(self.seed, integral=True):
            problems.append(f"seed must be an integer; got {self.seed!r}")
        if problems:
            raise SftConfigError("invalid SftConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, for provenance and checkpoints."""
        out = dataclasses.asdict(self)
        for ignored in _IGNORED:
            out.pop(ignored)
        out["values_dtype"] = dtype_name(self.values_dtype)
        if isinstance(self.target_modules, tuple):
            out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SftConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SftConfigError(f"unknown SftConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**data)
