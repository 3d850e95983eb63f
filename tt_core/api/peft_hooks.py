"""What a plugin's ``peft_export`` / ``peft_import`` hooks use: PEFT's target matching and option checks.

:mod:`tt_core.formats.peft` does the rest of PEFT's format (folders,
safetensors, key prefixes); a plugin imports only this.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from tt_core.api.errors import SavedFolderError

#: Options of every PEFT config that say nothing about what the adapter computes.
GENERIC_CONFIG_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
    }
)


def matches_targets(target_modules: Any, module_name: str) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module_name`` (a full module name).

    As PEFT reads it: a string is a regular expression matching the whole
    name; a list holds names equal to it or ending it after a ``"."``.
    """
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == name or module_name.endswith("." + name) for name in target_modules)


def is_unset(value: Any) -> bool:
    """Whether a PEFT option is left at nothing: ``None``, ``False`` or empty."""
    return value is None or value is False or value == "" or value == [] or value == {}


def check_options(
    peft_config: dict[str, Any], handled: Iterable[str], where: str, reasons: dict[str, str] | None = None
) -> None:
    """Refuse every option of ``peft_config`` that is set and that the caller does not handle.

    An option is set unless it is ``None``, ``False`` or empty. ``handled``
    names the options the caller reads or knows to be harmless; ``reasons``
    says, per option, why it cannot be applied (for a clearer error).
    """
    known = set(handled) | GENERIC_CONFIG_KEYS
    for key, value in peft_config.items():
        if key in known or is_unset(value):
            continue
        reason = (reasons or {}).get(
            key, "tt-adapters does not know this option, so it cannot tell what it does"
        )
        raise SavedFolderError(f"{where}: PEFT option {key}={value!r} cannot be applied: {reason}")


def lora_config(r: int, lora_alpha: float, target_modules: list[str]) -> dict[str, Any]:
    """PEFT's ``adapter_config`` of a plain LoRA (no dropout, bias, DoRA or patterns) on these modules."""
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
