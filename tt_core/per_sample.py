"""Per-sample adapters: every sample of a batch runs with its own adapter stack.

``adapter_model(**batch, adapter_names=[...])`` and ``adapter_model.generate(...,
adapter_names=[...])`` take one entry per sample: an adapter name, a list of
names (a stack, applied in order) or :data:`BASE` for the base model. For the
length of the call a :class:`SamplePlan` is set on every
:class:`~tt_core.layer.AdapterLayer` (:func:`serving`); the layer then computes
the base output once for the whole batch and applies each *distinct* stack to
its own samples (:func:`apply_plan`): a loop over stacks, never over samples
or tokens.

How a stack is applied to its samples:

* on a linear head, when every adapter of the stack gives
  :meth:`~tt_core.layer.AdapterState.low_rank_factors` or declares
  :attr:`~tt_core.layer.AdapterState.head_replaces_rows` (trainable tokens,
  LoRA and their stacks): sparsely, in place: the low-rank updates of those
  samples are added with one ``index_add_``, and the touched columns of those
  samples only are written with the rows folded through the stack
  (:meth:`~tt_core.layer.AdapterState.adapt_rows`);
* otherwise (the default, which any method from an outside plugin gets without
  writing anything new): the rows of the stack's samples are taken out of the
  input and the base output, the stack's usual ``embed``/``project`` rules run
  on them as if those samples were the whole batch, and the result is written
  back (``index_copy_``). This costs one copy of those samples' output.

Per-sample calls are for inference: they are refused while the model trains,
while adapters are merged, inside ``disable_adapter()``, and for unknown names
or a list whose length is not the batch size; they run under
``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tt_core.errors import AdapterStateError, ArgumentTypeError, ConfigError

if TYPE_CHECKING:
    from tt_core.layer import AdapterLayer, AdapterState
    from tt_core.model import AdapterModel

#: The entry of ``adapter_names`` that runs a sample on the base model.
BASE = "__base__"

# Tensors a model call is given whose first dimension is the batch, in the order they are looked for.
_BATCH_KEYS = ("input_ids", "inputs_embeds", "decoder_input_ids", "attention_mask")


class SamplePlan:
    """Which stack each sample of one call uses.

    ``stacks`` are the distinct stacks (tuples of adapter names; the base
    model's is the empty tuple); ``sample_stack[i]`` is the position in
    ``stacks`` of sample ``i``'s stack. The index tensors of each stack are
    built once per call and batch size (:meth:`groups`), not once per layer.
    """

    def __init__(self, stacks: list[tuple[str, ...]], sample_stack: list[int]) -> None:
        self.stacks = stacks
        self.sample_stack = torch.tensor(sample_stack, dtype=torch.long)
        self._groups: dict[tuple[int, torch.device], list[tuple[tuple[str, ...], torch.Tensor]]] = {}

    @property
    def batch_size(self) -> int:
        return int(self.sample_stack.shape[0])

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """Each non-empty stack with the batch rows of its samples, on ``device``.

        ``generate`` with ``num_beams`` or ``num_return_sequences`` above 1
        repeats every sample that many times in a row; the rows then follow.
        """
        key = (batch_size, device)
        if key not in self._groups:
            samples = self.batch_size
            if batch_size % samples:
                raise ConfigError(
                    f"adapter_names has {samples} entries, but a layer got a batch of {batch_size}; "
                    "the model must keep the batch as the first dimension of its inputs"
                )
            factor = batch_size // samples
            groups = []
            for position, stack in enumerate(self.stacks):
                if not stack:
                    continue
                samples_of_stack = torch.nonzero(self.sample_stack == position).flatten()
                rows = (samples_of_stack[:, None] * factor + torch.arange(factor)).flatten()
                groups.append((stack, rows.to(device)))
            self._groups[key] = groups
        return self._groups[key]


def make_plan(adapter_model: AdapterModel, adapter_names: object, batch_size: int | None) -> SamplePlan:
    """Check ``adapter_names`` against the model and the batch; nothing is changed here."""
    if adapter_model.model.training:
        raise AdapterStateError(
            "adapter_names= (an adapter stack per sample) is for inference; the model is training. "
            "Call model.eval() first, or train each adapter with set_adapter()"
        )
    if adapter_model.merged_adapters:
        raise AdapterStateError(
            f"adapter_names= cannot run while adapters {adapter_model.merged_adapters} are merged into "
            "the base weights (every sample would get them); call unmerge_adapter() first"
        )
    if adapter_model._disabled:
        raise AdapterStateError("adapter_names= cannot run inside `with disable_adapter():`")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise ArgumentTypeError(
            f"adapter_names must be a list with one entry per sample (a name, a list of names, or "
            f"{BASE!r}), got {adapter_names!r}"
        )
    if batch_size is not None and len(adapter_names) != batch_size:
        raise ConfigError(
            f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} samples; "
            "give one entry per sample"
        )
    if not adapter_names:
        raise ConfigError("adapter_names is empty; give one entry per sample")
    known = set(adapter_model.adapters)
    stacks: list[tuple[str, ...]] = []
    position_of: dict[tuple[str, ...], int] = {}
    sample_stack: list[int] = []
    for sample, entry in enumerate(adapter_names):
        stack = _stack(entry, sample, known)
        if stack not in position_of:
            position_of[stack] = len(stacks)
            stacks.append(stack)
        sample_stack.append(position_of[stack])
    return SamplePlan(stacks, sample_stack)


def _stack(entry: object, sample: int, known: set[str]) -> tuple[str, ...]:
    if entry == BASE:
        return ()
    names = [entry] if isinstance(entry, str) else entry
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ArgumentTypeError(
            f"adapter_names[{sample}] must be an adapter name, a list of names or {BASE!r}, got {entry!r}"
        )
    if BASE in names:
        raise ConfigError(f"adapter_names[{sample}] = {entry!r}: {BASE!r} stands alone, not in a stack")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"adapter_names[{sample}]: unknown adapter(s) {unknown}; the model has {sorted(known)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter_names[{sample}] = {entry!r} names an adapter more than once")
    return tuple(names)


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a model call, read from its first batch-shaped input (None when unknown)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return int(args[0].shape[0])
    for key in _BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


@contextlib.contextmanager
def serving(adapter_model: AdapterModel, adapter_names: object, batch_size: int | None) -> Iterator[None]:
    """Set the plan on every adapter layer for the block; everything is checked before anything changes."""
    plan = make_plan(adapter_model, adapter_names, batch_size)
    layers = [wrapper for _, _, wrapper in adapter_model._wrappers()]
    if any(layer.sample_plan is not None for layer in layers):
        raise AdapterStateError("adapter_names= calls do not nest")
    for layer in layers:
        layer.sample_plan = plan
    try:
        with torch.no_grad():
            yield
    finally:
        for layer in layers:
            layer.sample_plan = None


def call_with_adapter_names(
    adapter_model: AdapterModel, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run ``call`` (forward or generate), per sample when ``adapter_names`` is given (None: active stack)."""
    if "adapter_names" not in kwargs:
        return call(*args, **kwargs)
    kwargs = dict(kwargs)
    adapter_names = kwargs.pop("adapter_names")
    if adapter_names is None:
        return call(*args, **kwargs)
    with serving(adapter_model, adapter_names, batch_size_of(args, kwargs)):
        return call(*args, **kwargs)


# ------------------------------------------------------------------ in the layer
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
        out_rows = layer._project(x_rows, out_rows, states)
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
        ids = torch.cat(touched).unique() if len(touched) > 1 else touched[0]
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
