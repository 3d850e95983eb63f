"""The trainable-tokens method as a tt_core plugin (entry point ``trainable_tokens``).

What differs from the core defaults: targets may come from a
``{module: ids}`` dict, ties must agree on the ids, and no module sharing
the weight may have its padding row trained. Merging is the state's own.
"""

from __future__ import annotations

import torch
from torch import nn

from tt_core import hookimpl
from tt_core.plugins import MethodRegister
from tt_core.targets import find_tied_modules, named_base_modules, resolve_targets
from tt_plugins.trainable_tokens.config import TrainableTokensConfig
from tt_plugins.trainable_tokens.layer import TrainableTokensLayer


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register(TrainableTokensConfig)


@hookimpl
def detect_target(model: nn.Module, config: TrainableTokensConfig) -> list[str] | None:
    if isinstance(config.token_indices, dict):
        return resolve_targets(model, list(config.token_indices))
    return None  # the default: target_modules, else get_input_embeddings()


def _refuse_padding_row(indices: list[int], name: str, module: nn.Module) -> None:
    padding_idx = getattr(module, "padding_idx", None)
    if padding_idx is not None and padding_idx in indices:
        raise ValueError(
            f"token index {padding_idx} is the padding_idx of {name}: the base model never "
            "trains that row. Remove it from token_indices."
        )


@hookimpl
def create_layer(
    config: TrainableTokensConfig, adapter_name: str, target_name: str, base_layer: nn.Module
) -> TrainableTokensLayer:
    indices = config.indices_for(target_name)
    weight = getattr(base_layer, "weight", None)
    if indices is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"trainable tokens cannot adapt {target_name} ({type(base_layer).__name__})")
    vocab = weight.shape[0]
    out_of_range = [i for i in indices if i >= vocab]
    if out_of_range:
        raise ValueError(
            f"token_indices {out_of_range[:10]} are out of range for {target_name}, whose vocabulary "
            f"has {vocab} rows (valid ids 0..{vocab - 1}). After adding tokens to the tokenizer, call "
            "model.resize_token_embeddings(len(tokenizer)) before creating the adapter."
        )
    _refuse_padding_row(indices, target_name, base_layer)
    return TrainableTokensLayer(weight, indices, init_weights=config.init_weights)


@hookimpl
def tie_handler(
    model: nn.Module, config: TrainableTokensConfig, target_name: str, base_layer: nn.Module
) -> list[str]:
    tied = find_tied_modules(model, target_name)
    mine = config.indices_for(target_name)
    assert mine is not None  # create_layer refused targets without ids
    modules = dict(named_base_modules(model))
    for name in tied:
        theirs = config.indices_for(name) if isinstance(config.token_indices, dict) else mine
        if theirs is not None and theirs != mine:
            raise ValueError(
                f"{name} shares its weight with {target_name}, so they train the same rows, but "
                f"token_indices gives them different ids; give the ids once, for {target_name}"
            )
        # The rows are shared: a padding row of any module using the weight must stay as it is.
        _refuse_padding_row(mine, name, modules[name])
    return tied
