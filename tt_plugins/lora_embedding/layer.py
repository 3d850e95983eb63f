"""LoraEmbeddingLayer: a low-rank update of a whole embedding weight, applied without building it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tt_core import AdapterState
from tt_core.tensors.kernels import add_low_rank
from tt_core.tensors.state import embedding_scale, output_writable, scaled

_STD_SAMPLE_ROWS = 4096


class LoraEmbeddingLayer(AdapterState):
    """Adds ``scaling * (B @ A).T`` to one weight of shape (vocabulary, width).

    ``lora_embedding_A`` has shape (r, vocabulary) and ``lora_embedding_B``
    shape (width, r), both float32. The forward never builds the vocabulary x
    width update: an embedding looks up columns of ``A``, a tied head
    multiplies the hidden states by ``B`` then ``A``.
    """

    additive = True
    # The head update is added in place into a writable output, else into a copy; nothing is saved.
    keeps_output_writable = True
    scaling: torch.Tensor
    float32_buffers = ("scaling",)

    def __init__(self, weight: torch.Tensor, r: int, scaling: float, init_weights: bool = True) -> None:
        super().__init__()
        vocab, width = weight.shape
        device = weight.device
        self.r = r
        # A tensor, not a Python float: a compiled graph reads it as an input, so a hot-swap to another
        # lora_alpha (AdapterModel.hotswap_adapter) changes it in place without a recompile.
        self.register_buffer(
            "scaling", torch.tensor(float(scaling), dtype=torch.float32, device=device), persistent=False
        )
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, vocab, device=device))
        self.lora_embedding_B = nn.Parameter(torch.randn(width, r, device=device))
        if not init_weights:
            # Random, yet the same size as the base rows, so outputs stay in a sensible range.
            with torch.no_grad():
                sample_std = float(weight.detach()[:_STD_SAMPLE_ROWS].float().std()) or 1.0
                self.lora_embedding_A.normal_(std=sample_std / (scaling * math.sqrt(r)))

    def touched_rows(self) -> None:
        return None

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * (B @ A).T`` of shape (vocabulary, width), in float32.

        Builds a vocabulary-sized tensor: for merging and checks, never for the forward.
        """
        return scaled(self.lora_embedding_A.T @ self.lora_embedding_B.T, self.scaling)

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        low_rank = F.embedding(input_ids, self.lora_embedding_A.T)
        delta = scaled(low_rank @ self.lora_embedding_B.T, self.scaling)
        padding_idx = getattr(base_layer, "padding_idx", None)
        if padding_idx is not None and torch.is_grad_enabled() and delta.requires_grad:
            # The base embedding gives its padding row no gradient; neither factor may learn from it.
            delta = torch.where((input_ids == padding_idx).unsqueeze(-1), delta.detach(), delta)
        scale = embedding_scale(base_layer)
        if scale is not None:
            delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
        return output + delta.to(output.dtype)

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        columns = self.lora_embedding_A.index_select(1, token_ids)
        return rows + scaled(columns.T @ self.lora_embedding_B.T, self.scaling).to(rows.dtype)

    def low_rank_factors(
        self, hidden: torch.Tensor, output_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scaling * hidden @ B, A)``: the head's change is their product, tokens x vocabulary.

        ``left`` comes flat, (tokens, r): one matrix product fewer per call.
        """
        left = hidden.reshape(-1, hidden.shape[-1]).to(output_dtype) @ self.lora_embedding_B.to(output_dtype)
        left = scaled(left, self.scaling)  # x 1.0 is exact; no branch on a tensor's value
        return left, self.lora_embedding_A.to(output_dtype)

    def low_rank_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A.T, scaling * B.T)``: the update of the weight is their product, vocabulary x width."""
        return self.lora_embedding_A.T, scaled(self.lora_embedding_B.T, self.scaling)

    def project(
        self, hidden: torch.Tensor, output: torch.Tensor, base_layer: nn.Module, earlier: list[AdapterState]
    ) -> torch.Tensor:
        # An additive update does not depend on what earlier adapters did to the weight. The core
        # calls low_rank_factors instead (one pass shared with neighbouring additive adapters);
        # this is the same pass for one adapter, for a caller of project itself.
        left, right = self.low_rank_factors(hidden, output.dtype)
        return add_low_rank(output, [left], [right], output_writable(earlier))

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """Add the update to ``weight`` in place."""
        weight.add_(self.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Subtract the update again (exact up to floating-point rounding)."""
        weight.sub_(self.delta_weight().to(weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={float(self.scaling):g}, vocab={self.lora_embedding_A.shape[1]}"
