"""The wrapper put around one base module: it applies the stack of adapter states."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from tt_core.api.errors import AdapterStateError, ConfigError
from tt_core.tensors.bank import AdapterBank, BankCapacity, bankable, needed_capacity
from tt_core.tensors.folded import FoldedStack, stamp
from tt_core.tensors.kernels import add_low_rank, first_occurrences, replace_columns
from tt_core.tensors.per_sample import apply_plan
from tt_core.tensors.state import AdapterState, AppliedAdapters, is_conv1d


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
    (:mod:`tt_core.tensors.folded`); ``train()``/``eval()`` drop it.
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
        #: Set by tt_core.serving.serving for the length of an ``adapter_names=`` call.
        self.sample_plan: Any = None
        #: The stack folded for calls without a gradient (folded.py); dropped by train()/eval().
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
        if torch.compiler.is_compiling() and self._compiled_bank_applies(args, kwargs):
            # Compiled inference: the active stack from the bank, chosen by a tensor (no recompile).
            bank: AdapterBank = self.bank  # type: ignore[assignment]
            output = self.base_layer(x)
            return bank.apply(self.base_layer, x, output, bank.active.expand(output.shape[0], -1))
        if self.sample_plan is not None:  # adapter_names=: a stack per sample (tt_core/serving.py)
            return self._forward_per_sample(x, *args, **kwargs)
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
        return self.project_stack(x, output, states)

    def train(self, mode: bool = True) -> AdapterLayer:
        self.folded = None
        return super().train(mode)

    def _folded_stack(self, x: torch.Tensor, states: list[AdapterState]) -> FoldedStack | None:
        """The stack folded for a call without a gradient (folded.py), built if the weights changed.

        None where it cannot be folded: an adapter opts in to neither a
        low-rank weight nor row replacement, an embedding renormalises rows
        (``max_norm``), or the weights cannot be stamped
        (:func:`tt_core.tensors.folded.stamp`). Built in the dtype the output will
        have (under autocast, a head's autocast dtype).
        """
        if torch.compiler.is_compiling() or not all(state.can_fold() for state in states):
            # A compiled graph cannot read version counters or storages (stamp): it runs the stack.
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

    def project_stack(
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
        # Repeated ids (two adapters replacing one row) stay: each copy is that row folded through the
        # same stack, so every copy writes the same column. ``unique`` would size the graph by the values.
        ids = torch.cat(touched) if len(touched) > 1 else touched[0]
        base: nn.Linear = self.base_layer  # type: ignore[assignment]
        base_rows = base.weight[ids]
        rows = base_rows
        for state in states:
            rows = state.adapt_rows(ids, rows)
        previous = keep = None
        if torch.is_grad_enabled():
            previous = base_rows
            for state, pair in zip(states, factors, strict=True):
                if pair is not None:
                    previous = state.adapt_rows(ids, previous)
            if len(touched) > 1:
                keep = first_occurrences(ids)
        bias_columns = None if base.bias is None else base.bias[ids]
        return replace_columns(output, hidden, rows, bias_columns, previous, ids, writable, keep)

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
        if torch.compiler.is_compiling():
            # A compiled graph has no storages to compare, and functionalises every in-place write
            # anyway: the adapters write out of place, which the compiler fuses.
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

    # ------------------------------------------------------------- adapter bank
    #: Every foldable adapter of the layer in fixed-size tables (tt_core/tensors/bank.py): per-sample
    #: calls and compiled inference apply stacks from it.
    bank: AdapterBank | None = None
    #: The capacities AdapterModel.prepare_for_compile fixed; None: the bank is sized as needed.
    bank_capacity: BankCapacity | None = None
    #: The model's adapter names, whose positions (+1) are the bank's entries; set by the model.
    adapter_order: tuple[str, ...] | None = None
    #: Whether the compiled path may apply the active stack from the bank (every adapter of it is there).
    bank_holds_active: bool = False

    def refresh_bank(self) -> None:
        """Recompute the adapter bank from the adapters' current weights, and its active stack.

        In place when the new contents fit the bank's capacities, so that a
        compiled model keeps running without recompiling. Call it (or
        ``AdapterModel.refresh_adapter_tables()``) after changing adapter
        weights yourself while serving a compiled model: under compile the
        bank cannot notice such changes.
        """
        self.sync_bank(force=True)

    def sync_bank(self, force: bool = False) -> None:
        """Refill the bank where a weight changed (``force``: always), and write its active stack."""
        names = self.adapter_order if self.adapter_order is not None else tuple(self.adapters)
        stack = [name for name in self.active_adapters if not self.adapters[name].merged]
        bank = self._ensure_bank(names, len(stack), force)
        if bank is None:
            self.bank_holds_active = False
            return
        entry_of = {name: entry for entry, name in enumerate(names, start=1)}
        in_bank = [
            name
            for name in stack
            if name in entry_of
            and bankable(self.adapters[name], self.base_layer)
            and name not in bank.excluded
        ]
        self.bank_holds_active = len(in_bank) == len(stack)
        bank.set_active([entry_of[name] for name in in_bank])

    def _ensure_bank(self, names: tuple[str, ...], stack: int, force: bool = False) -> AdapterBank | None:
        """The bank, filled for the current weights and ``names``; rebuilt only when it outgrew its tables.

        None where the weights cannot be stamped (inference tensors, DTensors) and
        no capacity was fixed: the caller then takes the per-stack path.
        """
        states: dict[str, AdapterState] = {
            name: state  # type: ignore[misc]
            for name, state in self.adapters.items()
            if bankable(state, self.base_layer)
        }
        key = stamp(self.base_layer, list(states.values()))
        if key is None and self.bank_capacity is None:
            return None
        bank = self.bank
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        if (
            bank is not None
            and not force
            and key is not None
            and bank.key == (key, names)
            and stack <= bank.capacity.stack
        ):
            return bank  # the same weights: the same contents
        needed = needed_capacity(states, names, stack)
        fits = (
            bank is not None
            and bank.capacity.holds(needed)
            and bank.dtype == weight.dtype
            and bank.device == weight.device
        )
        if not fits:
            capacity = needed
            if self.bank_capacity is not None:
                capacity = self.bank_capacity.grown(needed)
                exceeded = self.bank_capacity.exceeded_by(needed)
                if exceeded and bank is not None:
                    warnings.warn(
                        f"the adapters of the wrapped {type(self.base_layer).__name__} "
                        f"({tuple(weight.shape)}) exceed the compiled capacity {', '.join(exceeded)}; the "
                        "adapter tables are rebuilt, so a compiled model recompiles. Call "
                        "prepare_for_compile() with larger capacities to avoid it",
                        stacklevel=5,
                    )
                self.bank_capacity = capacity
            bank = AdapterBank(self.base_layer, capacity)
            self.bank = bank
        assert bank is not None
        bank.fill(self.base_layer, states, names, len(states) == len(self.adapters), (key, names))
        return bank

    def _compiled_bank_applies(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a compiled call applies the active stack from the bank (eval, no gradient, prepared)."""
        return (
            self.sample_plan is None
            and self.bank_capacity is not None
            and self.bank is not None
            and self.bank_holds_active
            and not torch.is_grad_enabled()
            and not self.training
            and not args
            and not kwargs
        )

    def _forward_per_sample(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample's stack: from the bank when every adapter it names is there, else stack by stack."""
        plan = self.sample_plan
        if x.dim() == 0:
            raise ConfigError(
                "adapter_names= needs the batch as the first dimension of every adapted module's input"
            )
        if torch.compiler.is_compiling():
            # Under compile nothing may be stamped or refilled: prepare_for_compile() made the bank.
            if self.bank is None or self.bank_capacity is None or not self.bank.complete:
                raise AdapterStateError(
                    "a compiled per-sample call needs the adapter tables: call "
                    "adapter_model.prepare_for_compile() before compiling (every adapter must fold)"
                )
            output = self.base_layer(x, *args, **kwargs)
            return self.bank.apply(self.base_layer, x, output, plan.entries(int(x.shape[0]), output.device))
        base_output, writable = self._writable_base_output(self.base_layer(x, *args, **kwargs))
        bank = None
        used = plan.used
        if used is None or all(
            bankable(self.adapters[name], self.base_layer) for name in used if name in self.adapters
        ):
            bank = self._ensure_bank(plan.names, 1)
            if bank is not None and used is not None and used & bank.excluded:
                bank = None
        if used is None and (bank is None or not bank.complete):
            raise AdapterStateError(
                "adapter_names= given as a tensor of entries needs every adapter on each layer to fold "
                "(low-rank or row-replacing adapters, weights that are plain tensors); pass the names instead"
            )
        if bank is not None and type(base_output) is torch.Tensor and base_output.dim() >= 1:
            entries = plan.entries(int(x.shape[0]), base_output.device)
            return bank.apply(self.base_layer, x, base_output, entries, writable)
        if not writable:  # the plan writes in place; a hook may hold the base output
            base_output = base_output.clone(memory_format=torch.contiguous_format)
        return apply_plan(self, plan, x, base_output)

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


def wrappers_in(model: nn.Module) -> list[tuple[nn.Module, str, AdapterLayer]]:
    """Every adapter wrapper in ``model``, with its parent module and its name there."""
    found = []
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            parent_name, _, child_name = name.rpartition(".")
            found.append((model.get_submodule(parent_name), child_name, module))
    return found
