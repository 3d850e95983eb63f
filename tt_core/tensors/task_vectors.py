"""Task-vector arithmetic for weighted combinations: PEFT's linear, TIES, DARE and magnitude pruning.

A *task vector* is one adapter's change of a weight. The functions take the
sources' changes stacked on dimension 0, ``(adapters, *shape)``, and return
the combined change, ``shape``. ``slice_dims`` says what is trimmed as a
whole: ``None`` the whole tensor (PEFT's way on a LoRA update), ``1`` each
row of a ``(rows, width)`` change on its own (how trainable tokens combine:
a token's row is the unit).

The definitions are PEFT's (``peft.utils.merge_utils``), written here:

- trim (``magnitude_prune``, ``ties``): keep the ``int(density * n)``
  largest magnitudes of each slice of ``n`` entries, zero the rest;
- drop (``dare_*``): keep each entry with probability ``density`` and divide
  the kept ones by ``density``;
- elect: each entry's sign is that of the sum of the sources' values
  (``"total"``) or of the sum of their signs (``"frequency"``), ``+`` on a tie;
- disjoint merge: the weighted values whose sign agrees with the elected
  one, summed and divided by how many agree (at least 1); a zero agrees with
  neither sign, so a source that does not change an entry takes no part.

The random masks come from one ``torch.Generator`` seeded with ``seed``:
one ``torch.bernoulli`` draw over the whole ``shape`` per source, in the
sources' order. The same seed, sources and shapes give the same result.
"""

from __future__ import annotations

import torch

from tt_core.api.combining import Combination


def trim(change: torch.Tensor, density: float, slice_dims: int | None) -> torch.Tensor:
    """``change`` with all but the ``int(density * n)`` largest magnitudes of each slice set to 0."""
    if density >= 1:
        return change
    flat = change.reshape(-1) if slice_dims is None else change.reshape(*change.shape[:slice_dims], -1)
    keep = int(density * flat.shape[-1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, flat.abs().topk(keep, dim=-1).indices, True)
    return (flat * mask).reshape(change.shape)


def drop(change: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """``change`` with each entry kept with probability ``density`` and rescaled by ``1 / density``."""
    if density >= 1:
        return change
    keep = torch.bernoulli(torch.full_like(change, density), generator=generator)
    return change * keep / density


def elect_and_merge(changes: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election and disjoint merge over dimension 0 (the sources)."""
    signs = changes.sign()
    votes = changes.sum(0) if method == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(changes.dtype)
    agree = signs == elected
    weighted = changes * weights.reshape(-1, *[1] * (changes.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(changes: torch.Tensor, combination: Combination, slice_dims: int | None) -> torch.Tensor:
    """The combined change of ``changes`` (sources stacked on dimension 0) for a task-vector type.

    The type is the combination's with any ``_svd`` suffix removed: ``linear``
    (or ``svd``), ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``.
    """
    kind = combination.combination_type.removesuffix("_svd")
    weights = torch.tensor(combination.weights, dtype=changes.dtype, device=changes.device)
    density = combination.density if combination.density is not None else 1.0
    if kind in ("linear", "svd"):
        pruned = changes
    elif kind in ("magnitude_prune", "ties"):
        pruned = torch.stack([trim(change, density, slice_dims) for change in changes])
    elif kind in ("dare_linear", "dare_ties"):
        generator = torch.Generator(device=changes.device)
        generator.manual_seed(int(combination.seed or 0))
        pruned = torch.stack([drop(change, density, generator) for change in changes])
    else:
        raise ValueError(f"{combination.combination_type!r} is not a task-vector combination")
    if kind in ("ties", "dare_ties"):
        return elect_and_merge(pruned, weights, combination.majority_sign_method)
    return (pruned * weights.reshape(-1, *[1] * (pruned.dim() - 1))).sum(0)
