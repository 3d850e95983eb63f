"""The core's own answers to the method hooks, asked after the method's plugin (``trylast``).

As pytest keeps its defaults in built-in plugins, a method implements only
what differs: a minimal method is a config, a state, ``register_methods``
and ``create_layer``.
"""

from __future__ import annotations

import torch
from torch import nn

from tt_core.api.combining import Combination, CombineSite
from tt_core.api.config import AdapterConfig
from tt_core.api.errors import ConfigError
from tt_core.api.hookspecs import hookimpl
from tt_core.tensors.state import AdapterState
from tt_core.tensors.targets import find_tied_modules, resolve_targets


@hookimpl(trylast=True)
def detect_target(model: nn.Module, config: AdapterConfig) -> list[str]:
    """``config.target_modules``, else the module ``get_input_embeddings()`` returns."""
    return resolve_targets(model, getattr(config, "target_modules", None))


@hookimpl(trylast=True)
def tie_handler(
    model: nn.Module, config: AdapterConfig, target_name: str, base_layer: nn.Module
) -> list[str]:
    """Every other module holding the very same weight Parameter."""
    return find_tied_modules(model, target_name)


@hookimpl(trylast=True)
def merge(state: AdapterState, weight: torch.Tensor, unmerge: bool) -> bool:
    """The state's own :meth:`~AdapterState.merge_into` / :meth:`~AdapterState.unmerge_from`."""
    if unmerge:
        state.unmerge_from(weight)
    else:
        state.merge_into(weight)
    return True


@hookimpl(trylast=True)
def combine(configs: list[AdapterConfig], sites: list[CombineSite], combination: Combination) -> None:
    """A method combines only through its own plugin's answer: without one, refuse."""
    method = configs[0].method
    raise ConfigError(
        f"method {method!r} does not implement combining adapters (its plugin answers no combine hook), "
        f"so {list(combination.adapters)} cannot be combined; combine adapters of a method that does "
        "(trainable_tokens, lora_embedding, lora_linear)"
    )


@hookimpl(trylast=True)
def hotswap(state: AdapterState, source: AdapterState) -> bool:
    """Every parameter and buffer of ``source`` copied into ``state``'s own.

    See :meth:`~tt_core.AdapterState.copy_tensors_from`.
    """
    state.copy_tensors_from(source)
    return True
