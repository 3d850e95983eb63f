"""Every foldable adapter of one layer in fixed-size tables, so that any stack per sample costs the same ops.

A per-sample call (``adapter_names=``) and a compiled model switching its
active stack both need one layer to apply *some* stack of its adapters, chosen
at run time by a tensor, with a fixed number of operations: no loop over the
adapters, no host reading a device value, no tensor shape that depends on
which adapters were chosen. An :class:`AdapterBank` holds, for every adapter
state of the layer that folds (:meth:`AdapterState.can_fold`):

* a row-replacing adapter (trainable tokens) in a *row slot*: its touched ids
  sorted and padded to ``rows`` with a sentinel no input id equals (the
  vocabulary size), and the new row of each (for an embedding times its
  ``embed_scale``);
* a low-rank adapter (LoRA) in a *rank slot*: ``up`` and ``down`` of
  :meth:`AdapterState.low_rank_weight`, zero-padded to ``rank`` (scaling is
  already in them; an embedding's ``down`` is times its scale).

Slot 0 of each kind is the null adapter (all sentinel, all zero). An *entry*
names one adapter of the model: ``0`` is none, ``i + 1`` the ``i``-th of the
model's adapters (``names``); ``row_slot_of[entry]`` and ``rank_slot_of[entry]``
give its slots on this layer (0 where it is not of that kind or not on this
layer). A stack is ``depth`` entries, padded with 0.

:meth:`AdapterBank.apply` applies a ``(batch, depth)`` tensor of entries to a
layer's base output, in stack order, with a fixed number of batched ops per
depth (see its docstring). It is a snapshot: built and refilled without a
gradient, from the states as they are; :meth:`AdapterBank.fill` writes new
contents into the same tensors when they fit, so a compiled graph keeps
reading the tensors it captured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tt_core.api.errors import ConfigError
from tt_core.tensors.state import AdapterState, embedding_scale, is_conv1d


@dataclasses.dataclass(frozen=True)
class BankCapacity:
    """The sizes of a bank's tables: what it can hold without being rebuilt."""

    rows: int  # ids (and rows) of one row-replacing adapter
    rank: int  # rank of one low-rank adapter
    adapters: int  # adapters of the model the entry maps can name
    row_slots: int  # row-replacing adapters on the layer
    rank_slots: int  # low-rank adapters on the layer
    stack: int  # entries of the active stack (the compiled path)

    def holds(self, other: BankCapacity) -> bool:
        """Whether contents needing ``other`` fit these tables (slots of a kind left empty are fine)."""
        return (
            other.rows <= self.rows
            and other.rank <= self.rank
            and other.adapters <= self.adapters
            and other.row_slots <= self.row_slots
            and other.rank_slots <= self.rank_slots
            and other.stack <= self.stack
        )

    def grown(self, other: BankCapacity) -> BankCapacity:
        """Each size the larger of the two; adapter counts that grow at least double (fewer rebuilds)."""
        sizes = {
            field.name: max(getattr(self, field.name), getattr(other, field.name))
            for field in dataclasses.fields(self)
        }
        for name in ("adapters", "row_slots", "rank_slots"):
            if getattr(other, name) > getattr(self, name):
                sizes[name] = max(sizes[name], 2 * getattr(self, name))
        return BankCapacity(**sizes)

    def exceeded_by(self, other: BankCapacity) -> list[str]:
        """The capacities ``other`` exceeds, as ``name (needed > held)``."""
        return [
            f"{field.name} ({getattr(other, field.name)} > {getattr(self, field.name)})"
            for field in dataclasses.fields(self)
            if getattr(other, field.name) > getattr(self, field.name)
        ]


def bankable(state: nn.Module, base_layer: nn.Module) -> bool:
    """Whether ``state`` can sit in a bank of ``base_layer``: it folds, on a plain enough module."""
    if not isinstance(state, AdapterState) or not state.can_fold():
        return False
    if isinstance(base_layer, nn.Embedding):
        return base_layer.max_norm is None
    if is_conv1d(base_layer):
        return state.additive
    return isinstance(base_layer, nn.Linear)


def needed_capacity(states: Mapping[str, AdapterState], names: Sequence[str], stack: int) -> BankCapacity:
    """What the tables must hold for ``states`` (all bankable), the model's ``names``, ``stack`` deep."""
    rows = rank = row_slots = rank_slots = 0
    for state in states.values():
        if state.additive:
            factors = state.low_rank_weight()
            assert factors is not None  # bankable
            rank = max(rank, int(factors[0].shape[1]))
            rank_slots += 1
        else:
            touched = state.touched_rows()
            assert touched is not None  # bankable
            rows = max(rows, int(touched.numel()))
            row_slots += 1
    return BankCapacity(max(rows, 1), max(rank, 1), len(names), row_slots, rank_slots, max(stack, 1))


