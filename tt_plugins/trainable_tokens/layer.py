"""TrainableTokensLayer: new rows for chosen token ids, applied sparsely."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tt_core import AdapterState
from tt_core.api.errors import AdapterStateError
from tt_core.tensors.distributed import held_rows, is_dtensor
from tt_core.tensors.kernels import replace_columns
from tt_core.tensors.state import embedding_scale, output_writable

_STD_SAMPLE_ROWS = 4096


class TrainableTokensLayer(AdapterState):
    """Holds the trainable rows of one weight; replaces those rows in the forward.

    ``trainable_tokens_rows[i]`` is the new row of token ``token_indices[i]``.
    Per call the work is O(ids x width) for an embedding and O(tokens x k x
    width) for a tied head: no vocabulary-sized tensor is built.
    """

    additive = False
    # The columns are written in place only when the core says the logits may be (else into a copy),
    # and nothing saves them; the head rule is "replace the touched columns", so the core may fold it.
    keeps_output_writable = True
    head_replaces_rows = True
    #: The buffers the ids make (the ids, sorted, and the row of each), as a hot-swap copies them.
    ID_BUFFERS: ClassVar[tuple[str, ...]] = ("token_indices", "sorted_token_indices", "sorted_row_of_token")
    token_indices: torch.Tensor
    sorted_token_indices: torch.Tensor
    sorted_row_of_token: torch.Tensor
    base_rows: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, token_indices: list[int], init_weights: bool = True) -> None:
        super().__init__()
        device = weight.device
        indices = torch.tensor(token_indices, dtype=torch.long, device=device)
        self.register_buffer("token_indices", indices, persistent=False)
        # k-sized, never vocabulary-sized: the token ids sorted, and the row of each; an id is
        # looked up with searchsorted (see row_of), so many adapters cost their rows only.
        sorted_ids, row_of_sorted = torch.sort(indices)
        self.register_buffer("sorted_token_indices", sorted_ids, persistent=False)
        self.register_buffer("sorted_row_of_token", row_of_sorted, persistent=False)
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

    def row_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The position of each of ``token_ids`` in the rows, or -1: no host sync, no loop."""
        sorted_ids = self.sorted_token_indices
        if sorted_ids.numel() == 0:
            return torch.full_like(token_ids, -1)
        token_ids = token_ids.to(sorted_ids.dtype)
        position = torch.searchsorted(sorted_ids, token_ids).clamp_(max=sorted_ids.numel() - 1)
        found = sorted_ids[position] == token_ids
        return torch.where(found, self.sorted_row_of_token[position], -1)

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        local = self.row_of(input_ids)
        new = F.embedding(local.clamp(min=0), self.trainable_tokens_rows.to(output.dtype))
        scale = embedding_scale(base_layer)
        if scale is not None:
            new = new * (scale.to(output.dtype) if isinstance(scale, torch.Tensor) else scale)
        return torch.where((local >= 0).unsqueeze(-1), new, output)

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        local = self.row_of(token_ids)
        new = F.embedding(local.clamp(min=0), self.trainable_tokens_rows.to(rows.dtype))
        return torch.where((local >= 0).unsqueeze(-1), new, rows)

    def project(
        self, hidden: torch.Tensor, output: torch.Tensor, base_layer: nn.Module, earlier: list[AdapterState]
    ) -> torch.Tensor:
        bias: torch.Tensor | None = base_layer.bias  # type: ignore[assignment]
        weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
        bias_columns = None if bias is None else bias[self.token_indices]
        rows = self.trainable_tokens_rows
        previous = None
        if torch.is_grad_enabled():
            # The rows this adapter overwrites, as the adapters before it left them.
            previous = weight[self.token_indices]
            for state in earlier:
                previous = state.adapt_rows(self.token_indices, previous)
        return replace_columns(
            output, hidden, rows, bias_columns, previous, self.token_indices, output_writable(earlier)
        )

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """Write the rows into ``weight``, keeping the base rows for :meth:`unmerge_from`."""
        if self.base_rows is not None:  # a second merge would keep merged rows as the "base" ones
            raise AdapterStateError(
                f"these token rows ({self.token_indices.numel()} ids) are already merged into a weight; "
                "unmerge_from it first. Nothing was changed."
            )
        if is_dtensor(weight) or is_dtensor(self.trainable_tokens_rows):
            self._merge_sharded(weight)
            return
        self.base_rows = weight[self.token_indices].clone()
        weight.index_copy_(0, self.token_indices, self.trainable_tokens_rows.to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Put the exact base rows back."""
        if self.base_rows is None:
            raise AdapterStateError(
                f"these token rows ({self.token_indices.numel()} ids) are not merged into a weight, so "
                "there are no base rows to put back; unmerge_from only undoes merge_into "
                "(AdapterModel.unmerge_adapter() unmerges what merge_adapter() merged)"
            )
        if is_dtensor(weight):
            local, positions, _ = held_rows(weight, self.token_indices)
            local.index_copy_(0, positions, self.base_rows)
        else:
            weight.index_copy_(0, self.token_indices, self.base_rows)
        self.base_rows = None

    def _merge_sharded(self, weight: torch.Tensor) -> None:
        # FSDP2: the weight (and the rows) are DTensors. Each rank writes the rows
        # its shard holds into it; gathering the rows is a collective, so every
        # rank merges, as every rank runs the model.
        rows = self.trainable_tokens_rows
        whole = rows.full_tensor() if is_dtensor(rows) else rows  # type: ignore[attr-defined]
        local, positions, held = held_rows(weight, self.token_indices)
        self.base_rows = local[positions].clone()
        local.index_copy_(0, positions, whole[held].to(local.dtype))

    def extra_repr(self) -> str:
        return f"rows={tuple(self.trainable_tokens_rows.shape)}"
