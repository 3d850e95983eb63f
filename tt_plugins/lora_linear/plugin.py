"""LoRA on linear layers as a tt_core plugin (entry point ``lora_linear``).

``detect_target`` resolves PEFT's ``target_modules`` (names, a regular
expression, ``"all-linear"``) to linear layers; ties are declined, as PEFT's
LoRA adapts only the modules it names; merging is the state's own. With
``trainable_token_indices`` the same adapter also holds trainable tokens on
the embedding(s) it names: those targets get the ``trainable_tokens``
plugin's state, and its tie handling (a tied head shares the rows), as in
PEFT. PEFT's LORA type on linear layers, with or without
``trainable_token_indices``, maps onto it (see docs/peft.md).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, cast

import torch
from torch import nn

from tt_core import MethodRegister, hookimpl
from tt_core.api import peft_hooks
from tt_core.api.combining import Combination, CombineSite
from tt_core.api.errors import ConfigError
from tt_core.tensors.state import is_conv1d
from tt_core.tensors.targets import named_base_modules, resolve_targets
from tt_core.tensors.wrapper import AdapterLayer
from tt_plugins import lora_combining, lora_options
from tt_plugins.lora_linear.config import ALL_LINEAR, LoraLinearConfig
from tt_plugins.lora_linear.layer import LoraLinearLayer
from tt_plugins.trainable_tokens import plugin as tokens_plugin
from tt_plugins.trainable_tokens.config import TrainableTokensConfig
from tt_plugins.trainable_tokens.layer import TrainableTokensLayer


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_head(model: nn.Module) -> nn.Module | None:
    """The module ``get_output_embeddings()`` returns (unwrapped), which ``all-linear`` leaves out."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head.base_layer if isinstance(head, AdapterLayer) else head


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register(LoraLinearConfig)


def _token_targets(model: nn.Module, config: LoraLinearConfig) -> list[str]:
    """The modules ``trainable_token_indices`` names: the input embedding for a list, else its keys."""
    if config.trainable_token_indices is None:
        return []
    tokens = config.tokens_config()
    return tokens_plugin.detect_target(model=model, config=tokens) or resolve_targets(model, None)


def _is_token_target(config: LoraLinearConfig, target_name: str, base_layer: nn.Module) -> bool:
    """Whether ``target_name`` (one of :func:`detect_target`'s) gets the trainable-tokens state."""
    indices = config.trainable_token_indices
    if isinstance(indices, dict):
        return config.tokens_config().indices_for(target_name) is not None
    return indices is not None and not _is_linear(base_layer)  # the input embedding


@hookimpl
def detect_target(model: nn.Module, config: LoraLinearConfig) -> list[str]:
    linear = _linear_targets(model, config)
    tokens = _token_targets(model, config)
    modules = dict(named_base_modules(model))
    for name in tokens:
        weight = getattr(modules[name], "weight", None)
        both = [other for other in linear if getattr(modules[other], "weight", None) is weight]
        if both:
            raise ConfigError(
                f"trainable_token_indices trains rows of {name}, whose weight {both} hold too, and "
                f"target_modules={config.target_modules!r} puts LoRA on them: one adapter cannot change one "
                "weight twice (PEFT refuses this too). Leave them out of target_modules, or train those rows "
                "in a separate TrainableTokensConfig adapter"
            )
    return linear + tokens


def _linear_targets(model: nn.Module, config: LoraLinearConfig) -> list[str]:
    modules = dict(named_base_modules(model))
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        seen: set[int] = set()
        names = []
        for name, module in modules.items():
            if name and _is_linear(module) and module is not head and id(module) not in seen:
                seen.add(id(module))
                names.append(name)
        if not names:
            raise ConfigError(
                f"target_modules='all-linear' found no linear layer (nn.Linear, Conv1D) in "
                f"{type(model).__name__} besides its output head"
            )
        return names
    names = resolve_targets(model, config.target_modules)
    others = [f"{name} ({type(modules[name]).__name__})" for name in names if not _is_linear(modules[name])]
    if others:
        raise ConfigError(
            f"target_modules={config.target_modules!r} selects {others}, which are not linear layers; "
            "LoRA on linear layers adapts nn.Linear and transformers' Conv1D (use LoraEmbeddingConfig for "
            "an nn.Embedding). Name the projections themselves, e.g. ['q_proj', 'v_proj']"
        )
    return names


