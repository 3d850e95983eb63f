"""The autograd kernels adapters share: a low-rank update added in place, logit columns replaced."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tt_core.api.errors import AdapterStateError

# Rows of the output gradient per block in _AddLowRank's CPU backward: a block of
# 32 rows stays in a core's cache between the two products that read it.
_BLOCK_ROWS = 32


class _AddLowRank(torch.autograd.Function):
    """``output += left @ right`` in place (``output`` marked dirty), for a writable output.

    The backward passes the output gradient through unchanged and makes only
    ``grad @ right.T`` (tokens x r) for ``left`` and ``left.T @ grad``
    (r x vocabulary) for ``right``: nothing tokens x vocabulary sized. On the
    CPU it takes both products block of rows by block of rows, so the
    gradient is read from memory once rather than twice.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        output: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(left, right)
        ctx.mark_dirty(output)
        output.view(-1, output.shape[-1]).addmm_(left, right)
        return output

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        left, right = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        flat = grad.reshape(-1, grad.shape[-1])
        if (
            needs[1]
            and needs[2]
            and flat.device.type == "cpu"
            and flat.shape[0] > _BLOCK_ROWS
            and not torch.is_grad_enabled()  # out= is not differentiable (create_graph)
            and flat.dtype == left.dtype == right.dtype
        ):
            blocked_left = flat.new_empty(flat.shape[0], right.shape[0])
            blocked_right = left[:_BLOCK_ROWS].T.mm(flat[:_BLOCK_ROWS])
            torch.mm(flat[:_BLOCK_ROWS], right.T, out=blocked_left[:_BLOCK_ROWS])
            for start in range(_BLOCK_ROWS, flat.shape[0], _BLOCK_ROWS):
                rows = slice(start, start + _BLOCK_ROWS)
                torch.mm(flat[rows], right.T, out=blocked_left[rows])
                blocked_right.addmm_(left[rows].T, flat[rows])
            return grad, blocked_left, blocked_right
        grad_left = flat.mm(right.T) if needs[1] else None
        grad_right = left.T.mm(flat) if needs[2] else None
        return grad, grad_left, grad_right


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
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        columns = F.linear(hidden, rows.to(hidden.dtype), bias_columns).to(output.dtype)
        ctx.save_for_backward(hidden, rows, previous, token_indices, keep)  # type: ignore[arg-type]
        ctx.mark_dirty(output)
        output.index_copy_(-1, token_indices, columns)
        return output  # the very tensor marked dirty: dynamo traces only that form

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        hidden, rows, previous, token_indices, keep = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_hidden = grad_rows = None
        if needs[1] or needs[2] or needs[4]:
            grad_columns = grad.index_select(-1, token_indices).to(hidden.dtype)
            if keep is not None:  # a repeated id's column counts once: its other copies get no gradient
                grad_columns = grad_columns * keep.to(grad_columns.dtype)
            if needs[1]:
                grad_hidden = grad_columns @ (rows - previous.to(rows.dtype)).to(hidden.dtype)
            if needs[2] or needs[4]:
                flat_grad = grad_columns.reshape(-1, grad_columns.shape[-1])
                grad_rows = (flat_grad.T @ hidden.reshape(-1, hidden.shape[-1])).to(rows.dtype)
        return (
            grad,
            grad_hidden,
            grad_rows if needs[2] else None,
            None,
            -grad_rows.to(previous.dtype) if grad_rows is not None and needs[4] else None,
            None,
            None,
        )


def replace_columns(
    output: torch.Tensor,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    bias_columns: torch.Tensor | None,
    previous: torch.Tensor | None,
    token_indices: torch.Tensor,
    writable: bool,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``output`` with columns ``token_indices`` set to ``hidden @ rows.T + bias_columns``, differentiable.

    ``previous``: the rows ``output``'s columns were computed with (only read
    when a gradient is needed). In place when ``writable`` (see
    :class:`AppliedAdapters`), else into a copy; the backward allocates
    nothing tokens x vocabulary sized. ``token_indices`` may repeat an id when
    its repeats carry equal rows (every copy writes the same column); then
    ``keep`` (:func:`first_occurrences`) marks the one copy the gradient goes
    through, so that the column is not counted twice.
    """
    needs_grad = torch.is_grad_enabled() and (
        output.requires_grad
        or hidden.requires_grad
        or rows.requires_grad
        or (previous is not None and previous.requires_grad)
    )
    if not needs_grad:
        columns = F.linear(hidden, rows.to(hidden.dtype), bias_columns).to(output.dtype)
        if not writable:  # something else may hold ``output`` (a forward hook, an earlier adapter)
            return output.index_copy(-1, token_indices, columns)
        return output.index_copy_(-1, token_indices, columns)
    if previous is None:
        raise AdapterStateError("replace_columns needs the previous rows when a gradient is needed")
    if not writable:
        output = output.clone()  # an earlier node may have saved it for its backward
    return _ReplaceColumns.apply(output, hidden, rows, bias_columns, previous, token_indices, keep)


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """A bool mask over the 1-d ``ids``: True at the first occurrence of each id.

    The shape is ``ids``'s, whatever the values, and nothing is read back to the
    host (``unique`` would be both: its size depends on the values), so it
    compiles into a static graph.
    """
    sorted_ids, order = torch.sort(ids, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return torch.empty_like(first).scatter_(0, order, first)


def add_low_rank(
    output: torch.Tensor, lefts: list[torch.Tensor], rights: list[torch.Tensor], writable: bool
) -> torch.Tensor:
    """``output + sum(left_i @ right_i)`` in one pass over ``output``, differentiable.

    ``left_i`` has shape ``output.shape[:-1] + (r_i,)`` or ``(tokens, r_i)``, ``right_i`` shape
    ``(r_i, output.shape[-1])``. With ``writable`` (see :class:`AppliedAdapters`)
    and a contiguous ``output`` the sum is added in place; otherwise into a copy.
    The result is always a writable tensor (no view, saved by no node).
    """
    flat = [left if left.dim() == 2 else left.reshape(-1, left.shape[-1]) for left in lefts]
    left = flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)
    right = rights[0] if len(rights) == 1 else torch.cat(rights, dim=0)
    needs_grad = torch.is_grad_enabled() and (
        output.requires_grad or left.requires_grad or right.requires_grad
    )
    if not needs_grad:
        if writable and output.is_contiguous():
            output.view(-1, output.shape[-1]).addmm_(left, right)
            return output
        # Something else may hold ``output``: one pass into a new tensor, as the in-place one costs.
        return torch.addmm(output.reshape(-1, output.shape[-1]), left, right).view(output.shape)
    if not writable or not output.is_contiguous():
        output = output.clone(memory_format=torch.contiguous_format)
    return _AddLowRank.apply(output, left, right)
