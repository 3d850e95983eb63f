"""The trainable-tokens method as a tt_core plugin (entry point ``trainable_tokens``).

What differs from the core defaults: targets may come from a
``{module: ids}`` dict, ties must agree on the ids, and no module sharing
the weight may have its padding row trained. Merging is the state's own.
PEFT's TRAINABLE_TOKENS type maps onto it (see docs/peft.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tt_core import MethodRegister, hookimpl
from tt_core.api import peft_hooks
from tt_core.api.combining import Combination, CombineSite
from tt_core.api.errors import ConfigError
from tt_core.tensors.targets import (
    find_tied_modules,
    input_embedding_name,
    named_base_modules,
    resolve_targets,
)
from tt_plugins.trainable_tokens import combine as combining
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
        raise ConfigError(
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
        raise ConfigError(f"trainable tokens cannot adapt {target_name} ({type(base_layer).__name__})")
    vocab = weight.shape[0]
    out_of_range = [i for i in indices if i >= vocab]
    if out_of_range:
        raise ConfigError(
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
    if mine is None:
        raise ConfigError(
            f"token_indices gives no ids for {target_name} (it names {list(config.token_indices)}); "
            f"add an entry for {target_name}, or target only the modules it names"
        )
    modules = dict(named_base_modules(model))
    for name in tied:
        theirs = config.indices_for(name) if isinstance(config.token_indices, dict) else mine
        if theirs is not None and theirs != mine:
            raise ConfigError(
                f"{name} shares its weight with {target_name}, so they train the same rows, but "
                f"token_indices gives them different ids; give the ids once, for {target_name}"
            )
        # The rows are shared: a padding row of any module using the weight must stay as it is.
        _refuse_padding_row(mine, name, modules[name])
    return tied


@hookimpl
def combine(
    configs: list[TrainableTokensConfig], sites: list[CombineSite], combination: Combination
) -> tuple[TrainableTokensConfig, list[TrainableTokensLayer]]:
    """Row by row over the union of the sources' rows (:mod:`tt_plugins.trainable_tokens.combine`)."""
    return combining.combine(configs, sites, combination)


@hookimpl
def hotswap(state: TrainableTokensLayer, source: TrainableTokensLayer) -> bool:
    """The source's rows and ids (the id buffers too) into this state's tensors.

    In place for as many ids; another number of ids replaces the tensors (a
    compiled model reads them from its adapter tables, docs/serving.md).
    """
    # Not base_rows: what a merged source keeps to unmerge is its own business.
    state.copy_tensors_from(source, [*TrainableTokensLayer.ID_BUFFERS, "trainable_tokens_rows"], resize=True)
    return True


# ------------------------------------------------------- PEFT's TRAINABLE_TOKENS
# PEFT's TrainableTokensLayer keeps the new rows themselves in trainable_tokens_delta (k x width), as
# trainable_tokens_rows here, and saves them again under every module tied to the embedding. On an
# nn.Linear head it computes F.linear(x, W), without the head's bias.

_ROWS_KEY = "trainable_tokens_delta"


def _refuse_biased_heads(modules: dict[str, nn.Module], names: list[str]) -> None:
    for name in names:
        module = modules[name]
        if isinstance(module, nn.Linear) and module.bias is not None:
            raise ConfigError(
                f"{name} has a bias, which PEFT's trainable tokens leave out of the head's outputs "
                "(F.linear(x, W)) while tt-adapters keeps it: the outputs would differ"
            )


def _check_peft_ties(model: nn.Module, names: list[str]) -> None:
    """PEFT gives the rows to tied modules only for the input embedding of a model tying its embeddings."""
    try:
        embedding = input_embedding_name(model)
    except ValueError:
        embedding = ""
    tied_in_config = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if names[0] != embedding or not tied_in_config or not hasattr(model, "_tied_weights_keys"):
        raise ConfigError(
            f"{names[1:]} share their weight with {names[0]}, but PEFT's trainable tokens reach tied modules "
            "only from the input embedding of a transformers model that ties its embeddings "
            "(tie_word_embeddings); PEFT would leave them unadapted"
        )


