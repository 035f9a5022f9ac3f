"""peft LoRA adapters (``adapter_config.json`` with ``peft_type: LORA``) as sparse deltas.

A LoRA module changes its weight by the dense ``B @ A * scaling`` (transposed for GPT-2's ``Conv1D``, which peft
marks ``fan_in_fan_out``, and for embeddings), with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` under rsLoRA,
per-module ``rank_pattern`` / ``alpha_pattern`` overrides). We compute that product exactly (float32) one module at
a time and keep its largest entries by magnitude: a fraction per weight (``density``) or a count (``num``), per
weight or over all weights (``scope``). What is dropped is reported as a relative error,
``||dropped||_F / ||B @ A * scaling||_F`` over all modules. At density 1 nothing but exact zeros is dropped.

Variants that are not a plain additive weight change are refused with the reason: DoRA (it rescales whole
columns), LoRA biases, trainable tokens, activated LoRA, LoRA on parameters, and initialisations that rewrite the
base (PiSSA, OLoRA, CorDA, LoRA-GA) unless converted back to plain LoRA when saved.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..delta import ParamDelta, SparseDelta
from ..errors import ConversionError
from ..fingerprint import tensor_samples
from ..magnitude_budget import check_budget, entries_for, positions_above, threshold_of
from .base import BaseLike, base_tensor, open_base
from .detect import read_adapter_config
from .peft_files import read_adapter

_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+?))?(?:\.weight)?"
)
# Config entries that make an adapter something other than W + B @ A * scaling.
_NOT_ADDITIVE = {
    "use_dora": "DoRA rescales every column of the weight by a learned magnitude",
    "use_qalora": "QA-LoRA pools inputs group-wise before A",
    "lora_bias": "LoRA biases change the bias, not through B @ A",
    "trainable_token_indices": "trainable tokens replace embedding rows",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not a per-module linear adapter",
    "layer_replication": "layer replication changes the model's structure",
    "megatron_config": "Megatron-parallel LoRA layers are stored sharded",
    "use_bdlora": "block-diagonal LoRA is not stored as A and B",
    "arrow_config": "Arrow routing mixes several LoRAs per token",
}
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga")


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    # peft's rule: a pattern key matches a module name ending with it (after a dot), or a regex of its tail.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(config: dict[str, Any], what: str) -> None:
    problems = [f"{key}: {why}" for key, why in _NOT_ADDITIVE.items() if config.get(key)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(
            f"init_lora_weights={init!r} rewrites the base weights at initialisation, so B @ A is a change to that "
            "rewritten base (save with peft's path_initial_model_for_weight_conversion to get a plain LoRA)"
        )
    if config.get("bias", "none") not in (None, "none"):
        problems.append(
            f"bias={config['bias']!r}: trained biases replace the base's instead of adding to them"
        )
    if problems:
        raise ConversionError(
            f"{what} is not a plain additive LoRA, which a sparse delta can hold: " + "; ".join(problems)
        )


def _dense(
    module: str, parts: dict[str, torch.Tensor], config: dict[str, Any], shape: tuple[int, ...], what: str
) -> torch.Tensor:
    """The module's exact weight change ``B @ A * scaling`` in float32, in the base weight's layout."""
    embedding = "lora_embedding_A" in parts
    a = parts["lora_embedding_A" if embedding else "lora_A"]
    b = parts["lora_embedding_B" if embedding else "lora_B"]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ConversionError(
            f"{what}: {module}: A {list(a.shape)} and B {list(b.shape)} are not a 2-D low-rank pair (convolution "
            "LoRA is not supported)"
        )
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    if not isinstance(r, int) or r != a.shape[0] or not isinstance(alpha, (int, float)):
        raise ConversionError(
            f"{what}: {module}: the config gives r={r!r}, lora_alpha={alpha!r} but A has rank {a.shape[0]}"
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    dense = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
    if embedding or config.get("fan_in_fan_out"):
        dense = dense.T
    if tuple(dense.shape) != tuple(shape):
        raise ConversionError(
            f"{what}: {module}: B @ A has shape {list(dense.shape)} but the base weight has {list(shape)}; is this "
            "the base the adapter was trained on?"
        )
    return dense.contiguous()


def convert_lora(
    folder: Path,
    *,
    base: BaseLike | None,
    density: float | None,
    num: int | None,
    scope: str,
    drop_head: bool,
    values_dtype: torch.dtype | None,
    progress: bool,
) -> SparseDelta:
    budget = check_budget(density, num, scope)
    what = f"the LoRA adapter {folder}"
    # a variant that is not additive: refused before any reading
    _check_config(read_adapter_config(folder), what)
    config, modules, replaced = read_adapter(folder, _KEY, what, drop_head=drop_head, kept="the LoRA modules")
    incomplete = sorted(m for m, p in modules.items() if len(p) != 2)
    if incomplete:
        raise ConversionError(f"{what}: modules {incomplete[:5]} lack their A or B matrix")
    if not modules:
        raise ConversionError(f"{what} holds no lora_A / lora_B tensors")
    vd = values_dtype or torch.float32
    recorded = (config.get("base_model_name_or_path") or None, config.get("revision") or None)
    with open_base(base, recorded, what) as opened:
        weights = {m: base_tensor(opened, f"{m}.weight", what) for m in modules}
        sizes = {m: w.numel() for m, w in weights.items()}
        total = sum(sizes.values())

        def dense_of(m: str) -> torch.Tensor:
            return _dense(m, modules[m], config, tuple(weights[m].shape), what)

        cut = None
        if scope == "global":  # pass 1: the k-th largest magnitude over all modules, from a running top-k
            k = min(entries_for(budget, total, total), total)
            running = torch.empty(0)
            for m in modules:
                mag = dense_of(m).reshape(-1).abs()
                merged = torch.cat([running, torch.topk(mag, min(k, mag.numel()), sorted=False).values])
                running = torch.topk(merged, min(k, merged.numel()), sorted=False).values
            threshold = float(running.min()) if k else math.inf
            cut = [threshold, k - int((running > threshold).sum()) if k else 0]
        params: dict[str, ParamDelta] = {}
        fingerprint: dict[str, tuple[float, ...]] = {}
        total_sq = dropped_sq = 0.0
        worst: dict[str, float] = {}
        for m in tqdm(modules, desc="convert", unit="module", disable=None if progress else True):
            flat = dense_of(m).reshape(-1)
            mag = flat.abs()
            if cut is None:
                k = min(entries_for(budget, sizes[m], total), sizes[m])
                threshold, ties = threshold_of(mag, k) if k else (math.inf, 0)
            else:
                threshold, ties = cut
            idx = (
                positions_above(mag, threshold, ties)
                if math.isfinite(threshold)
                else torch.empty(0, dtype=torch.int64)
            )
            if cut is not None and threshold > 0:
                cut[1] -= int((mag[idx] == threshold).sum())
            sq = float(flat.to(torch.float64).square().sum())
            kept_sq = float(flat[idx].to(torch.float64).square().sum())
            total_sq += sq
            dropped_sq += sq - kept_sq
            worst[m] = math.sqrt(max(sq - kept_sq, 0.0) / sq) if sq else 0.0
            name = f"{m}.weight"
            values = flat[idx].to(vd)
            if not bool(torch.isfinite(values).all()):
                raise ConversionError(f"{what}: {m}: B @ A * scaling has values that do not fit {vd}")
            params[name] = ParamDelta(idx, values, tuple(weights[m].shape), weights[m].dtype)
            fingerprint[name] = tensor_samples(name, weights[m])
        relative_error = math.sqrt(max(dropped_sq, 0.0) / total_sq) if total_sq else 0.0
        provenance: dict[str, Any] = {
            "method": "convert",
            "source_format": "peft-lora",
            budget[0]: budget[1],
            "scope": scope,
            "relative_error": relative_error,
            "worst_modules": dict(sorted(worst.items(), key=lambda kv: -kv[1])[:5]),
            "lora": {
                k: config.get(k)
                for k in ("r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out")
            },
            "dropped": replaced,
        }
        return SparseDelta(
            params,
            base_model=opened.model_id,
            base_revision=opened.revision,
            fingerprint=fingerprint,
            provenance=provenance,
        )
