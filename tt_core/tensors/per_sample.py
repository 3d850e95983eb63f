"""A stack per sample, inside the wrapper: the plan of one call, and applying it to one layer's output.

:mod:`tt_core.serving` checks a call's ``adapter_names`` and sets a
:class:`SamplePlan` on every wrapper for the call; the wrapper's forward
then applies every sample's stack through its adapter bank
(:mod:`tt_core.tensors.bank`, a fixed number of ops whatever the stacks) with
the plan's :meth:`SamplePlan.entries`. Only where a stack holds a state that
cannot fold (a method from an outside plugin without the opt-ins) does it call
:func:`apply_plan`, which applies each distinct stack to its own samples' rows:
a loop over stacks, never over samples or tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tt_core.api.errors import ConfigError

if TYPE_CHECKING:
    from tt_core.tensors.state import AdapterState
    from tt_core.tensors.wrapper import AdapterLayer


class SamplePlan:
    """Which stack each sample of one call uses.

    ``stacks`` are the distinct stacks (tuples of adapter names; the base
    model's is the empty tuple); ``sample_stack[i]`` is the position in
    ``stacks`` of sample ``i``'s stack. ``names`` are the model's adapters:
    :meth:`entries` numbers them from 1 (0: none), as an adapter bank
    (:mod:`tt_core.tensors.bank`) reads them. The index tensors are built once
    per call and batch size (:meth:`groups`, :meth:`entries`), not once per layer.
    """

    def __init__(
        self,
        stacks: list[tuple[str, ...]],
        sample_stack: list[int],
        names: Sequence[str] = (),
        depth: int | None = None,
    ) -> None:
        self.stacks = stacks
        self.sample_stack = torch.tensor(sample_stack, dtype=torch.long)
        self.names = tuple(names)
        #: Every adapter some sample uses; None: not known without reading a device tensor.
        self.used: frozenset[str] | None = frozenset(name for stack in stacks for name in stack)
        self._groups: dict[tuple[int, torch.device], list[tuple[tuple[str, ...], torch.Tensor]]] = {}
        self._entries: dict[tuple[int, torch.device], torch.Tensor] = {}
        entry_of = {name: entry for entry, name in enumerate(self.names, start=1)}
        depth = max([depth or 1, *(len(stack) for stack in stacks)])
        rows = [[entry_of.get(name, 0) for name in stack] for stack in stacks]
        table = torch.tensor([row + [0] * (depth - len(row)) for row in rows], dtype=torch.long)
        self._host_entries = table[self.sample_stack]

    @property
    def batch_size(self) -> int:
        return int(self.sample_stack.shape[0])

    def _factor(self, batch_size: int) -> int:
        samples = self.batch_size
        if batch_size % samples:
            raise ConfigError(
                f"adapter_names has {samples} entries, but a layer got a batch of {batch_size}; "
                "the model must keep the batch as the first dimension of its inputs"
            )
        return batch_size // samples

    def entries(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Each batch row's stack as adapter entries, ``(batch_size, depth)`` long, on ``device``.

        Built on the host once per call; on CUDA copied from pinned memory
        without waiting. Rows repeat as in :meth:`groups`.
        """
        key = (batch_size, device)
        if key not in self._entries:
            factor = self._factor(batch_size)
            host = self._host_entries
            if factor > 1:
                host = host.unsqueeze(1).expand(-1, factor, -1).reshape(batch_size, -1)
            if device.type == "cuda":
                host = host.pin_memory()
            self._entries[key] = host.to(device, non_blocking=True)
        return self._entries[key]

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """Each non-empty stack with the batch rows of its samples, on ``device``.

        ``generate`` with ``num_beams`` or ``num_return_sequences`` above 1
        repeats every sample that many times in a row; the rows then follow.
        """
        key = (batch_size, device)
        if key not in self._groups:
            factor = self._factor(batch_size)
            groups = []
            for position, stack in enumerate(self.stacks):
                if not stack:
                    continue
                samples_of_stack = torch.nonzero(self.sample_stack == position).flatten()
                rows = (samples_of_stack[:, None] * factor + torch.arange(factor)).flatten()
                groups.append((stack, rows.to(device)))
            self._groups[key] = groups
        return self._groups[key]


class SampleEntries:
    """A per-sample call given as a tensor of adapter entries (``AdapterModel.adapter_entries``).

    ``tensor`` is ``(samples, depth)`` long: entry ``i + 1`` is ``names[i]``,
    0 none. Nothing reads its values on the host, so a compiled model takes a
    new assignment of adapters to samples without recompiling; only adapter
    banks (:mod:`tt_core.tensors.bank`) can apply it.
    """

    used: frozenset[str] | None = None

    def __init__(self, tensor: torch.Tensor, names: Sequence[str]) -> None:
        self.tensor = tensor
        self.names = tuple(names)

    def entries(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The entries for a layer's batch of ``batch_size`` rows (samples repeated in a row)."""
        samples = self.tensor.shape[0]
        if batch_size % samples:
            raise ConfigError(
                f"adapter_names has {samples} rows, but a layer got a batch of {batch_size}; "
                "the model must keep the batch as the first dimension of its inputs"
            )
        tensor = self.tensor.to(device)
        factor = batch_size // samples
        if factor > 1:
            tensor = tensor.unsqueeze(1).expand(samples, factor, tensor.shape[1]).reshape(batch_size, -1)
        return tensor


def apply_plan(layer: AdapterLayer, plan: SamplePlan, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``output`` (the base output for the whole batch) with each sample's stack applied to its rows."""
    if x.dim() == 0 or output.dim() == 0:
        raise ConfigError(
            "adapter_names= needs the batch as the first dimension of every adapted module's input"
        )
    for stack, rows in plan.groups(int(x.shape[0]), output.device):
        states: list[AdapterState] = [layer.adapters[name] for name in stack if name in layer.adapters]  # type: ignore[misc]
        if not states:
            continue
        if not layer.is_embedding and _apply_head_sparse(layer, states, x, output, rows):
            continue
        output = _apply_default(layer, states, x, output, rows)
    return output


def _apply_default(
    layer: AdapterLayer, states: list[AdapterState], x: torch.Tensor, output: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """The stack's own rules on its samples' rows, written back: needs nothing from the method."""
    x_rows = x.index_select(0, rows)
    out_rows = output.index_select(0, rows)
    if layer.is_embedding:
        for state in states:
            out_rows = state.embed(x_rows, out_rows, layer.base_layer)
    else:
        out_rows = layer.project_stack(x_rows, out_rows, states)
    return output.index_copy_(0, rows, out_rows.to(output.dtype))


def _apply_head_sparse(
    layer: AdapterLayer,
    states: list[AdapterState],
    hidden: torch.Tensor,
    output: torch.Tensor,
    rows: torch.Tensor,
) -> bool:
    """A stack of low-rank and row-replacing adapters on a head, on its samples only, in place.

    Returns False (nothing written) when the stack is not made only of such adapters.
    """
    if output.dim() < 2 or not output.is_contiguous():
        return False
    touched: list[torch.Tensor] = []
    for state in states:
        if state.additive:
            continue
        touched_rows = state.touched_rows() if state.head_replaces_rows else None
        if touched_rows is None:
            return False
        touched.append(touched_rows)
    hidden_rows = hidden.index_select(0, rows)
    factors = [state.low_rank_factors(hidden_rows, output.dtype) for state in states if state.additive]
    pairs = [pair for pair in factors if pair is not None]
    if len(pairs) != len(factors):
        return False
    vocab = output.shape[-1]
    if pairs:
        left = torch.cat([left for left, _ in pairs], dim=-1)
        right = torch.cat([right for _, right in pairs], dim=0)
        delta = left.reshape(-1, left.shape[-1]) @ right
        output.index_add_(0, rows, delta.view(*hidden_rows.shape[:-1], vocab))
    if touched:
        # Ids two adapters replace repeat, with equal columns: no unique(), whose size the host must read.
        ids = torch.cat(touched) if len(touched) > 1 else touched[0]
        base: nn.Linear = layer.base_layer  # type: ignore[assignment]
        new_rows = base.weight[ids]
        for state in states:
            new_rows = state.adapt_rows(ids, new_rows)
        bias = None if base.bias is None else base.bias[ids]
        columns = F.linear(hidden_rows, new_rows.to(hidden_rows.dtype), bias).to(output.dtype)
        flat = output.view(output.shape[0], -1, vocab)
        middle = flat.shape[1]
        flat.index_put_(
            (
                rows.view(-1, 1, 1),
                torch.arange(middle, device=output.device).view(1, -1, 1),
                ids.view(1, 1, -1),
            ),
            columns.reshape(rows.shape[0], middle, -1),
        )
    return True
