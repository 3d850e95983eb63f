"""TrainableTokensLayer: new rows for chosen token ids, applied sparsely."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tt_core import AdapterState
from tt_core.layer import embedding_scale

_STD_SAMPLE_ROWS = 4096


class TrainableTokensLayer(AdapterState):
    """Holds the trainable rows of one weight; replaces those rows in the forward.

    ``trainable_tokens_rows[i]`` is the new row of token ``token_indices[i]``.
    Per call the work is O(ids x width) for an embedding and O(tokens x k x
    width) for a tied head: no vocabulary-sized tensor is built.
    """

    additive = False
    token_indices: torch.Tensor
    row_of_token: torch.Tensor
    base_rows: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, token_indices: list[int], init_weights: bool = True) -> None:
        super().__init__()
        device = weight.device
        indices = torch.tensor(token_indices, dtype=torch.long, device=device)
        self.register_buffer("token_indices", indices, persistent=False)
        # Built once: the position of each token id in the rows, or -1.
        row_of_token = torch.full((weight.shape[0],), -1, dtype=torch.long, device=device)
        row_of_token[indices] = torch.arange(len(token_indices), device=device)
        self.register_buffer("row_of_token", row_of_token, persistent=False)
        self.register_buffer("base_rows", None, persistent=False)  # set while merged
        with torch.no_grad():
            if init_weights:
                rows = weight.detach()[indices].float()
            else:
                sample = weight.detach()[:_STD_SAMPLE_ROWS].float()
                rows = torch.randn(len(token_indices), weight.shape[1], device=device) * sample.std()
        self.trainable_tokens_rows = nn.Parameter(rows.contiguous())

    def touched_rows(self) -> torch.Tensor:
        return self.token_indices

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        local = self.row_of_token[input_ids]
        new = F.embedding(local.clamp(min=0), self.trainable_tokens_rows.to(output.dtype))
        scale = embedding_scale(base_layer)
        if scale is not None:
            new = new * (scale.to(output.dtype) if isinstance(scale, torch.Tensor) else scale)
        return torch.where((local >= 0).unsqueeze(-1), new, output)

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        local = self.row_of_token[token_ids]
        new = F.embedding(local.clamp(min=0), self.trainable_tokens_rows.to(rows.dtype))
        return torch.where((local >= 0).unsqueeze(-1), new, rows)

    def project(
        self, hidden: torch.Tensor, output: torch.Tensor, base_layer: nn.Module, earlier: list[AdapterState]
    ) -> torch.Tensor:
        bias: torch.Tensor | None = base_layer.bias  # type: ignore[assignment]
        weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
        bias_columns = None if bias is None else bias[self.token_indices]
        rows = self.trainable_tokens_rows
        if not torch.is_grad_enabled() or not (rows.requires_grad or hidden.requires_grad):
            columns = F.linear(hidden, rows.to(hidden.dtype), bias_columns)
            return output.index_copy_(-1, self.token_indices, columns.to(output.dtype))
        # The rows this adapter overwrites, as the adapters before it left them.
        previous = weight[self.token_indices]
        for state in earlier:
            previous = state.adapt_rows(self.token_indices, previous)
        return _ReplaceColumns.apply(output, hidden, rows, bias_columns, previous, self.token_indices)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """Write the rows into ``weight``, keeping the base rows for :meth:`unmerge_from`."""
        self.base_rows = weight[self.token_indices].clone()
        weight.index_copy_(0, self.token_indices, self.trainable_tokens_rows.to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Put the exact base rows back."""
        assert self.base_rows is not None
        weight.index_copy_(0, self.token_indices, self.base_rows)
        self.base_rows = None

    def extra_repr(self) -> str:
        return f"rows={tuple(self.trainable_tokens_rows.shape)}"


class _ReplaceColumns(torch.autograd.Function):
    """``output[..., idx] = hidden @ rows.T + bias[idx]`` in place, with a sparse backward.

    Zeroing the k replaced columns of the incoming gradient would copy a
    tokens x vocabulary tensor. Instead the gradient passes through whole and
    the hidden-state gradient is corrected by ``g @ (rows - previous)``, where
    ``previous`` are the rows the earlier computation used for those columns;
    their own gradient gets ``-g.T @ hidden`` so earlier adapters see none.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        output: torch.Tensor,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        bias_columns: torch.Tensor | None,
        previous: torch.Tensor,
        token_indices: torch.Tensor,
    ) -> torch.Tensor:
        columns = F.linear(hidden, rows.to(hidden.dtype), bias_columns).to(output.dtype)
        ctx.save_for_backward(hidden, rows, previous, token_indices)
        ctx.mark_dirty(output)
        return output.index_copy_(-1, token_indices, columns)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        hidden, rows, previous, token_indices = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_columns = grad.index_select(-1, token_indices).to(hidden.dtype)
        grad_hidden = grad_columns @ (rows - previous.to(rows.dtype)).to(hidden.dtype)
        flat_grad = grad_columns.reshape(-1, grad_columns.shape[-1])
        grad_rows = (flat_grad.T @ hidden.reshape(-1, hidden.shape[-1])).to(rows.dtype)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        return (
            grad,
            grad_hidden if needs[1] else None,
            grad_rows if needs[2] else None,
            None,
            -grad_rows.to(previous.dtype) if needs[4] else None,
            None,
        )
