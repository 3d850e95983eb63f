"""RowScaleLayer: the trainable factors of one weight, applied to the looked-up rows only."""

from __future__ import annotations

import torch
from torch import nn

from tt_core import AdapterState, AdapterStateError
from tt_core.layer import output_writable


class RowScaleLayer(AdapterState):
    """Scales row ``token_indices[j]`` of one weight by ``row_scale[j]``.

    The state is two k-sized tensors, whatever the vocabulary: the sorted ids
    and their factors. A looked-up id is found among them by binary search.
    """

    additive = False  # it multiplies rows, so it does not commute with adapters changing them
    token_indices: torch.Tensor
    base_rows: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, token_indices: list[int], init_weights: bool = True) -> None:
        super().__init__()
        device = weight.device
        ids = torch.tensor(sorted(token_indices), dtype=torch.long, device=device)
        self.register_buffer("token_indices", ids, persistent=False)  # rebuilt from the config on load
        self.register_buffer("base_rows", None, persistent=False)  # the exact rows, while merged
        scale = torch.ones(len(ids), device=device)
        if not init_weights:
            scale.uniform_(0.5, 1.5)
        self.row_scale = nn.Parameter(scale)  # the only tensor saved

    def touched_rows(self) -> torch.Tensor:
        return self.token_indices

    def scale_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The factor of each id in ``token_ids``: its ``row_scale``, or 1 for ids not scaled."""
        slot = torch.searchsorted(self.token_indices, token_ids).clamp(max=len(self.token_indices) - 1)
        scaled = self.token_indices[slot] == token_ids
        return torch.where(scaled, self.row_scale[slot], 1.0)

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        # `output` holds the rows as the earlier adapters left them; scaling them is the whole rule.
        return output * self.scale_of(input_ids).unsqueeze(-1).to(output.dtype)

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.scale_of(token_ids).unsqueeze(-1).to(rows.dtype)

    def project(
        self, hidden: torch.Tensor, output: torch.Tensor, base_layer: nn.Module, earlier: list[AdapterState]
    ) -> torch.Tensor:
        # Column i of `output` is hidden @ W_i + b_i, with W_i as the earlier adapters left it.
        # Scaling the row W_i scales that column less its bias: s * (column - b_i) + b_i.
        columns = output.index_select(-1, self.token_indices)
        scale = self.row_scale.to(output.dtype)
        bias = getattr(base_layer, "bias", None)
        if bias is None:
            new = columns * scale
        else:
            bias_columns = bias[self.token_indices].to(output.dtype)
            new = (columns - bias_columns) * scale + bias_columns
        if output_writable(earlier):  # nothing else holds `output`: write the k columns in place
            return output.index_copy_(-1, self.token_indices, new)
        return output.index_copy(-1, self.token_indices, new)  # a forward hook may hold it

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """Scale the rows of ``weight`` in place, keeping the exact base rows for unmerging."""
        self.base_rows = weight[self.token_indices].clone()
        scaled = self.base_rows * self.row_scale.to(weight.dtype).unsqueeze(-1)
        weight.index_copy_(0, self.token_indices, scaled)

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Put the exact base rows back."""
        if self.base_rows is None:  # an explicit check: `python -O` strips asserts
            raise AdapterStateError("unmerge_from without merge_into: this row scaling is not merged")
        weight.index_copy_(0, self.token_indices, self.base_rows)
        self.base_rows = None

    def extra_repr(self) -> str:
        return f"rows={len(self.token_indices)}"
