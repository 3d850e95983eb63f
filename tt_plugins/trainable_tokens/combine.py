"""Weighted combinations of trainable-token adapters: a token's row is the unit.

Over the union of the sources' token ids (sorted), each source's *change* of
a row is its row minus the base row, and zero for a row it does not train.
The combined row is the base row plus the combination of the changes, row by
row (:func:`tt_core.tensors.task_vectors.combine` with ``slice_dims=1``):

- ``linear``: ``base + sum_i w_i * change_i``;
- ``magnitude_prune``: the same after keeping each change's ``int(density * width)``
  largest entries of the row;
- ``ties``: that trim, then each entry's sign elected among the sources that
  change it, and the weighted changes agreeing with it averaged;
- ``dare_linear`` / ``dare_ties``: each change's entries kept with probability
  ``density`` and rescaled by ``1 / density`` (reproducible with ``seed``),
  then summed with the weights / elected and averaged as ``ties``.

A row one source trains and the others do not is, under ``linear`` with
weight 1, that source's row (up to the rounding of ``base + (row - base)``).
"""

from __future__ import annotations

import torch

from tt_core.api.combining import Combination, CombineSite
from tt_core.api.errors import ConfigError
from tt_core.tensors import task_vectors
from tt_plugins.trainable_tokens.config import TrainableTokensConfig
from tt_plugins.trainable_tokens.layer import TrainableTokensLayer

SUPPORTED = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def combined_rows(site: CombineSite, combination: Combination) -> tuple[list[int], torch.Tensor]:
    """The union of the sources' token ids on one weight (sorted) and the combined rows, float32."""
    sources: list[TrainableTokensLayer] = []
    for name, state in zip(combination.adapters, site.states, strict=True):
        if not isinstance(state, TrainableTokensLayer):
            raise ConfigError(
                f"adapter {name!r} holds a {type(state).__name__} on {site.modules[0]}, not token rows"
            )
        sources.append(state)
    weight: torch.Tensor = site.base_layer.weight  # type: ignore[assignment]
    ids = sorted(set[int]().union(*(state.token_indices.tolist() for state in sources)))
    union = torch.tensor(ids, dtype=torch.long, device=weight.device)
    base = weight.detach()[union].float()
    changes = base.new_zeros(len(sources), *base.shape)
    for source, state in enumerate(sources):
        positions = torch.searchsorted(union, state.token_indices)
        changes[source, positions] = state.trainable_tokens_rows.detach().float() - base[positions]
    return ids, base + task_vectors.combine(changes, combination, slice_dims=1)


def combine(
    configs: list[TrainableTokensConfig], sites: list[CombineSite], combination: Combination
) -> tuple[TrainableTokensConfig, list[TrainableTokensLayer]]:
    """The ``combine`` hook's answer: a config training the union of the rows, and its states."""
    combination.refuse_unsupported(TrainableTokensConfig.method, SUPPORTED)
    unions, states = [], []
    for site in sites:
        ids, rows = combined_rows(site, combination)
        state = TrainableTokensLayer(site.base_layer.weight, ids, init_weights=True)  # type: ignore[arg-type]
        with torch.no_grad():
            state.trainable_tokens_rows.copy_(rows)
        unions.append(ids)
        states.append(state)
    first = configs[0]
    if isinstance(first.token_indices, list) and all(ids == unions[0] for ids in unions):
        config = TrainableTokensConfig(token_indices=unions[0], target_modules=first.target_modules)
    else:  # one list of ids per weight, keyed by the full name of its target
        config = TrainableTokensConfig(
            token_indices={site.modules[0]: ids for site, ids in zip(sites, unions, strict=True)}
        )
    return config, states
