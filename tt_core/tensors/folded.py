"""A stack's calls without a gradient, folded once and reused while its weights stay as they are.

At inference a stack of low-rank and row-replacing adapters (trainable tokens,
LoRA, in any order) comes down to two things that depend only on weights:

* the right factors of the low-rank adapters, concatenated, so that all of
  them are added to a head's logits in one pass (one ``addmm_``), or to an
  embedding's rows with one small product;
* the rows some adapter replaces, folded through the whole stack
  (``W_eff[ids] = a_n(... a_1(W[ids]))``, :meth:`AdapterState.adapt_rows`),
  written into the output once.

Computing them costs some 30 small operations per call, more than a 1 x 32
call of a 32k x 512 model can absorb, so :class:`FoldedStack` keeps them
between calls. It is used only without a gradient and in eval mode, and is
rebuilt whenever its *stamp* changes: the identity, version counter and
storage of the base weight (and bias, and an embedding's scale) and of every
parameter and buffer of every adapter in the stack. Any in-place write
(optimizer steps, ``load_state_dict``, merges, ``torch.no_grad()`` edits) moves
a version counter; a replaced tensor changes identity or storage; ``train()``
and ``eval()`` drop it. Writes through ``.data`` bypass version counters (as
they bypass autograd's checks of saved tensors): after such a write call
:meth:`tt_core.AdapterModel.clear_inference_cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tt_core.api.errors import AdapterStateError

if TYPE_CHECKING:
    from tt_core.tensors.state import AdapterState


def stamp(base_layer: nn.Module, states: list[AdapterState]) -> tuple[Any, ...] | None:
    """What a folded stack depends on, as comparable numbers; None when it cannot be told.

    The identity, version counter and storage of every parameter and buffer of
    the base module and of each adapter, and the base module's ``embed_scale``
    when it is a number. Inference tensors (made under ``torch.inference_mode``)
    keep no version counter, and a tensor subclass (a DTensor) may hold its
    storage elsewhere: neither is folded. Runs on every call, so it reads the
    modules' dictionaries directly.
    """
    modules: list[nn.Module] = [base_layer]
    parts: list[Any] = [base_layer.__dict__.get("embed_scale")]
    for state in states:
        parts.append(id(state))
        modules.extend(state.modules() if state._modules else (state,))
    try:
        for module in modules:
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is None:
                        continue
                    if (
                        type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter
                    ) or tensor.is_meta:
                        return None
                    parts.append((id(tensor), tensor._version, tensor.data_ptr()))
    except RuntimeError:  # an inference tensor keeps no version counter
        return None
    return tuple(parts)


class FoldedStack:
    """One module's stack, folded for calls without a gradient (see the module docstring).

    Low-rank part (None without low-rank adapters): for a head ``down``
    (width x r) and ``up`` (r x out_features), the logits change by
    ``hidden @ down @ up``; for an embedding ``table`` (vocabulary x r) and
    ``right`` (r x width, times the embedding's scale), row ``i`` changes by
    ``table[i] @ right``. Each is the adapters' factors concatenated in
    stack order. Replaced part (None without row-replacing adapters): ``ids``,
    the rows they replace, concatenated and sorted (an id two adapters replace
    appears twice, with equal rows); ``rows``, those rows of the
    stacked weight (for an embedding times its scale); ``bias``, the head's
    bias at ``ids``. All in the output's dtype.
    """

    def __init__(
        self,
        key: tuple[Any, ...],
        base_layer: nn.Module,
        states: list[AdapterState],
        factors: list[tuple[torch.Tensor, torch.Tensor]],
        dtype: torch.dtype,
    ) -> None:
        self.key = key
        self.dtype = dtype
        embedding = isinstance(base_layer, nn.Embedding)
        scale = getattr(base_layer, "embed_scale", None) if embedding else None
        if isinstance(scale, torch.Tensor):
            scale = scale.to(dtype)
        self.down = self.up = self.table = self.right = None
        self.ids = self.rows = self.bias = None
        with torch.no_grad():
            if factors:
                ups = [up.to(dtype) for up, _ in factors]
                downs = [down.to(dtype) for _, down in factors]
                if embedding:
                    self.table = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
                    right = downs[0] if len(downs) == 1 else torch.cat(downs, dim=0)
                    self.right = right if scale is None else right * scale
                else:
                    self.down = torch.cat(downs, dim=0).T.contiguous()
                    self.up = ups[0].T if len(ups) == 1 else torch.cat([up.T for up in ups], dim=0)
            touched = [
                ids for state in states if not state.additive and (ids := state.touched_rows()) is not None
            ]
            if touched:
                # Sorted for the embedding's searchsorted; an id two adapters replace stays twice, with
                # equal rows (no ``unique``: no host sync, nothing sized by the values).
                ids = torch.sort(torch.cat(touched)).values
                weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
                rows = weight[ids]
                for state in states:
                    rows = state.adapt_rows(ids, rows)
                rows = rows.to(dtype)
                self.ids, self.rows = ids, rows if scale is None else rows * scale
                layer_bias = getattr(base_layer, "bias", None)
                self.bias = None if layer_bias is None else layer_bias[ids].to(dtype)

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, writable: bool) -> torch.Tensor:
        """An embedding's output: ``output`` (the base rows) plus the low-rank change, then the replaced rows.

        ``writable``: whether ``output`` may be changed in place.
        """
        if self.table is not None and self.right is not None:
            change = F.embedding(input_ids.reshape(-1), self.table)
            if writable and output.is_contiguous():
                output.view(-1, output.shape[-1]).addmm_(change, self.right)
            else:
                output = output + (change @ self.right).view(output.shape)
        if self.ids is not None and self.rows is not None:
            ids = self.ids
            input_ids = input_ids.to(ids.dtype)
            position = torch.searchsorted(ids, input_ids).clamp_(max=ids.numel() - 1)
            hit = ids[position] == input_ids
            output = torch.where(hit.unsqueeze(-1), F.embedding(position, self.rows), output)
        return output

    def project(self, hidden: torch.Tensor, output: torch.Tensor, writable: bool) -> torch.Tensor:
        """A head's logits: the base ones ``output``, every low-rank change in one pass, the new columns.

        ``writable``: whether ``output`` may be changed in place; else (a forward
        hook may hold it) the first pass writes a new tensor.
        """
        fresh = writable and output.is_contiguous()
        if self.down is not None and self.up is not None:
            left = hidden.reshape(-1, hidden.shape[-1]).to(self.down.dtype) @ self.down
            flat = output.reshape(-1, output.shape[-1])
            if fresh:
                flat.addmm_(left, self.up)
            else:
                output = torch.addmm(flat, left, self.up).view(output.shape)
                fresh = True
        if self.ids is not None and self.rows is not None:
            columns = F.linear(hidden, self.rows.to(hidden.dtype), self.bias).to(output.dtype)
            if fresh:
                output.index_copy_(-1, self.ids, columns)
            else:
                output = output.index_copy(-1, self.ids, columns)
        return output

    def project_fused(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """A plain linear head's logits with the base product accumulated into the low-rank change.

        ``left @ up (+ bias)`` is made first; the base ``hidden @ weight.T`` is
        then added by the same ``addmm_`` that would have made the logits, so
        the logits are written once instead of written and then read and
        written again. The replaced columns follow.
        """
        if self.down is None or self.up is None:
            raise AdapterStateError(
                "project_fused adds the base product into the low-rank change, and this folded stack has no "
                "low-rank adapter; call project() instead"
            )
        flat = hidden.reshape(-1, hidden.shape[-1])
        # The small products first, while their inputs are still in cache; the large one last.
        columns = None if self.rows is None else F.linear(flat, self.rows, self.bias)
        left = flat @ self.down
        output = torch.mm(left, self.up) if bias is None else torch.addmm(bias.to(self.dtype), left, self.up)
        output.addmm_(flat, weight.T)
        if columns is not None and self.ids is not None:
            output.index_copy_(-1, self.ids, columns)
        return output.view(*hidden.shape[:-1], output.shape[-1])
