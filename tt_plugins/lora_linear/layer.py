"""LoraLinearLayer: PEFT's LoRA update of one linear layer, applied as two skinny products."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tt_core import AdapterState
from tt_core.tensors.kernels import add_low_rank
from tt_core.tensors.state import output_writable, scaled


class LoraLinearLayer(AdapterState):
    """Adds ``scaling * B @ A`` to one linear layer's weight (out_features x in_features).

    ``lora_A`` has shape (r, in_features) and ``lora_B`` (out_features, r),
    float32, PEFT's layout. The output changes by
    ``scaling * dropout(x) @ A.T @ B.T``: two products through rank r, never
    the out x in update. ``fan_in_fan_out`` marks a transformers ``Conv1D``,
    whose weight is stored (in, out): only merging sees that layout.
    """

    additive = True
    # The update is added in place into a writable output, else into a copy; nothing is saved.
    keeps_output_writable = True
    adapts_conv1d = True
    scaling: torch.Tensor
    float32_buffers = ("scaling",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        *,
        dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        fan_in_fan_out: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        # A tensor, not a Python float: a compiled graph reads it as an input, so a hot-swap to another
        # lora_alpha (AdapterModel.hotswap_adapter) changes it in place without a recompile.
        self.register_buffer(
            "scaling", torch.tensor(float(scaling), dtype=torch.float32, device=device), persistent=False
        )
        self.dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device))
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / r)
            else:  # as nn.Linear(in_features, r) starts
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init_lora_weights is False:  # as nn.Linear(r, out_features) starts: the update is not zero
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def touched_rows(self) -> None:
        return None

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A``, (out, in), float32: for merging and checks, never the forward."""
        return scaled(self.lora_B @ self.lora_A, self.scaling)

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # Rows of the weight in (out, in) layout: output features token_ids (a head's tokens).
        delta = scaled(self.lora_B.index_select(0, token_ids) @ self.lora_A, self.scaling)
        return rows + delta.to(rows.dtype)

    def low_rank_factors(
        self, hidden: torch.Tensor, output_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scaling * dropout(hidden) @ A.T, B.T)``: flat, (tokens, r) and (r, out_features)."""
        flat = hidden.reshape(-1, hidden.shape[-1]).to(output_dtype)
        if self.dropout and self.training:
            flat = F.dropout(flat, self.dropout, training=True)
        left = flat @ self.lora_A.T.to(output_dtype)
        left = scaled(left, self.scaling)  # x 1.0 is exact; no branch on a tensor's value
        return left, self.lora_B.T.to(output_dtype)

    def low_rank_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scaling * B, A)``: the update of the (out, in) weight is their product."""
        return scaled(self.lora_B, self.scaling), self.lora_A

    def project(
        self, hidden: torch.Tensor, output: torch.Tensor, base_layer: nn.Module, earlier: list[AdapterState]
    ) -> torch.Tensor:
        # Additive: the update does not depend on what earlier adapters did. The core usually calls
        # low_rank_factors instead, sharing one pass with neighbouring additive adapters.
        left, right = self.low_rank_factors(hidden, output.dtype)
        return add_low_rank(output, [left], [right], output_writable(earlier))

    def _delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        return (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """Add the update to ``weight`` in place (transposed for a Conv1D)."""
        weight.add_(self._delta_for(weight))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Subtract the update again (exact up to floating-point rounding)."""
        weight.sub_(self._delta_for(weight))

    def extra_repr(self) -> str:
        out_features, in_features = self.lora_B.shape[0], self.lora_A.shape[1]
        return (
            f"in={in_features}, out={out_features}, r={self.r}, scaling={float(self.scaling):g}, "
            f"dropout={self.dropout:g}, fan_in_fan_out={self.fan_in_fan_out}"
        )
