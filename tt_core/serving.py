"""Per-sample adapters: every sample of a batch runs with its own adapter stack.

``adapter_model(**batch, adapter_names=[...])`` and ``adapter_model.generate(...,
adapter_names=[...])`` take one entry per sample: an adapter name, a list of
names (a stack, applied in order) or :data:`BASE` for the base model. For the
length of the call a :class:`SamplePlan` is set on every
:class:`~tt_core.tensors.wrapper.AdapterLayer` (:func:`serving`); the layer then computes
the base output once for the whole batch and applies every sample's stack:

* from its adapter bank (:mod:`tt_core.tensors.bank`), when every adapter the
  call names on that layer folds (trainable tokens, LoRA, and any method giving
  :meth:`~tt_core.tensors.state.AdapterState.low_rank_weight` or declaring
  :attr:`~tt_core.tensors.state.AdapterState.head_replaces_rows`): the plan's
  ``(batch, depth)`` tensor of entries picks each sample's adapters, and a
  fixed number of batched ops applies them, however many distinct stacks the
  batch holds;
* otherwise (the default, which any method from an outside plugin gets without
  writing anything new), stack by stack (:func:`apply_plan`): the rows of the
  stack's samples are taken out of the input and the base output, the stack's
  usual ``embed``/``project`` rules run on them as if those samples were the
  whole batch, and the result is written back (``index_copy_``).

``adapter_names`` may also be the tensor :func:`entries_of` returns
(``AdapterModel.adapter_entries``): checked without reading its values, so a
compiled model takes a new assignment without recompiling; every adapter on
each layer must then fold.

Per-sample calls are for inference: they are refused while the model trains,
while adapters are merged, inside ``disable_adapter()``, and for unknown names
or a list whose length is not the batch size; they run under
``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tt_core.api.errors import AdapterStateError, ArgumentTypeError, ConfigError
from tt_core.tensors.per_sample import SampleEntries, SamplePlan
from tt_core.tensors.wrapper import wrappers_in

#: The entry of ``adapter_names`` that runs a sample on the base model.
BASE = "__base__"

# Tensors a model call is given whose first dimension is the batch, in the order they are looked for.
_BATCH_KEYS = ("input_ids", "inputs_embeds", "decoder_input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class Adapters:
    """What a per-sample call checks its ``adapter_names`` against: the model and its adapters now."""

    model: nn.Module
    names: list[str]  # every adapter on the model
    merged: list[str]  # those merged into the base weights
    disabled: bool  # inside ``disable_adapter()``
    depth: int | None = None  # the stack capacity prepare_for_compile() fixed, if any


def make_plan(
    adapters: Adapters, adapter_names: object, batch_size: int | None
) -> SamplePlan | SampleEntries:
    """Check ``adapter_names`` against the adapters and the batch; nothing is changed here.

    A tensor is taken as entries (:func:`entries_of`), checked without reading its values.
    """
    _check_serving(adapters)
    if isinstance(adapter_names, torch.Tensor):
        return _entries_plan(adapters, adapter_names, batch_size)
    return _names_plan(adapters, adapter_names, batch_size)


def _check_serving(adapters: Adapters) -> None:
    if adapters.model.training:
        raise AdapterStateError(
            "adapter_names= (an adapter stack per sample) is for inference; the model is training. "
            "Call model.eval() first, or train each adapter with set_adapter()"
        )
    if adapters.merged:
        raise AdapterStateError(
            f"adapter_names= cannot run while adapters {adapters.merged} are merged into "
            "the base weights (every sample would get them); call unmerge_adapter() first"
        )
    if adapters.disabled:
        raise AdapterStateError("adapter_names= cannot run inside `with disable_adapter():`")


def _entries_plan(adapters: Adapters, entries: torch.Tensor, batch_size: int | None) -> SampleEntries:
    if entries.dim() != 2 or entries.dtype != torch.long:
        raise ArgumentTypeError(
            "adapter_names given as a tensor must be the (batch, depth) long tensor "
            f"adapter_model.adapter_entries(names) returns, got {entries.dtype} of shape "
            f"{tuple(entries.shape)}"
        )
    if batch_size is not None and entries.shape[0] != batch_size:
        raise ConfigError(
            f"adapter_names has {entries.shape[0]} rows for a batch of {batch_size} samples; "
            "give one row per sample"
        )
    return SampleEntries(entries, adapters.names)


def entries_of(adapters: Adapters, adapter_names: object) -> torch.Tensor:
    """``adapter_names`` (names, stacks, :data:`BASE`) as the ``(batch, depth)`` tensor of entries.

    Entry ``i + 1`` is the model's ``i``-th adapter, 0 none; stacks are padded
    with 0 to ``adapters.depth`` (or the longest stack). On the host.
    """
    plan = _names_plan(adapters, adapter_names, None)
    return plan.entries(plan.batch_size, torch.device("cpu"))


def _names_plan(adapters: Adapters, adapter_names: object, batch_size: int | None) -> SamplePlan:
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
    known = set(adapters.names)
    stacks: list[tuple[str, ...]] = []
    position_of: dict[tuple[str, ...], int] = {}
    sample_stack: list[int] = []
    for sample, entry in enumerate(adapter_names):
        stack = _stack(entry, sample, known)
        if stack not in position_of:
            position_of[stack] = len(stacks)
            stacks.append(stack)
        sample_stack.append(position_of[stack])
    return SamplePlan(stacks, sample_stack, adapters.names, adapters.depth)


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
def serving(adapters: Adapters, adapter_names: object, batch_size: int | None) -> Iterator[None]:
    """Set the plan on every adapter layer for the block; everything is checked before anything changes."""
    plan = make_plan(adapters, adapter_names, batch_size)
    layers = [wrapper for _, _, wrapper in wrappers_in(adapters.model)]
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
    adapters: Callable[[], Adapters], call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run ``call`` (forward or generate), per sample when ``adapter_names`` is given (None: active stack).

    ``adapters`` gives the model's adapters as they are now; it is asked only for a per-sample call.
    """
    if "adapter_names" not in kwargs:
        return call(*args, **kwargs)
    kwargs = dict(kwargs)
    adapter_names = kwargs.pop("adapter_names")
    if adapter_names is None:
        return call(*args, **kwargs)
    with serving(adapters(), adapter_names, batch_size_of(args, kwargs)):
        return call(*args, **kwargs)
