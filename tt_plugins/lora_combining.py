"""Weighted combinations of LoRA adapters, shared by ``lora_embedding`` and ``lora_linear``.

Both hold an update ``scaling * B @ A`` with ``A`` (r, in) and ``B`` (out, r):
``lora_linear``'s ``lora_A`` / ``lora_B``, and ``lora_embedding``'s
``lora_embedding_A`` (r, vocabulary) / ``lora_embedding_B`` (width, r),
whose ``B @ A`` is the embedding's update transposed. With weights ``w_i``
and each source's scaling ``s_i``, as PEFT defines them:

- ``cat`` (exact): ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` stacked on the rank,
  ``B = [B_1, B_2, ...]``; ``B @ A = sum_i w_i s_i B_i A_i``. Rank: the sum.
- ``linear`` (equal ranks; an approximation): ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``
  and ``B = sum_i sqrt|w_i s_i| B_i``, PEFT's square-root split of each
  weight between the factors. ``B @ A`` has cross terms ``B_i A_j``; it equals
  the weighted sum only for one source.
- ``svd``: ``delta = sum_i w_i s_i B_i A_i``, truncated to rank ``svd_rank``
  (default: the largest source rank): ``B = U_k diag(S_k)``, ``A = Vh_k``,
  entries clamped to the ``svd_clamp`` quantile when given. ``ties_svd``,
  ``dare_linear_svd``, ``dare_ties_svd`` and ``magnitude_prune_svd``
  combine the updates ``s_i B_i A_i`` with those task-vector rules
  (:mod:`tt_core.tensors.task_vectors`, each update trimmed as a whole) first.

The result has ``lora_alpha = r``, so its scaling is 1: the sources' scalings
are in its factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tt_core.api.combining import SVD_TYPES, Combination
from tt_core.api.errors import ConfigError
from tt_core.tensors import task_vectors

SUPPORTED = ("svd", "linear", "cat", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")

Factors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scaling


def check(method: str, ranks: list[int], combination: Combination) -> int:
    """The rank of the result; a type this module does not combine, or unequal ranks for ``linear``, raise."""
    combination.refuse_unsupported(method, SUPPORTED)
    kind = combination.combination_type
    if kind == "linear" and len(set(ranks)) > 1:
        named = zip(combination.adapters, ranks, strict=True)
        pairs = ", ".join(f"{name!r}: r={rank}" for name, rank in named)
        raise ConfigError(
            f"combination_type='linear' adds the factors, so every adapter needs the same rank ({pairs}); "
            "use 'cat' (exact) or 'svd' for adapters of different ranks"
        )
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_TYPES:
        return combination.svd_rank or max(ranks)
    return ranks[0]


def combine_factors(
    sources: Sequence[Factors], combination: Combination, rank: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined ``(A, B)`` of one adapted weight, float32, scaling 1."""
    kind = combination.combination_type
    weights = combination.weights
    if kind == "cat":
        a = torch.cat([w * s * a.detach().float() for (a, _, s), w in zip(sources, weights, strict=True)], 0)
        b = torch.cat([b.detach().float() for _, b, _ in sources], 1)
        return a, b
    if kind == "linear":
        a = sum(
            (
                math.copysign(math.sqrt(abs(w * s)), w * s) * a.detach().float()
                for (a, _, s), w in zip(sources, weights, strict=True)
            ),
            torch.zeros_like(sources[0][0], dtype=torch.float32),
        )
        b = sum(
            (
                math.sqrt(abs(w * s)) * b.detach().float()
                for (_, b, s), w in zip(sources, weights, strict=True)
            ),
            torch.zeros_like(sources[0][1], dtype=torch.float32),
        )
        return a, b
    updates = torch.stack([s * (b.detach().float() @ a.detach().float()) for a, b, s in sources])
    delta = task_vectors.combine(updates, combination, slice_dims=None)
    if rank > min(delta.shape):
        raise ConfigError(
            f"svd_rank={rank} is more than the rank an update of {where} can have ({min(delta.shape)}, "
            f"the smaller of its sides {tuple(delta.shape)}); give svd_rank <= {min(delta.shape)}"
        )
    if combination.svd_driver is not None and delta.device.type != "cuda":
        raise ConfigError(
            f"svd_driver={combination.svd_driver!r} works on CUDA only; {where} is on {delta.device}"
        )
    # The reduced SVD: svd_full_matrices only adds columns the truncation drops (and memory).
    u, singular, vh = torch.linalg.svd(delta, full_matrices=False, driver=combination.svd_driver)
    b, a = u[:, :rank] * singular[:rank], vh[:rank]
    if combination.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), combination.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a.contiguous(), b.contiguous()
