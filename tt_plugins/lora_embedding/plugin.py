"""LoRA on the embedding as a tt_core plugin (entry point ``lora_embedding``).

Targets are the core default; ties too, unless ``adapt_tied_modules=False``.
Merging is the state's own. PEFT's LORA type maps onto it (see docs/peft.md).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from tt_core import MethodRegister, hookimpl
from tt_core.api import peft_hooks
from tt_core.api.combining import Combination, CombineSite
from tt_core.api.errors import ConfigError
from tt_core.tensors.targets import find_tied_modules, input_embedding_name, named_base_modules
from tt_plugins import lora_combining, lora_options
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
        raise ConfigError(
            f"LoRA on the embedding cannot adapt {target_name} ({type(base_layer).__name__}): it needs a "
            "module with a 2-D weight (nn.Embedding, or an nn.Linear head tied to one)"
        )
    return LoraEmbeddingLayer(weight, config.r, config.scaling, init_weights=config.init_weights)


@hookimpl
def hotswap(state: LoraEmbeddingLayer, source: LoraEmbeddingLayer) -> bool:
    """The source's factors and scaling into this state: in place at the same rank, replaced at another."""
    state.copy_tensors_from(source, resize=True)  # lora_embedding_A, lora_embedding_B and the scaling buffer
    state.r = source.r
    return True


@hookimpl
def tie_handler(
    model: nn.Module, config: LoraEmbeddingConfig, target_name: str, base_layer: nn.Module
) -> list[str] | None:
    # adapt_tied_modules=False declines every tie (PEFT's LoRA adapts the modules it names, only).
    return None if config.adapt_tied_modules else []


@hookimpl
def combine(
    configs: list[LoraEmbeddingConfig], sites: list[CombineSite], combination: Combination
) -> tuple[LoraEmbeddingConfig, list[LoraEmbeddingLayer]]:
    """PEFT's ``cat``, ``linear`` and ``svd`` family (:mod:`tt_plugins.lora_combining`); scaling 1."""
    rank = lora_combining.check(LoraEmbeddingConfig.method, [config.r for config in configs], combination)
    states = []
    for site in sites:
        layers = cast(list[LoraEmbeddingLayer], site.states)
        sources = [(state.lora_embedding_A, state.lora_embedding_B, float(state.scaling)) for state in layers]
        a, b = lora_combining.combine_factors(sources, combination, rank, site.modules[0])
        state = LoraEmbeddingLayer(site.base_layer.weight, a.shape[0], 1.0)  # type: ignore[arg-type]
        with torch.no_grad():
            state.lora_embedding_A.copy_(a)
            state.lora_embedding_B.copy_(b)
        states.append(state)
    first = configs[0]
    config = LoraEmbeddingConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=first.target_modules,
        adapt_tied_modules=first.adapt_tied_modules,
    )
    return config, states


# ------------------------------------------------------------------ PEFT's LORA
# PEFT's lora.Embedding holds lora_embedding_A (r, vocabulary) and lora_embedding_B (width, r) and adds
# scaling * (B @ A).T to the weight, exactly as LoraEmbeddingLayer does. On an nn.Linear (a tied LM head)
# PEFT holds lora_A.weight (r, width) and lora_B.weight (vocabulary, r) and adds scaling * lora_B @ lora_A:
# the same update when lora_A = B.T and lora_B = A.T.

_HANDLED = lora_options.PEFT_OPTIONS
_REASONS = lora_options.PEFT_REFUSALS
_FACTORS = {
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
    "lora_A.weight": ("linear", "A"),
    "lora_B.weight": ("linear", "B"),
}


