"""Finding the modules to adapt, and the modules tied to them, shared by all methods."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from tt_core.api.errors import ConfigError
from tt_core.tensors.wrapper import AdapterLayer


def _unwrapped(module: nn.Module) -> nn.Module:
    # A module already wrapped by tt_core stands for its base module.
    return module.base_layer if isinstance(module, AdapterLayer) else module


def named_base_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Every module of ``model`` by full name, seeing through tt_core wrappers."""
    inside_wrapper: tuple[str, ...] = ()
    # remove_duplicate=False: after resize_token_embeddings, T5's encoder and decoder hold the very
    # module `shared` is; each name must be seen, or only one of them would be adapted.
    for name, module in model.named_modules(remove_duplicate=False):
        if name.startswith(inside_wrapper):
            continue
        if isinstance(module, AdapterLayer):
            inside_wrapper += (name + ".",)
        yield name, _unwrapped(module)


def embedding_like(model: nn.Module) -> list[str]:
    """Names of the modules that look tokens up: every ``nn.Embedding``."""
    return [name for name, module in named_base_modules(model) if isinstance(module, nn.Embedding)]


def input_embedding_name(model: nn.Module) -> str:
    """The full name of the module ``model.get_input_embeddings()`` returns."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        raise ConfigError(
            f"{type(model).__name__} has no get_input_embeddings(); name the module to adapt "
            f"with target_modules=[...]. Embedding modules here: {embedding_like(model)}"
        )
    embedding = _unwrapped(embedding)
    for name, module in named_base_modules(model):
        if module is embedding:
            return name
    raise ConfigError("get_input_embeddings() returned a module that is not part of the model")


def resolve_targets(model: nn.Module, target_modules: Iterable[str] | str | None) -> list[str]:
    """Full names of the modules to adapt.

    ``None`` means the input embedding. A string is a regular expression that
    must match a module's full name (as in PEFT); a name in a list matches a
    module whose full name equals it or ends with ``"." + name``.
    """
    if target_modules is None:
        return [input_embedding_name(model)]
    names = [name for name, _ in named_base_modules(model) if name]
    if isinstance(target_modules, str):
        found = [name for name in names if re.fullmatch(target_modules, name)]
        if not found:
            raise ConfigError(
                f"target_modules={target_modules!r} (a regular expression, matched against full module "
                f"names) matches no module of {type(model).__name__}. Embedding modules here: "
                f"{embedding_like(model)}"
            )
        return found
    found = []
    for wanted in target_modules:
        matches = [name for name in names if name == wanted or name.endswith("." + wanted)]
        if not matches:
            raise ConfigError(
                f"target module {wanted!r} does not exist in {type(model).__name__}. "
                f"Embedding modules here: {embedding_like(model)}; "
                "leave target_modules=None to use get_input_embeddings()"
            )
        found.extend(name for name in matches if name not in found)
    return found


def find_tied_modules(model: nn.Module, target_name: str) -> list[str]:
    """Names of the other modules that hold the very same weight Parameter as the target.

    Ties are found by identity, which works for any model whatever its config
    flags say.
    """
    modules = dict(named_base_modules(model))
    weight = getattr(modules[target_name], "weight", None)
    if weight is None:
        return []
    return [
        name
        for name, module in modules.items()
        if name != target_name and getattr(module, "weight", None) is weight
    ]