@hookimpl
def create_layer(
    config: LoraLinearConfig, adapter_name: str, target_name: str, base_layer: nn.Module
) -> LoraLinearLayer | TrainableTokensLayer:
    if _is_token_target(config, target_name, base_layer):
        tokens = config.tokens_config()
        return tokens_plugin.create_layer(
            config=tokens, adapter_name=adapter_name, target_name=target_name, base_layer=base_layer
        )
    weight = getattr(base_layer, "weight", None)
    if isinstance(base_layer, nn.Linear) and isinstance(weight, torch.Tensor):
        in_features, out_features, fan_in_fan_out = base_layer.in_features, base_layer.out_features, False
    elif is_conv1d(base_layer) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        (in_features, out_features), fan_in_fan_out = weight.shape, True
    else:
        raise ConfigError(
            f"LoRA on linear layers cannot adapt {target_name} ({type(base_layer).__name__}): it adapts "
            "nn.Linear and transformers' Conv1D (use LoraEmbeddingConfig for an nn.Embedding)"
        )
    if config.fan_in_fan_out != fan_in_fan_out:
        # PEFT does the same. One message per layer kind, so Python's warning filter shows it once.
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out}, but a {type(base_layer).__name__} stores its weight "
            f"{'(in, out)' if fan_in_fan_out else '(out, in)'}; using fan_in_fan_out={fan_in_fan_out} for "
            "such layers",
            stacklevel=2,
        )
    return LoraLinearLayer(
        in_features,
        out_features,
        config.r,
        config.scaling,
        dropout=config.lora_dropout,
        init_lora_weights=config.init_lora_weights,
        fan_in_fan_out=fan_in_fan_out,
        device=weight.device,
    )


@hookimpl
def tie_handler(
    model: nn.Module, config: LoraLinearConfig, target_name: str, base_layer: nn.Module
) -> list[str]:
    # PEFT's LoRA adapts the modules it names only; a head tied to the embedding keeps its own factors
    # (and such an adapter cannot be merged, since the embedding shares the weight). Its trainable tokens
    # follow the tie, as the trainable_tokens plugin's do.
    if _is_token_target(config, target_name, base_layer):
        return tokens_plugin.tie_handler(
            model=model, config=config.tokens_config(), target_name=target_name, base_layer=base_layer
        )
    return []


@hookimpl
def combine(
    configs: list[LoraLinearConfig], sites: list[CombineSite], combination: Combination
) -> tuple[LoraLinearConfig, list[LoraLinearLayer]]:
    """As ``lora_embedding`` combines (:mod:`tt_plugins.lora_combining`); no trainable_token_indices."""
    for name, config in zip(combination.adapters, configs, strict=True):
        if config.trainable_token_indices is not None:
            raise ConfigError(
                f"adapter {name!r} also trains token rows (trainable_token_indices), which LoRA's "
                "combination types do not cover; combine LoRA adapters without them, and their rows as "
                "separate trainable_tokens adapters"
            )
    dropouts = {config.lora_dropout for config in configs}
    if len(dropouts) > 1:
        raise ConfigError(
            f"adapters {list(combination.adapters)} have different lora_dropout {sorted(dropouts)}; the "
            "combination has one, so give them the same"
        )
    rank = lora_combining.check(LoraLinearConfig.method, [config.r for config in configs], combination)
    states = []
    for site in sites:
        layers = cast(list[LoraLinearLayer], site.states)
        sources = [(state.lora_A, state.lora_B, float(state.scaling)) for state in layers]
        a, b = lora_combining.combine_factors(sources, combination, rank, site.modules[0])
        first = layers[0]
        state = LoraLinearLayer(
            a.shape[1],
            b.shape[0],
            a.shape[0],
            1.0,
            dropout=first.dropout,
            fan_in_fan_out=first.fan_in_fan_out,
            device=first.lora_A.device,
        )
        with torch.no_grad():
            state.lora_A.copy_(a)
            state.lora_B.copy_(b)
        states.append(state)
    config = dataclasses.replace(
        configs[0], r=rank, lora_alpha=rank, use_rslora=False, init_lora_weights=True
    )
    return config, states


