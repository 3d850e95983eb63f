"""Row scaling as a tt_core plugin (entry point ``row_scale``).

Only the two required hooks: targets, ties and merging are the core defaults.
"""

from __future__ import annotations

import torch
from torch import nn

from tt_core import MethodRegister, hookimpl
from tt_row_scale.config import RowScaleConfig
from tt_row_scale.layer import RowScaleLayer


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register(RowScaleConfig)


@hookimpl
def create_layer(
    config: RowScaleConfig, adapter_name: str, target_name: str, base_layer: nn.Module
) -> RowScaleLayer:
    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"row scaling needs a module with a 2-D weight; {target_name} has none")
    vocab = weight.shape[0]
    too_big = [i for i in config.token_indices if i >= vocab]
    if too_big:
        raise ValueError(
            f"token_indices {too_big} are out of range for {target_name}, which has {vocab} rows; "
            "call model.resize_token_embeddings(len(tokenizer)) after adding tokens"
        )
    return RowScaleLayer(weight, config.token_indices, init_weights=config.init_weights)