@hookimpl
def peft_export(
    model: nn.Module, config: LoraEmbeddingConfig, sites: list[tuple[list[str], dict[str, torch.Tensor]]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = dict(named_base_modules(model))
    targets: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for names, state in sites:
        a, b = state["lora_embedding_A"], state["lora_embedding_B"]
        for name in names:  # each module applying the state gets its own copy: PEFT ties none of them
            module = modules[name]
            if isinstance(module, nn.Embedding):
                tensors[f"{name}.lora_embedding_A"] = a.clone()
                tensors[f"{name}.lora_embedding_B"] = b.clone()
            elif isinstance(module, nn.Linear):
                tensors[f"{name}.lora_A.weight"] = b.T.contiguous()
                tensors[f"{name}.lora_B.weight"] = a.T.contiguous()
            else:
                raise ConfigError(
                    f"{name} is a {type(module).__name__}; PEFT's LoRA form covers nn.Embedding and nn.Linear"
                )
            targets.append(name)
    return peft_hooks.lora_config(config.r, config.lora_alpha, targets), tensors


def _factors(tensors: dict[str, torch.Tensor], r: int) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """(kind, A, B) per module, A and B in this plugin's layout: (r, vocabulary) and (width, r)."""
    found: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        for suffix, (kind, slot) in _FACTORS.items():
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                entry = found.setdefault(module, {"kind": kind})
                if entry["kind"] != kind:
                    raise ConfigError(f"{module} holds both embedding and linear LoRA factors")
                entry[slot] = tensor
                break
        else:
            raise ConfigError(
                f"the folder holds {key!r}, which is not a LoRA factor of an embedding or a linear head "
                "(lora_embedding_A/B, lora_A/B.weight)"
            )
    factors = {}
    for module, entry in found.items():
        if "A" not in entry or "B" not in entry:
            raise ConfigError(f"the folder holds only one of the two LoRA factors of {module}")
        a, b = entry["A"], entry["B"]
        if entry["kind"] == "linear":
            a, b = b.T, a.T  # lora_B (vocabulary, r) -> A (r, vocabulary); lora_A (r, width) -> B (width, r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ConfigError(
                f"the LoRA factors of {module} have shapes {tuple(entry['A'].shape)} and "
                f"{tuple(entry['B'].shape)}, which do not have rank r={r}"
            )
        factors[module] = (entry["kind"], a.contiguous(), b.contiguous())
    return factors


def _check_modules(
    factors: dict[str, tuple[str, torch.Tensor, torch.Tensor]], model: nn.Module | None
) -> None:
    """Only token embeddings, and linear heads sharing an embedding's weight, are loaded."""
    if model is None:
        # Without the model, a linear module passes as a tied head only if it mirrors an embedding's factors.
        embeddings = [(a, b) for kind, a, b in factors.values() if kind == "embedding"]
        for name, (kind, a, b) in factors.items():
            if kind == "linear" and not any(
                torch.equal(a, ea) and torch.equal(b, eb) for ea, eb in embeddings
            ):
                raise ConfigError(
                    f"the folder holds LoRA on {name}, a linear module, with factors of its own: without "
                    "the model, tt-adapters cannot tell a head tied to the embedding from an attention or "
                    "MLP projection. Load the folder onto its model (AdapterModel.from_pretrained), which "
                    "checks it; then publish the loaded adapter with Registry.publish"
                )
        return
    modules = dict(named_base_modules(model))
    embedding_weights = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    for module_name, (kind, _, _) in factors.items():
        module = modules.get(module_name)
        if module is None:
            raise ConfigError(f"the folder holds LoRA on {module_name}, which this model does not have")
        tied_head = isinstance(module, nn.Linear) and id(module.weight) in embedding_weights
        expected = nn.Embedding if kind == "embedding" else nn.Linear
        if not isinstance(module, expected):
            raise ConfigError(
                f"the folder holds {kind} LoRA factors for {module_name}, which is a "
                f"{type(module).__name__} here"
            )
        if kind == "linear" and not tied_head:
            raise ConfigError(
                f"the folder holds LoRA on {module_name}, a linear module that does not share its weight "
                "with a token embedding (an attention or MLP projection, or an untied head): tt-adapters "
                "adapts token embeddings and heads tied to them only"
            )


def _shared_form(
    factors: dict[str, tuple[str, torch.Tensor, torch.Tensor]], model: nn.Module
) -> list[str] | None:
    """The targets of an equivalent ``adapt_tied_modules=True`` adapter, or None if there is none.

    There is one when, for every weight, the folder adapts every module holding
    it, all with the same update.
    """
    modules = dict(named_base_modules(model))
    try:
        embedding = input_embedding_name(model)
    except ValueError:
        embedding = ""
    groups: dict[int, list[str]] = {}
    for name in factors:
        groups.setdefault(id(modules[name].weight), []).append(name)
    targets = []
    for names in groups.values():
        holders = {names[0], *find_tied_modules(model, names[0])}
        _, a, b = factors[names[0]]
        if set(names) != holders or not all(
            torch.equal(factors[n][1], a) and torch.equal(factors[n][2], b) for n in names
        ):
            return None
        embeddings = [n for n in names if isinstance(modules[n], nn.Embedding)]
        targets.append(embedding if embedding in names else (embeddings or names)[0])
    return targets


@hookimpl
def peft_import(
    peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None
) -> tuple[LoraEmbeddingConfig, dict[str, torch.Tensor]] | None:
    if peft_config.get("peft_type") != "LORA" or lora_options.on_linear_layers(tensors, model):
        return None
    if peft_config.get("trainable_token_indices"):
        return None  # the core splits its token rows off as a trainable-tokens adapter and asks again
    peft_hooks.check_options(peft_config, _HANDLED, "LoRA", _REASONS)
    r, alpha, _ = lora_options.peft_numbers(peft_config)
    if peft_config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # PEFT scales by alpha / sqrt(r); this plugin by alpha / r
    factors = _factors(tensors, r)
    if not factors:
        raise ConfigError("the folder holds no LoRA weights")
    _check_modules(factors, model)
    targets = _shared_form(factors, model) if model is not None else None
    if targets is not None:
        config = LoraEmbeddingConfig(r=r, lora_alpha=alpha, target_modules=targets)
    else:
        targets = list(factors)
        config = LoraEmbeddingConfig(r=r, lora_alpha=alpha, target_modules=targets, adapt_tied_modules=False)
    native = {}
    for name in targets:
        _, a, b = factors[name]
        native[f"{name}.lora_embedding_A"] = a
        native[f"{name}.lora_embedding_B"] = b
    return config, native