class AdapterBank:
    """One layer's foldable adapters in fixed-capacity tables (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, capacity: BankCapacity) -> None:
        weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
        self.capacity = capacity
        self.embedding = isinstance(base_layer, nn.Embedding)
        self.conv1d = is_conv1d(base_layer)
        if self.conv1d:
            width, out = weight.shape
        else:
            out, width = weight.shape
        self.out = int(out)  # the vocabulary of an embedding, the out_features of a linear layer
        self.width = int(width)
        self.dtype = weight.dtype
        self.device = weight.device
        #: The model's adapter names the entry maps were filled for, and the stamp of the weights.
        self.names: tuple[str, ...] = ()
        self.key: object = None
        #: Whether every state of the layer is in the bank (else a stack may name one that is not).
        self.complete = True
        #: Bankable states whose new rows turned out to depend on the rows before them (not held).
        self.excluded: frozenset[str] = frozenset()
        self.sentinel = self.out
        cap = capacity
        self.row_slot_of = torch.zeros(cap.adapters + 1, dtype=torch.long, device=self.device)
        self.rank_slot_of = torch.zeros(cap.adapters + 1, dtype=torch.long, device=self.device)
        #: The active stack's entries, for the compiled path; written in place by set_active.
        self.active = torch.zeros(cap.stack, dtype=torch.long, device=self.device)
        self.has_rows = cap.row_slots > 0
        self.has_rank = cap.rank_slots > 0
        self.ids = torch.full(
            (cap.row_slots + 1, cap.rows), self.sentinel, dtype=torch.long, device=self.device
        )
        self.rows = torch.zeros(cap.row_slots + 1, cap.rows, self.width, dtype=self.dtype, device=self.device)
        #: An id no row-replacing adapter of the layer touches: padded head writes land there.
        self.safe_id = torch.zeros((), dtype=torch.long, device=self.device)
        # Embedding: up (slots, vocabulary, rank), looked up flat; a head: up transposed, (slots, rank, out).
        up_shape = (
            (cap.rank_slots + 1, self.out, cap.rank)
            if self.embedding
            else (cap.rank_slots + 1, cap.rank, self.out)
        )
        self.up = torch.zeros(up_shape if self.has_rank else (1, 1, 1), dtype=self.dtype, device=self.device)
        self.down = torch.zeros(
            (cap.rank_slots + 1, cap.rank, self.width) if self.has_rank else (1, 1, 1),
            dtype=self.dtype,
            device=self.device,
        )

    # ------------------------------------------------------------------ filling
    @torch.no_grad()
    def fill(
        self,
        base_layer: nn.Module,
        states: Mapping[str, AdapterState],
        names: Sequence[str],
        complete: bool,
        key: object,
    ) -> None:
        """Write ``states`` (every bankable state of the layer, by name) into the tables, in place.

        ``names`` are the model's adapters, whose positions (+1) are the entries.
        The caller checked that :func:`needed_capacity` fits :attr:`capacity`.
        """
        weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
        scale = embedding_scale(base_layer) if self.embedding else None
        row_slot_of = [0] * (self.capacity.adapters + 1)
        rank_slot_of = [0] * (self.capacity.adapters + 1)
        self.ids.fill_(self.sentinel)
        self.rows.zero_()
        self.up.zero_()
        self.down.zero_()
        row_slot = rank_slot = 0
        touched_all = []
        excluded: list[str] = []
        for entry, name in enumerate(names, start=1):
            state = states.get(name)
            if state is None:
                continue
            if state.additive:
                rank_slot += 1
                rank_slot_of[entry] = rank_slot
                up, down = state.low_rank_weight()  # type: ignore[misc]
                rank = up.shape[1]
                down = down.to(self.dtype)
                if scale is not None:
                    down = down * (scale.to(self.dtype) if isinstance(scale, torch.Tensor) else scale)
                self.down[rank_slot, :rank].copy_(down)
                if self.embedding:
                    self.up[rank_slot, :, :rank].copy_(up)
                else:
                    self.up[rank_slot, :rank].copy_(up.T)
            else:
                touched: torch.Tensor = state.touched_rows()  # type: ignore[assignment]
                ids = torch.sort(touched.to(self.device, torch.long)).values
                base_rows = weight[ids]
                rows = state.adapt_rows(ids, base_rows)
                if not torch.equal(rows, state.adapt_rows(ids, torch.zeros_like(base_rows))):
                    # Its new rows depend on the rows before it (a scale, an addition): no snapshot
                    # can hold them, so stacks with it take the per-stack path.
                    excluded.append(name)
                    continue
                rows = rows.to(self.dtype)
                if scale is not None:
                    rows = rows * (scale.to(self.dtype) if isinstance(scale, torch.Tensor) else scale)
                row_slot += 1
                row_slot_of[entry] = row_slot
                self.ids[row_slot, : ids.numel()].copy_(ids)
                self.rows[row_slot, : ids.numel()].copy_(rows)
                touched_all.append(ids)
        if touched_all:
            free = torch.ones(self.out, dtype=torch.bool, device=self.device)
            free[torch.cat(touched_all)] = False
            self.safe_id.copy_(free.to(torch.uint8).argmax())
        self.row_slot_of.copy_(torch.tensor(row_slot_of))
        self.rank_slot_of.copy_(torch.tensor(rank_slot_of))
        self.names = tuple(names)
        self.excluded = frozenset(excluded)
        self.complete = complete and not excluded
        self.key = key

    def set_active(self, entries: Sequence[int]) -> None:
        """Write the active stack's entries (at most ``capacity.stack``) into :attr:`active`, in place."""
        if len(entries) > self.capacity.stack:
            raise ConfigError(
                f"a stack of {len(entries)} adapters exceeds the compiled stack capacity max_stack="
                f"{self.capacity.stack}; call prepare_for_compile(max_stack={len(entries)})"
            )
        padded = list(entries) + [0] * (self.capacity.stack - len(entries))
        self.active.copy_(torch.tensor(padded, dtype=torch.long))

    # ----------------------------------------------------------------- applying
    def apply(
        self,
        base_layer: nn.Module,
        x: torch.Tensor,
        output: torch.Tensor,
        entries: torch.Tensor,
        writable: bool = False,
    ) -> torch.Tensor:
        """``output`` (``base_layer``'s output for ``x``) with sample ``b``'s stack ``entries[b]`` applied.

        ``entries`` is ``(batch, depth)`` (the batch of ``x``). The number of
        ops depends on ``depth`` and on which kinds of slots the layer has,
        never on which adapters the entries name. ``writable``: ``output`` may
        be changed in place.
        """
        row_slot = self.row_slot_of[entries]
        rank_slot = self.rank_slot_of[entries]
        if self.embedding:
            return self._embed(x, output, row_slot, rank_slot)
        return self._project(base_layer, x, output, row_slot, rank_slot, writable)

    def _lookup_rows(self, row_slot: torch.Tensor, ids: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """``current`` (rows for ``ids``, ``(batch, n, width)``) with each sample's slot's rows replaced."""
        capacity = self.capacity.rows
        slot_ids = self.ids[row_slot]  # (batch, capacity), sorted
        position = torch.searchsorted(slot_ids, ids).clamp_(max=capacity - 1)
        hit = slot_ids.gather(1, position) == ids
        new = F.embedding(row_slot.unsqueeze(1) * capacity + position, self.rows.view(-1, self.width))
        return torch.where(hit.unsqueeze(-1), new.to(current.dtype), current)

    def _embed(
        self, input_ids: torch.Tensor, output: torch.Tensor, row_slot: torch.Tensor, rank_slot: torch.Tensor
    ) -> torch.Tensor:
        batch = output.shape[0]
        ids = input_ids.reshape(batch, -1).to(torch.long)
        rows = output.reshape(batch, -1, output.shape[-1])
        for depth in range(row_slot.shape[1]):
            if self.has_rank:
                slot = rank_slot[:, depth]
                low = F.embedding(slot.unsqueeze(1) * self.out + ids, self.up.view(-1, self.up.shape[-1]))
                rows = torch.baddbmm(rows, low.to(rows.dtype), self.down[slot].to(rows.dtype))
            if self.has_rows:
                rows = self._lookup_rows(row_slot[:, depth], ids, rows)
        return rows.view(output.shape)

    #: What one multiply-add costs next to moving one element, roughly, for :meth:`_add_low_rank`.
    PRODUCT_PER_ELEMENT: ClassVar[float] = 1 / 16

    def _add_low_rank(
        self, hidden: torch.Tensor, logits: torch.Tensor, rank_slot: torch.Tensor, writable: bool
    ) -> torch.Tensor:
        """``logits`` ``(batch, tokens, out)`` plus every sample's low-rank updates, in one product.

        Each sample's ``hidden @ down.T`` for every depth, side by side, then
        either the ``up`` factors gathered per sample (``batch x depth x rank x
        out`` elements moved, cheap products: many tokens per sample) or, when
        moving those would cost more, that left factor spread over every slot
        and one product with all the ``up`` tables (read once: a decode step of
        a batch over few adapters). Both take the same ops whatever the entries.
        """
        batch, depth = rank_slot.shape
        tokens = logits.shape[1]
        rank = self.capacity.rank
        slots = self.capacity.rank_slots + 1
        dtype = logits.dtype
        downs = self.down[rank_slot].view(batch, depth * rank, self.width).to(dtype)
        left = torch.bmm(hidden.to(dtype), downs.transpose(1, 2))  # (batch, tokens, depth * rank)
        in_place = writable and logits.is_contiguous()
        gathered = batch * depth * (2 + tokens * self.PRODUCT_PER_ELEMENT)
        every_slot = slots * (1 + batch * tokens * self.PRODUCT_PER_ELEMENT)
        if gathered <= every_slot:
            ups = self.up[rank_slot].view(batch, depth * rank, self.out).to(dtype)
            return logits.baddbmm_(left, ups) if in_place else torch.baddbmm(logits, left, ups)
        spread = left.new_zeros(batch, tokens, slots, rank)
        index = rank_slot.view(batch, 1, depth, 1).expand(batch, tokens, depth, rank)
        spread.scatter_add_(2, index, left.view(batch, tokens, depth, rank))
        flat = logits.view(batch * tokens, self.out) if in_place else logits.reshape(batch * tokens, self.out)
        ups = self.up.view(slots * rank, self.out).to(dtype)
        spread_flat = spread.view(batch * tokens, slots * rank)
        if in_place:
            return flat.addmm_(spread_flat, ups).view(logits.shape)
        return torch.addmm(flat, spread_flat, ups).view(logits.shape)

    def _project(
        self,
        base_layer: nn.Module,
        hidden: torch.Tensor,
        output: torch.Tensor,
        row_slot: torch.Tensor,
        rank_slot: torch.Tensor,
        writable: bool,
    ) -> torch.Tensor:
        batch, depth = row_slot.shape
        flat_hidden = hidden.reshape(batch, -1, hidden.shape[-1])
        logits = output.reshape(batch, -1, output.shape[-1])
        dtype = logits.dtype
        if self.has_rank:
            logits = self._add_low_rank(flat_hidden, logits, rank_slot, writable)
            writable = True
        if not self.has_rows:
            return logits.view(output.shape)
        # Each sample's touched ids, once each: later copies of an id become the sentinel.
        capacity = self.capacity.rows
        ids = self.ids[row_slot].view(batch, depth * capacity)
        if depth > 1:  # one slot's ids are distinct already
            ids = torch.sort(ids, dim=1).values
            repeated = ids[:, 1:] == ids[:, :-1]
            ids = torch.cat([ids[:, :1], ids[:, 1:].masked_fill(repeated, self.sentinel)], dim=1)
        real = ids != self.sentinel
        # Arithmetic, not torch.where: inductor's AVX2 code for that int64 select let the sentinel through
        # (index out of bounds) where its AVX-512 and scalar code did not; tox -e other-cpu runs AVX2.
        ids = ids + (self.safe_id - ids) * (~real).to(ids.dtype)
        # Those rows of W_eff = a_n(... a_1(W)): each depth in stack order.
        weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
        bias: torch.Tensor | None = base_layer.bias  # type: ignore[assignment]
        rows = F.embedding(ids, weight)
        for level in range(depth):
            if self.has_rank:
                slot = rank_slot[:, level]
                up_rows = self.up[slot.unsqueeze(1), :, ids]  # (batch, n, rank)
                rows = torch.baddbmm(rows, up_rows.to(rows.dtype), self.down[slot].to(rows.dtype))
            rows = self._lookup_rows(row_slot[:, level], ids, rows)
        columns = torch.bmm(flat_hidden, rows.to(flat_hidden.dtype).transpose(1, 2))
        if bias is not None:
            columns = columns + bias[ids].to(columns.dtype).unsqueeze(1)
        index = ids.unsqueeze(1).expand(batch, logits.shape[1], ids.shape[1])
        # Padded places write back what is there, so that every write to the safe id is the same value.
        columns = torch.where(real.unsqueeze(1), columns.to(dtype), logits.gather(2, index))
        if writable and logits.is_contiguous():
            logits = logits.scatter_(2, index, columns)
        else:
            logits = logits.scatter(2, index, columns)
        return logits.view(output.shape)
