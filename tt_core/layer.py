"""The wrapper put around one base module, and the adapter state it stacks."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from tt_core.errors import AdapterStateError, ConfigError
from tt_core.folded import FoldedStack, stamp


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
      alike, and reused until a weight changes (:mod:`tt_core.folded`).
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

    def __init__(self) -> None:
        super().__init__()
        self.merged = False

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
        the weights stay unchanged (:mod:`tt_core.folded`). ``None`` (the
        default): :meth:`embed` / :meth:`project` are called.
        """
        return None

    def _can_fold(self) -> bool:
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

    def commutes_with(self, other: AdapterState) -> bool:
        """Whether applying the two adapters in either order gives the same weight."""
        if self.additive and other.additive:
            return True
        mine, theirs = self.touched_rows(), other.touched_rows()
        if mine is None or theirs is None:
            return False
        return not bool(torch.isin(mine, theirs.to(mine.device)).any())


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
    ) -> torch.Tensor:
        columns = F.linear(hidden, rows.to(hidden.dtype), bias_columns).to(output.dtype)
        ctx.save_for_backward(hidden, rows, previous, token_indices)
        ctx.mark_dirty(output)
        return output.index_copy_(-1, token_indices, columns)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        hidden, rows, previous, token_indices = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_hidden = grad_rows = None
        if needs[1] or needs[2] or needs[4]:
            grad_columns = grad.index_select(-1, token_indices).to(hidden.dtype)
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
        )


