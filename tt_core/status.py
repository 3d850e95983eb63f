"""PEFT's status reports (``get_layer_status``, ``get_model_status``) from the model and its records."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from torch import nn

from tt_core.tensors.wrapper import AdapterLayer

if TYPE_CHECKING:
    from tt_core.records import AdapterRecord

Irregular = Literal["irregular"]


@dataclasses.dataclass
class LayerStatus:
    """One wrapped module, with the fields of PEFT's ``TunerLayerStatus``."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclasses.dataclass
class ModelStatus:
    """The whole model, with the fields of PEFT's ``TunerModelStatus``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


def _flags(values: set[bool]) -> bool | Irregular:
    return values.pop() if len(values) == 1 else "irregular"


def layer_status(model: nn.Module, merged: list[str], enabled: bool) -> list[LayerStatus]:
    """Each wrapped module of ``model``: its adapters, active, merged (of ``merged``), trainable, devices."""
    statuses = []
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        available = list(module.adapters.keys())
        statuses.append(
            LayerStatus(
                name=name,
                module_type=f"tt.{type(module.base_layer).__name__}",
                enabled=enabled,
                active_adapters=list(module.active_adapters),
                merged_adapters=[adapter for adapter in merged if adapter in available],
                requires_grad={
                    adapter: _flags(
                        {p.requires_grad for p in module.adapters[adapter].parameters()} or {False}
                    )
                    for adapter in available
                },
                available_adapters=available,
                devices={
                    adapter: sorted({str(p.device.type) for p in module.adapters[adapter].parameters()})
                    for adapter in available
                },
            )
        )
    return statuses


def model_status(
    model: nn.Module,
    records: Mapping[str, AdapterRecord],
    active: list[str],
    merged: list[str],
    enabled: bool,
    parameter_counts: tuple[int, int],
    adapter_model_type: str = "AdapterModel",
) -> ModelStatus:
    """The adapters of ``model`` in one report; ``parameter_counts`` is (trainable, total)."""
    layers = layer_status(model, merged, enabled)
    trainable, total = parameter_counts
    requires_grad: dict[str, bool | Irregular] = {}
    devices: dict[str, list[str]] = {}
    for layer in layers:
        for adapter, flag in layer.requires_grad.items():
            requires_grad[adapter] = flag if requires_grad.get(adapter, flag) == flag else "irregular"
            devices[adapter] = sorted(set(devices.get(adapter, [])) | set(layer.devices[adapter]))
    return ModelStatus(
        base_model_type=type(model).__name__,
        adapter_model_type=adapter_model_type,
        peft_types={name: record.config.method for name, record in records.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=list(active),
        merged_adapters=list(merged),
        requires_grad=requires_grad,
        available_adapters=list(records),
        devices=devices,
    )