@hookimpl
def peft_export(
    model: nn.Module, config: TrainableTokensConfig, sites: list[tuple[list[str], dict[str, torch.Tensor]]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = dict(named_base_modules(model))
    token_indices: list[int] | None = None
    targets: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for names, state in sites:
        ids = config.indices_for(names[0])
        if token_indices is not None and ids != token_indices:
            raise ConfigError(
                f"PEFT's TRAINABLE_TOKENS trains one list of token ids on all its modules, and this adapter "
                f"trains {token_indices} on {targets[0]} but {ids} on {names[0]}; save one adapter per module"
            )
        token_indices = ids
        _refuse_biased_heads(modules, names)
        if len(names) > 1:
            _check_peft_ties(model, names)
        targets.append(names[0])  # PEFT ties the others itself (naming them too breaks its loading)
        for name in names:  # and saves the rows again under each of them
            tensors[f"{name}.{_ROWS_KEY}"] = state["trainable_tokens_rows"].clone()
    peft_config = {
        "peft_type": "TRAINABLE_TOKENS",
        "token_indices": token_indices,
        "target_modules": targets,
        "init_weights": True,
    }
    return peft_config, tensors


def _groups(
    rows: dict[str, torch.Tensor], ids: dict[str, Any], primaries: list[str], model: nn.Module | None
) -> list[list[str]]:
    """The folder's modules grouped by the weight they share, each group's target first.

    With the model, by the weight itself; without it, by equal ids and equal
    rows (PEFT saves a tied module's rows again, bit for bit).
    """
    modules = dict(named_base_modules(model)) if model is not None else {}
    groups: list[list[str]] = []
    for name in primaries + [n for n in rows if n not in primaries]:
        if model is not None and name not in modules:
            raise ConfigError(f"the folder holds token rows for {name}, which this model does not have")
        for group in groups:
            first = group[0]
            if model is not None:
                same = getattr(modules[name], "weight", None) is getattr(modules[first], "weight", None)
            else:
                same = ids[name] == ids[first] and torch.equal(rows[name], rows[first])
            if same:
                if ids[name] != ids[first] or not torch.equal(rows[name], rows[first]):
                    raise ConfigError(
                        f"the folder holds different token rows for {first} and {name}, which share one "
                        "weight"
                    )
                group.append(name)
                break
        else:
            if name not in primaries:
                raise ConfigError(
                    f"the folder holds token rows for {name}, which its target_modules do not name and "
                    "which share no weight with a module they name"
                )
            groups.append([name])
    return groups


@hookimpl
def peft_import(
    peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None
) -> tuple[TrainableTokensConfig, dict[str, torch.Tensor]] | None:
    if peft_config.get("peft_type") != "TRAINABLE_TOKENS":
        return None
    handled = {"token_indices", "target_modules", "init_weights"}
    peft_hooks.check_options(peft_config, handled, "trainable tokens")
    rows = {}
    for key, tensor in tensors.items():
        if not key.endswith("." + _ROWS_KEY):
            raise ConfigError(f"the folder holds {key!r}, which is not trainable-token rows ({_ROWS_KEY})")
        rows[key[: -len(_ROWS_KEY) - 1]] = tensor
    if not rows:
        raise ConfigError("the folder holds no trainable-token rows")
    given = peft_config.get("token_indices")
    ids: dict[str, Any] = {name: given.get(name) if isinstance(given, dict) else given for name in rows}
    for name, tensor in rows.items():
        if not isinstance(ids[name], list) or tensor.dim() != 2 or tensor.shape[0] != len(ids[name]):
            raise ConfigError(
                f"the folder holds rows of shape {tuple(tensor.shape)} for {name}, but token_indices gives "
                f"it {ids[name]!r}"
            )
    target_modules = peft_config.get("target_modules")
    primaries = [n for n in rows if target_modules is None or peft_hooks.matches_targets(target_modules, n)]
    groups = _groups(rows, ids, primaries, model)
    if model is not None:
        modules = dict(named_base_modules(model))
        try:
            embedding = input_embedding_name(model)
        except ValueError:
            embedding = ""
        for group in groups:
            covered = [group[0], *find_tied_modules(model, group[0])]
            _refuse_biased_heads(modules, covered)
            # PEFT ties other modules only to rows on the input embedding; tt's rows reach every module
            # holding the weight.
            beyond = [name for name in covered if name not in group]
            if beyond and embedding not in group:
                raise ConfigError(
                    f"PEFT applies the rows of {group} to those modules only, but {beyond} share their "
                    "weight and tt-adapters' trainable tokens change every module holding it: the outputs "
                    "would differ"
                )
    firsts = [group[0] for group in groups]
    token_indices: Any
    targets: list[str] | None
    if all(ids[first] == ids[firsts[0]] for first in firsts):
        token_indices, targets = ids[firsts[0]], [name for group in groups for name in group]
    else:
        token_indices, targets = {name: ids[name] for group in groups for name in group}, None
    config = TrainableTokensConfig(token_indices=token_indices, target_modules=targets)
    return config, {f"{first}.trainable_tokens_rows": rows[first] for first in firsts}
