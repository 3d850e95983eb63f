"""The adapter-state contract: one adapter's parameters for one base weight, and what it is told."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import nn

from tt_core.api.errors import ConfigError


class AppliedAdapters(list):
    """The ``earlier`` argument of :meth:`AdapterState.project`: the adapters applied so far, in order.

    A plain ``list`` of :class:`AdapterState` for a plugin that only iterates it.
    ``output_writable`` is what the core knows of the ``output`` passed along
    with it: True when no autograd node saved that tensor for its backward and
    it is no view of another tensor, so the adapter may change it in place
    (e.g. ``output.addmm_(...)`` inside an ``autograd.Function`` that marks it
    dirty) instead of copying a tokens x vocabulary tensor. False when an
    adapter that does not promise so (:attr:`AdapterState.keeps_output_writable`)
    came before, or the base module is not a plain ``nn.Linear`` without hooks
    (a forward hook may keep the output it was handed); a plain
    ``list`` passed by a caller means False too (see :func:`output_writable`).
    """

    output_writable: bool = False


def output_writable(earlier: list[Any]) -> bool:
    """Whether ``output``, given to :meth:`AdapterState.project` with ``earlier``, may be changed in place."""
    return bool(getattr(earlier, "output_writable", False))


class AdapterState(nn.Module):
    """One adapter's parameters for one base weight.

    Tied modules (an embedding and the LM head sharing its weight) hold the
    *same* state object, so its parameters exist once. A method plugin
    subclasses this and implements the two forward rules below; each takes the
    output computed so far (the base output, already changed by the adapters
    earlier in the stack) and returns it changed by this adapter, as if the
    weight had been ``adapter(W_so_far)``.

    Two opt-in ways make a stack on an LM head cheaper; a plugin that uses
    neither works as before:

    * :attr:`keeps_output_writable`: the adapter promises that the logits it
      returns may be written in place by the next adapter, and writes in place
      itself only when ``earlier.output_writable`` says so
      (see :class:`AppliedAdapters`).
    * :meth:`low_rank_factors`: an additive adapter whose change of the output
      is ``left @ right`` gives the two factors; consecutive such adapters of
      a stack then share one pass over the tokens x vocabulary output (one
      in-place ``addmm_`` forward, two skinny matmuls backward) and
      :meth:`project` is not called for them.
    * :attr:`head_replaces_rows`: a method that changes only the rows
      :meth:`touched_rows` names. In a stack made only of such adapters and
      of adapters giving :meth:`low_rank_factors`, the core computes the head
      without calling :meth:`project`: one low-rank pass for all additive
      adapters, then one sparse replacement of the union of touched columns by
      those rows folded through the whole stack (:meth:`adapt_rows`), wherever
      in the stack they sit (see :class:`AdapterLayer`).
    * :meth:`low_rank_weight`: an additive adapter's change of the weight as
      two parameter-only factors. Without a gradient, in eval mode, a stack of
      such adapters and row-replacing ones is folded once, embedding and head
      alike, and reused until a weight changes (:mod:`tt_core.tensors.folded`).
    """

    #: True when the adapter adds to the weight (adds commute with each other);
    #: False when it replaces the rows given by :meth:`touched_rows`.
    additive: ClassVar[bool] = False

    #: Opt-in. True promises that :meth:`project` saves neither its ``output``
    #: argument nor the tensor it returns for its backward, returns no view of
    #: another tensor, and changes ``output`` in place only when
    #: ``earlier.output_writable`` is True (otherwise it works on a copy or out
    #: of place). The core then tells the next adapter that the result may be
    #: written in place: always when it is a new tensor, and when it is
    #: ``output`` itself if ``output`` was writable. False (the default): the
    #: next adapter gets ``output_writable=False`` and copies before writing.
    keeps_output_writable: ClassVar[bool] = False

    #: Opt-in. True promises that the adapter changes only the weight rows
    #: :meth:`touched_rows` returns (never ``None``), as :meth:`adapt_rows` says,
    #: so that :meth:`project` is the output with those columns replaced by
    #: ``hidden @ adapt_rows(rows).T + bias[rows]`` and :meth:`embed` the output
    #: with those rows replaced (times the embedding's scale). The core may then compute
    #: those columns itself, together with other adapters' (see the class
    #: docstring), instead of calling :meth:`project`. False (the default):
    #: :meth:`project` is always called.
    head_replaces_rows: ClassVar[bool] = False

    #: Opt-in. True: the state may also adapt transformers' ``Conv1D`` (GPT-2's attention and
    #: MLP layers), a linear layer whose weight is stored transposed, (in_features,
    #: out_features). Its :meth:`project` gets ``output = hidden @ W + bias`` as for any linear
    #: layer, but ``merge_into`` gets that transposed weight, and the core's row-based paths
    #: (:attr:`head_replaces_rows`) do not apply, so such a state must not declare it.
    #: False (the default): the core refuses to put the state on a ``Conv1D``.
    adapts_conv1d: ClassVar[bool] = False

    #: Buffers holding numbers the outputs scale by (LoRA's ``scaling``), kept in a tensor so that a
    #: compiled graph reads them as inputs: they stay float32 when the model is cast to another
    #: dtype (``.to(torch.bfloat16)``), as a Python float would, and only follow it to a device.
    #: Multiply with :func:`scaled`.
    float32_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.merged = False

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterState:
        kept = {name: self._buffers.get(name) for name in self.float32_buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers.get(name)
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)  # the number as it was, where it went
        return self

    def touched_rows(self) -> torch.Tensor | None:
        """The weight rows this adapter changes, or ``None`` for all of them."""
        return None

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """What this adapter makes of the weight rows ``token_ids``, given their current ``rows``.

        Differentiable; used where a later adapter needs the rows it overwrites.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement adapt_rows")

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Embedding rule: ``output`` holds the rows looked up for ``input_ids``."""
        raise NotImplementedError(f"{type(self).__name__} cannot adapt an embedding")

    def project(
        self,
        hidden: torch.Tensor,
        output: torch.Tensor,
        base_layer: nn.Module,
        earlier: list[AdapterState],
    ) -> torch.Tensor:
        """Linear rule: ``output`` holds ``hidden @ W.T + bias`` (logits for an LM head).

        ``earlier`` are the unmerged adapters applied before this one, in order,
        for a method that needs the rows as they were before it (see :meth:`adapt_rows`).
        From the core it is an :class:`AppliedAdapters`, which also says whether
        ``output`` may be written in place; read it with :func:`output_writable`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot adapt a linear layer")

    def low_rank_factors(
        self, hidden: torch.Tensor, output_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Opt-in shared pass for an additive adapter: its change of the output as ``left @ right``.

        ``left`` has shape ``hidden.shape[:-1] + (r,)`` (or flat, ``(tokens, r)``)
        and ``right`` shape ``(r, out_features)``, both in ``output_dtype`` and differentiable in
        the adapter's parameters (scaling folded into either). Only asked of
        an adapter whose ``additive`` is True. The core concatenates the
        factors of consecutive such adapters on one weight and adds them to
        the output with one ``addmm`` (:func:`add_low_rank`), in place when
        the output is writable. ``None`` (the default): the core calls
        :meth:`project` instead.
        """
        return None

    def low_rank_weight(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Opt-in for calls without a gradient: the adapter's change of the weight as ``up @ down``.

        ``up`` has shape ``(out_features, r)`` (the vocabulary for an embedding or
        a tied head), ``down`` shape ``(r, width)``; both may be views of the
        parameters and must depend on nothing but the adapter's parameters and
        buffers. Without a gradient, in eval mode, the core then folds a stack of
        such adapters and row-replacing ones once and reuses the result while
        the weights stay unchanged (:mod:`tt_core.tensors.folded`). ``None`` (the
        default): :meth:`embed` / :meth:`project` are called.
        """
        return None

    def can_fold(self) -> bool:
        """Whether the core may fold this adapter's calls without a gradient: low-rank, or row-replacing."""
        if self.additive:
            return type(self).low_rank_weight is not AdapterState.low_rank_weight
        return self.head_replaces_rows and self.touched_rows() is not None

    def merge_into(self, weight: torch.Tensor) -> None:
        """Fold this adapter into ``weight`` in place, keeping what :meth:`unmerge_from` needs.

        The core's default ``merge`` hook calls this; a plugin may answer the
        hook itself instead.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be merged: implement merge_into")

    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Undo :meth:`merge_into` on ``weight``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged: implement unmerge_from")

    def copy_tensors_from(
        self, source: AdapterState, names: list[str] | None = None, *, resize: bool = False
    ) -> None:
        """Copy every parameter and buffer of ``source`` (or those ``names``) into this state's own, in place.

        The core's default ``hotswap`` hook. The two must hold the same names
        with the same shapes; anything else is a :class:`ConfigError` naming
        the difference, raised before any tensor changes. The tensors keep
        their identity, dtype, device and ``requires_grad``. With ``resize``
        (a method whose shapes may differ: another number of rows, another
        rank) a tensor of another shape is replaced by a copy of the source's
        instead, in this one's dtype, device and ``requires_grad``; a compiled
        model then reads it from the adapter tables, within the capacities of
        ``AdapterModel.prepare_for_compile`` (docs/serving.md).
        """
        mine = self._all_tensors(names)
        theirs = source._all_tensors(names)
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        different = [
            f"{name} {tuple(theirs[name].shape)} (this adapter's: {tuple(tensor.shape)})"
            for name, tensor in mine.items()
            if name in theirs and tensor.shape != theirs[name].shape and not resize
        ]
        if missing or extra or different:
            parts = [
                f"tensors {missing} missing" if missing else "",
                f"tensors {extra} it does not have" if extra else "",
                f"tensors of other shapes: {', '.join(different)}" if different else "",
            ]
            raise ConfigError(
                f"a {type(source).__name__} cannot be hot-swapped into this {type(self).__name__}: "
                f"the source has {'; '.join(part for part in parts if part)}. Hot-swapping replaces tensors "
                "in place, so the shapes must match; load the source as a new adapter (load_adapter) instead"
            )
        with torch.no_grad():
            for name, tensor in mine.items():
                if tensor.shape == theirs[name].shape:
                    tensor.copy_(theirs[name])
                    continue
                owner_name, _, leaf = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                copy = theirs[name].detach().to(dtype=tensor.dtype, device=tensor.device).clone()
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(copy, requires_grad=tensor.requires_grad)
                else:
                    owner._buffers[leaf] = copy

    def _all_tensors(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = dict(self.named_parameters())
        tensors.update(self.named_buffers())
        if names is None:
            return tensors
        return {name: tensors[name] for name in names if name in tensors}

    def commutes_with(self, other: AdapterState) -> bool:
        """Whether applying the two adapters in either order gives the same weight."""
        if self.additive and other.additive:
            return True
        mine, theirs = self.touched_rows(), other.touched_rows()
        if mine is None or theirs is None:
            return False
        return not bool(torch.isin(mine, theirs.to(mine.device)).any())


def scaled(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``tensor * factor`` (a 0-d float32 tensor) in ``tensor``'s dtype, as a Python float would multiply.

    A half-precision tensor is multiplied in float32 and rounded once (on a GPU,
    a 0-d device tensor would otherwise be rounded to half precision first);
    any other is multiplied as it is.
    """
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return (tensor.float() * factor).to(tensor.dtype)
    return tensor * factor


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, weight (in, out)).

    Read from ``sys.modules``: without transformers imported no such module can exist, and
    tt_core does not import transformers for this.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def embedding_scale(base_layer: nn.Module) -> torch.Tensor | float | None:
    """The factor a scaled embedding multiplies its rows by (Gemma's ``embed_scale``)."""
    return getattr(base_layer, "embed_scale", None)