@hookimpl
def hotswap(state: Any, source: Any) -> bool:
    """The source's factors, scaling and dropout (or, on the embedding, its token rows) into this state."""
    if isinstance(state, TrainableTokensLayer):  # trainable_token_indices
        return tokens_plugin.hotswap(state=state, source=source)
    state.copy_tensors_from(source, resize=True)  # lora_A, lora_B and the scaling buffer; another rank too
    state.r = source.r
    state.dropout = source.dropout
    return True


# ------------------------------------------------------------------ PEFT's LORA
# PEFT's lora.Linear holds lora_A.weight (r, in) and lora_B.weight (out, r) and adds
# scaling * lora_B(lora_A(dropout(x))) to the base output: this state's lora_A and lora_B, same layout,
# for nn.Linear and Conv1D alike (PEFT reads a Conv1D's in and out from its transposed weight).

_HANDLED = lora_options.PEFT_OPTIONS | {"trainable_token_indices"}  # the rows: read below
_REASONS = lora_options.PEFT_REFUSALS
_FACTORS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
# PEFT keeps the rows of trainable_token_indices under <module>.token_adapter., as TRAINABLE_TOKENS keeps
# them under <module>.: the trainable_tokens plugin reads and writes them.
_TOKEN_ADAPTER = ".token_adapter."
_ROWS_KEY = "trainable_tokens_delta"
_TOKEN_ROWS = _TOKEN_ADAPTER + _ROWS_KEY


