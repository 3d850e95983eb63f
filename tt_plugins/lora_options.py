"""What the two shipped LoRA methods share: their numbers' rules, and which one owns a PEFT LoRA folder."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from tt_core.api.errors import ConfigError
from tt_core.tensors.targets import named_base_modules

#: PEFT LoRA options both plugins read or accept (the rest of a LoraConfig is refused by name).
PEFT_OPTIONS = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "init_lora_weights",
        "bias",
        "fan_in_fan_out",  # followed by lora_linear; PEFT turns it off for embeddings and nn.Linear
        "lora_dropout",  # applied in training by lora_linear; no effect on a loaded adapter's outputs
        # Which modules PEFT targets: the folder's tensors say which it adapted.
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "ensure_weight_tying",
        # Settings of options that are off, or of initialisations refused by peft_numbers.
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
    }
)

#: Why each option that changes what LoRA computes is refused.
PEFT_REFUSALS = {
    "use_dora": "DoRA rescales the weight's columns by a learned magnitude, which this LoRA does not hold",
    "lora_bias": "a bias on LoRA's B factor is not supported",
    "rank_pattern": "ranks that differ by module are not supported; give every module rank r",
    "alpha_pattern": "alphas that differ by module are not supported; give every module lora_alpha",
    "layer_replication": "it duplicates layers of the base model",
    "target_parameters": "it adapts bare parameters (such as MoE experts), not modules",
    "alora_invocation_tokens": "activated LoRA applies the update from invocation tokens on, not everywhere",
    "use_qalora": "QA-LoRA pools the input of quantized layers",
    "megatron_config": "Megatron's parallel layers are not supported",
}


def rank_and_alpha(r: object, lora_alpha: object) -> tuple[int, int | float]:
    """``r`` and ``lora_alpha`` as plain Python numbers (JSON holds them), or a ConfigError saying why not."""
    # bool is an int to Python, but r=True is certainly a mistake.
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ConfigError(f"r={r!r} is not a valid LoRA rank; give a whole number >= 1, e.g. r=8")
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, numbers.Real)
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        raise ConfigError(
            f"lora_alpha={lora_alpha!r} is not valid; give a positive number, e.g. lora_alpha={2 * int(r)} "
            "(the update is scaled by lora_alpha / r)"
        )
    alpha = int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)
    return int(r), alpha


def peft_numbers(peft_config: dict[str, Any]) -> tuple[int, int | float, bool | str]:
    """A PEFT LoRA's ``r``, ``lora_alpha`` and ``init_lora_weights``; what changes the outputs is refused."""
    bias = peft_config.get("bias", "none")
    if bias != "none":
        raise ConfigError(
            f"PEFT option bias={bias!r} trains biases of the base model, which tt-adapters never changes"
        )
    init = peft_config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ConfigError(
            f"PEFT option init_lora_weights={init!r} is not one tt-adapters can vouch for: initialisations "
            "such as PiSSA, OLoRA, LoftQ or CorDA change the base weights when PEFT loads the adapter, "
            "which tt-adapters never does"
        )
    r, alpha = peft_config.get("r", 8), peft_config.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"PEFT option r={r!r} is not a rank")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"PEFT option lora_alpha={alpha!r} is not a number")
    return r, alpha, init


def on_linear_layers(tensors: dict[str, torch.Tensor], model: nn.Module | None) -> bool:
    """Whether a PEFT LoRA is one of linear layers (``lora_linear``'s) rather than ``lora_embedding``'s.

    It is when it holds no embedding factors and adapts some linear module that
    shares no weight with an embedding (without the model: any linear module).
    The two plugins answer for disjoint folders, so the order pluggy asks them
    in does not matter.
    """
    if any(key.endswith((".lora_embedding_A", ".lora_embedding_B")) for key in tensors):
        return False
    linear = [key.rsplit(".", 2)[0] for key in tensors if key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if not linear:
        return False
    if model is None:
        return True
    modules = dict(named_base_modules(model))
    embedding_weights = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    return any(id(getattr(modules.get(name), "weight", None)) not in embedding_weights for name in linear)
