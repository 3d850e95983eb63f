"""LoRA on the embedding as a tt_core plugin (entry point ``lora_embedding``).

Targets and ties are the core defaults; merging is the state's own.
"""

from __future__ import annotations

import torch
from torch import nn

from tt_core import hookimpl
from tt_core.plugins import MethodRegister
from tt_plugins.lora_embedding.config import LoraEmbeddingConfig
from tt_plugins.lora_embedding.layer import LoraEmbeddingLayer


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register(LoraEmbeddingConfig)


@hookimpl
def create_layer(
    config: LoraEmbeddingConfig, adapter_name: str, target_name: str, base_layer: nn.Module
) -> LoraEmbeddingLayer:
    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"LoRA on the embedding cannot adapt {target_name} ({type(base_layer).__name__}): it needs a "
            "module with a 2-D weight (nn.Embedding, or an nn.Linear head tied to one)"
        )
    return LoraEmbeddingLayer(weight, config.r, config.scaling, init_weights=config.init_weights)
