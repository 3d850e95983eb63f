"""LoRA on the embedding as a tt_core plugin (entry point ``lora_embedding``)."""

from __future__ import annotations

import torch
from torch import nn

from tt_core import AdapterConfig, AdapterState, hookimpl
from tt_core.plugins import MethodRegister
from tt_core.targets import find_tied_modules, resolve_targets
from tt_plugins.lora_embedding.config import LoraEmbeddingConfig
from tt_plugins.lora_embedding.layer import LoraEmbeddingLayer


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register("lora_embedding", LoraEmbeddingConfig)


@hookimpl
def detect_target(model: nn.Module, config: AdapterConfig) -> list[str] | None:
    if not isinstance(config, LoraEmbeddingConfig):
        return None
    return resolve_targets(model, config.target_modules)


@hookimpl
def create_layer(
    config: AdapterConfig, adapter_name: str, target_name: str, base_layer: nn.Module
) -> AdapterState | None:
    if not isinstance(config, LoraEmbeddingConfig):
        return None
    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"LoRA on the embedding cannot adapt {target_name} ({type(base_layer).__name__}): it needs a "
            "module with a 2-D weight (nn.Embedding, or an nn.Linear head tied to one)"
        )
    return LoraEmbeddingLayer(weight, config.r, config.scaling, init_weights=config.init_weights)


@hookimpl
def tie_handler(
    model: nn.Module, config: AdapterConfig, target_name: str, base_layer: nn.Module
) -> list[str] | None:
    if not isinstance(config, LoraEmbeddingConfig):
        return None
    return find_tied_modules(model, target_name)


@hookimpl
def merge(state: AdapterState, weight: torch.nn.Parameter, unmerge: bool) -> bool | None:
    if not isinstance(state, LoraEmbeddingLayer):
        return None
    if unmerge:
        state.unmerge_from(weight)
    else:
        state.merge_into(weight)
    return True