def _factors(tensors: dict[str, torch.Tensor], r: int) -> dict[str, dict[str, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, slot in _FACTORS.items():
            if key.endswith("." + suffix):
                found.setdefault(key[: -len(suffix) - 1], {})[slot] = tensor
                break
        else:
            raise ConfigError(
                f"the folder holds {key!r}, which is not a LoRA factor of a linear layer "
                "(lora_A.weight, lora_B.weight)"
            )
    for module, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConfigError(f"the folder holds only one of the two LoRA factors of {module}")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ConfigError(
                f"the LoRA factors of {module} have shapes {tuple(a.shape)} and {tuple(b.shape)}, which do "
                f"not have rank r={r} (rank_pattern is not supported)"
            )
    return found


def _check_modules(factors: dict[str, dict[str, torch.Tensor]], model: nn.Module) -> bool:
    """Every module is a linear layer of the factors' shapes; returns whether all are Conv1D."""
    modules = dict(named_base_modules(model))
    kinds = []
    for name, pair in factors.items():
        module = modules.get(name)
        if module is None:
            raise ConfigError(f"the folder holds LoRA on {name}, which this model does not have")
        if not _is_linear(module):
            raise ConfigError(
                f"the folder holds LoRA on linear layers for {name}, which is a {type(module).__name__} here"
            )
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        in_out = tuple(weight.shape) if is_conv1d(module) else tuple(weight.shape[::-1])
        shapes = (pair["lora_A"].shape[1], pair["lora_B"].shape[0])
        if shapes != in_out:
            raise ConfigError(
                f"the LoRA factors of {name} are for {shapes[0]} inputs and {shapes[1]} outputs, but this "
                f"model's {name} has {in_out[0]} and {in_out[1]}: it was trained on another model"
            )
        kinds.append(is_conv1d(module))
    return all(kinds)


def _import_tokens(
    indices: Any, tensors: dict[str, torch.Tensor], model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """The folder's token rows as the trainable_tokens plugin's states load them, checked by it."""
    try:
        tokens = TrainableTokensConfig(token_indices=indices)
    except ConfigError as error:
        raise ConfigError(f"PEFT option trainable_token_indices={indices!r}: {error}") from None
    rows: dict[str, torch.Tensor] = {}
    ids: dict[str, list[int]] = {}
    for key, tensor in tensors.items():
        module = key[: -len(_TOKEN_ROWS)]
        given = tokens.indices_for(module)
        if given is None:
            raise ConfigError(
                f"the folder holds token rows for {module}, which trainable_token_indices "
                f"({sorted(tokens.token_indices)}) does not name"
            )
        rows[f"{module}.{_ROWS_KEY}"], ids[module] = tensor, given
    if not rows:
        raise ConfigError(f"trainable_token_indices is {indices!r}, but the folder holds no token rows")
    as_tokens = {
        "peft_type": "TRAINABLE_TOKENS",
        "token_indices": indices if isinstance(indices, list) else ids,
        "target_modules": list(ids),
    }
    imported = tokens_plugin.peft_import(peft_config=as_tokens, tensors=rows, model=model)
    assert imported is not None  # a TRAINABLE_TOKENS config: the plugin always answers
    return imported[1]


@hookimpl
def peft_import(
    peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None
) -> tuple[LoraLinearConfig, dict[str, torch.Tensor]] | None:
    if peft_config.get("peft_type") != "LORA" or not lora_options.on_linear_layers(tensors, model):
        return None
    peft_hooks.check_options(peft_config, _HANDLED, "LoRA", _REASONS)
    r, alpha, init = lora_options.peft_numbers(peft_config)
    indices = peft_config.get("trainable_token_indices") or None
    token_rows = {key: tensor for key, tensor in tensors.items() if key.endswith(_TOKEN_ROWS)}
    native = _import_tokens(indices, token_rows, model) if indices is not None else {}
    factors = _factors({key: t for key, t in tensors.items() if key not in token_rows}, r)
    fan_in_fan_out = bool(peft_config.get("fan_in_fan_out", False))
    if model is not None:
        fan_in_fan_out = _check_modules(factors, model)
    targets = sorted(factors)
    config = LoraLinearConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=peft_config.get("lora_dropout", 0.0) or 0.0,
        use_rslora=bool(peft_config.get("use_rslora", False)),
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=init,
        trainable_token_indices=indices,
    )
    for name in targets:
        native[f"{name}.lora_A"] = factors[name]["lora_A"].contiguous()
        native[f"{name}.lora_B"] = factors[name]["lora_B"].contiguous()
    return config, native


@hookimpl
def peft_export(
    model: nn.Module, config: LoraLinearConfig, sites: list[tuple[list[str], dict[str, torch.Tensor]]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = dict(named_base_modules(model))
    targets: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    indices: dict[str, list[int] | None] = {}
    for names, state in sites:
        name = names[0]
        if "trainable_tokens_rows" in state:  # the adapter's trainable tokens: PEFT's TRAINABLE_TOKENS rows
            tokens = config.tokens_config()
            _, rows = tokens_plugin.peft_export(model=model, config=tokens, sites=[(names, state)])
            # PEFT gives the rows to a head tied to the input embedding itself: the target's rows only.
            tensors[name + _TOKEN_ROWS] = rows[f"{name}.{_ROWS_KEY}"]
            indices[name] = tokens.indices_for(name)
            continue
        # LoRA: ties are declined, one module per state
        tensors[f"{name}.lora_A.weight"] = state["lora_A"].clone()
        tensors[f"{name}.lora_B.weight"] = state["lora_B"].clone()
        targets.append(name)
    peft_config = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(targets),
        "lora_dropout": config.lora_dropout,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": all(is_conv1d(modules[name]) for name in targets),
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if indices:  # a list, as PEFT reads it, is the input embedding's
        given = config.trainable_token_indices
        peft_config["trainable_token_indices"] = given if isinstance(given, list) else indices
    return peft_config, tensors