def replace_columns(
    output: torch.Tensor,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    bias_columns: torch.Tensor | None,
    previous: torch.Tensor | None,
    token_indices: torch.Tensor,
    writable: bool,
) -> torch.Tensor:
    """``output`` with columns ``token_indices`` set to ``hidden @ rows.T + bias_columns``, differentiable.

    ``previous``: the rows ``output``'s columns were computed with (only read
    when a gradient is needed). In place when ``writable`` (see
    :class:`AppliedAdapters`), else into a copy; the backward allocates
    nothing tokens x vocabulary sized.
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
    return _ReplaceColumns.apply(output, hidden, rows, bias_columns, previous, token_indices)


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


class AdapterLayer(nn.Module):
    """Wraps one base module (``nn.Embedding``, ``nn.Linear`` or ``Conv1D``) and applies a stack of adapters.

    ``active_adapters`` is the stack, in order; adapters merged into the base
    weight are skipped, since the base module already applies them.

    On a linear module (an LM head) the stack is applied in one of two ways,
    with the same result:

    * in order: each adapter's :meth:`AdapterState.project`, except that a run
      of consecutive adapters giving :meth:`AdapterState.low_rank_factors`
      shares one in-place pass (:func:`add_low_rank`);
    * folded, when every adapter either gives low-rank factors or declares
      :attr:`AdapterState.head_replaces_rows`, and that takes fewer passes over
      the tokens x vocabulary logits than the order would (e.g. the stack
      [tokens, LoRA, tokens, LoRA]): all low-rank updates in one pass, then the
      union of touched columns written once (:func:`replace_columns`). Always
      in training; without a gradient only from
      :attr:`fold_min_elements_without_grad` logits on.

    Either way the logits are written in place only where nothing saved them
    (:class:`AppliedAdapters`).

    Without a gradient and in eval mode, a stack whose adapters all give
    :meth:`AdapterState.low_rank_weight` or replace rows is instead folded once,
    on the embedding too, and kept in :attr:`folded` until a weight changes
    (:mod:`tt_core.folded`); ``train()``/``eval()`` drop it.
    """

    #: Without a gradient, where the stack is not kept folded (training mode, weights that
    #: cannot be stamped), the folded head runs only from this many logits on: a pass over
    #: fewer (1 x 32 tokens x 32k: 1M) costs less than the small ops folding adds.
    fold_min_elements_without_grad: ClassVar[int] = 1 << 22

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.check_wrappable("module", base_layer)
        self.base_layer: nn.Module = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        #: Set by tt_core.per_sample.serving for the length of an ``adapter_names=`` call.
        self.sample_plan: Any = None
        #: The stack folded for calls without a gradient (tt_core/folded.py); dropped by train()/eval().
        self.folded: FoldedStack | None = None

    @staticmethod
    def check_wrappable(name: str, base_layer: nn.Module, state: AdapterState | None = None) -> None:
        """Raise unless ``base_layer`` is a module kind the wrapper (and ``state``, if given) can adapt."""
        if is_conv1d(base_layer):
            if state is not None and (not state.adapts_conv1d or state.head_replaces_rows):
                raise ConfigError(
                    f"{name} is a transformers Conv1D (a linear layer storing its weight transposed), "
                    f"which {type(state).__name__} does not adapt; target nn.Embedding or nn.Linear "
                    "modules with it"
                )
            return
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ConfigError(
                f"{name} is a {type(base_layer).__name__}; tt-adapters wraps nn.Embedding, nn.Linear and "
                "transformers' Conv1D modules only. Target the token embedding (or a head tied to it), "
                "or a linear layer with a method that adapts them (lora_linear)."
            )

    @property
    def is_embedding(self) -> bool:
        return isinstance(self._modules["base_layer"], nn.Embedding)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.sample_plan is not None:  # adapter_names=: a stack per sample (tt_core/per_sample.py)
            from tt_core.per_sample import apply_plan

            base_output, writable = self._writable_base_output(self.base_layer(x, *args, **kwargs))
            if not writable:  # the plan writes in place; a hook may hold the base output
                base_output = base_output.clone(memory_format=torch.contiguous_format)
            return apply_plan(self, self.sample_plan, x, base_output)
        states: list[AdapterState] = []
        for name in self.active_adapters:
            state: AdapterState = self.adapters[name]  # type: ignore[assignment]
            if not state.merged:
                states.append(state)
        if not states:
            return self.base_layer(x, *args, **kwargs)
        folded = None
        if not torch.is_grad_enabled() and not self.training:
            folded = self._folded_stack(x, states)
            if folded is not None and folded.up is not None and not args and not kwargs:
                fused = self._fused_head(x, folded)
                if fused is not None:
                    return fused
        output = self.base_layer(x, *args, **kwargs)
        if folded is not None and type(output) is torch.Tensor and output.dtype == folded.dtype:
            if self.is_embedding:
                return folded.embed(x, output, self._plain_forward())
            output, writable = self._writable_base_output(output)
            return folded.project(x, output, writable)
        if self.is_embedding:
            for state in states:
                output = state.embed(x, output, self.base_layer)
            return output
        return self._project(x, output, states)

    def train(self, mode: bool = True) -> AdapterLayer:
        self.folded = None
        return super().train(mode)

    def _folded_stack(self, x: torch.Tensor, states: list[AdapterState]) -> FoldedStack | None:
        """The stack folded for a call without a gradient (tt_core/folded.py), built if the weights changed.

        None where it cannot be folded: an adapter opts in to neither a
        low-rank weight nor row replacement, an embedding renormalises rows
        (``max_norm``), or the weights cannot be stamped
        (:func:`tt_core.folded.stamp`). Built in the dtype the output will
        have (under autocast, a head's autocast dtype).
        """
        if not all(state._can_fold() for state in states):
            return None
        base = self.base_layer
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        if self.is_embedding:
            if getattr(base, "max_norm", None) is not None:
                return None
            dtype = weight.dtype
        elif torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = x.dtype
        weights = stamp(base, states)
        if weights is None:
            return None
        key = (weights, dtype)
        folded = self.folded
        if folded is None or folded.key != key:
            factors = [state.low_rank_weight() for state in states if state.additive]
            if any(pair is None for pair in factors):
                return None
            folded = FoldedStack(key, base, states, factors, dtype)  # type: ignore[arg-type]
            self.folded = folded
        return folded

    def _fused_head(self, hidden: torch.Tensor, folded: FoldedStack) -> torch.Tensor | None:
        """A plain ``nn.Linear`` head's folded output, the base product added into the low-rank change.

        One ``addmm_`` instead of the base product and then a pass over the
        logits (:meth:`FoldedStack.project_fused`). None where the base module
        or the dtypes ask for its own forward.
        """
        base = self.base_layer
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        bias: torch.Tensor | None = base.bias  # type: ignore[assignment]
        if (
            not self._plain_forward()
            or torch.is_autocast_enabled(hidden.device.type)
            or hidden.dtype != weight.dtype
            or folded.dtype != weight.dtype
            or type(hidden) is not torch.Tensor
        ):
            return None
        return folded.project_fused(hidden, weight, bias)

    def _plain_forward(self) -> bool:
        """Whether the base module runs its class's own forward, no hooks: its output is a fresh tensor
        that nothing else holds, so it may be written in place."""
        base = self.base_layer
        plain = nn.Linear.forward if isinstance(base, nn.Linear) else nn.Embedding.forward
        return (
            type(base).forward is plain
            and "forward" not in vars(base)
            and not base._forward_hooks
            and not base._forward_pre_hooks
            and not _global_forward_hooks
            and not _global_forward_pre_hooks
        )

    def _project(
        self, hidden: torch.Tensor, output: torch.Tensor, states: list[AdapterState]
    ) -> torch.Tensor:
        output, writable = self._writable_base_output(output)
        factors = [
            state.low_rank_factors(hidden, output.dtype) if state.additive else None for state in states
        ]
        if self._fold_pays(states, factors) and (
            output.numel() >= self.fold_min_elements_without_grad or torch.is_grad_enabled()
        ):
            return self._project_folded(hidden, output, states, factors, writable)
        applied = AppliedAdapters()
        applied.output_writable = writable
        index = 0
        while index < len(states):
            # Consecutive additive adapters giving low-rank factors share one pass over the output.
            group = 0
            while index + group < len(states) and factors[index + group] is not None:
                group += 1
            if group:
                pairs = [pair for pair in factors[index : index + group] if pair is not None]
                lefts, rights = [left for left, _ in pairs], [right for _, right in pairs]
                output = add_low_rank(output, lefts, rights, applied.output_writable)
                applied.extend(states[index : index + group])
                applied.output_writable = True
                index += group
                continue
            state = states[index]
            result = state.project(hidden, output, self.base_layer, applied)
            applied.output_writable = state.keeps_output_writable and (
                result is not output or applied.output_writable
            )
            output = result
            applied.append(state)
            index += 1
        return output

    @staticmethod
    def _fold_pays(
        states: list[AdapterState], factors: list[tuple[torch.Tensor, torch.Tensor] | None]
    ) -> bool:
        """Whether the folded head (one low-rank pass, one column replacement) does fewer passes.

        It can when every adapter gives low-rank factors or opts in with
        ``head_replaces_rows``; it pays when the stack in order would take more
        passes: more than one run of low-rank adapters, or more than one
        row-replacing adapter.
        """
        rows = [factor is None for factor in factors]
        for state, replaces in zip(states, rows, strict=True):
            if replaces and not (state.head_replaces_rows and state.touched_rows() is not None):
                return False
        low_rank_runs = sum(1 for i, r in enumerate(rows) if not r and (i == 0 or rows[i - 1]))
        in_order = low_rank_runs + sum(rows)
        folded = int(low_rank_runs > 0) + int(any(rows))
        return folded < in_order

    def _project_folded(
        self,
        hidden: torch.Tensor,
        output: torch.Tensor,
        states: list[AdapterState],
        factors: list[tuple[torch.Tensor, torch.Tensor] | None],
        writable: bool,
    ) -> torch.Tensor:
        """The head of a stack of low-rank and row-replacing adapters in two passes, in any order.

        ``W_eff = a_n(... a_1(W))`` differs from ``W`` by the sum of the
        low-rank updates everywhere except on the rows some adapter replaces,
        where it is those rows folded through the whole stack. So: add every
        low-rank update in one pass; then replace the union of touched columns
        by ``hidden @ W_eff[rows].T`` with ``W_eff[rows]`` from
        :meth:`AdapterState.adapt_rows` of every adapter in order. The sparse
        backward of the replacement takes back from the low-rank updates what
        they gave those columns (``previous``: the rows the first pass used).
        """
        pairs = [pair for pair in factors if pair is not None]
        if pairs:
            output = add_low_rank(
                output, [left for left, _ in pairs], [right for _, right in pairs], writable
            )
            writable = True
        touched: list[torch.Tensor] = []
        for state, pair in zip(states, factors, strict=True):
            rows_of_state = state.touched_rows() if pair is None else None
            if rows_of_state is not None:
                touched.append(rows_of_state)
        ids = torch.cat(touched).unique() if len(touched) > 1 else touched[0]
        base: nn.Linear = self.base_layer  # type: ignore[assignment]
        base_rows = base.weight[ids]
        rows = base_rows
        for state in states:
            rows = state.adapt_rows(ids, rows)
        previous = None
        if torch.is_grad_enabled():
            previous = base_rows
            for state, pair in zip(states, factors, strict=True):
                if pair is not None:
                    previous = state.adapt_rows(ids, previous)
        bias_columns = None if base.bias is None else base.bias[ids]
        return replace_columns(output, hidden, rows, bias_columns, previous, ids, writable)

    def _writable_base_output(self, output: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The base output, and whether adapters may write it in place.

        ``nn.Linear.forward`` (``F.linear``) saves its inputs, never its
        output, so its output is writable, unless hooks or a subclass's own
        forward could have done anything to it. For a 3-D input with a bias
        ``F.linear`` returns a view of its 2-D ``addmm`` result; writing into
        that view in place would make autograd copy the whole base on the
        backward, so the adapters get a non-view alias of the same memory
        (``_unsafe_view``, as ``torch.matmul`` itself returns).
        """
        if not self._plain_forward() or type(output) is not torch.Tensor:
            # Hooks or a subclass's forward could do anything; a tensor subclass (DTensor...) may alias.
            return output, False
        root = output._base
        if root is None:
            return output, True
        if (
            root._base is None
            and root.is_contiguous()
            and output.is_contiguous()
            and root.numel() == output.numel()
            and root.storage_offset() == output.storage_offset()
        ):
            return torch.ops.aten._unsafe_view(root, output.shape), True
        return output, False

    def __getattr__(self, name: str) -> Any:
        # Attributes the model reads from its embedding (weight, padding_idx,
        # embed_scale, num_embeddings...) come from the base module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}"
