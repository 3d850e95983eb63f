"""AdapterModel: several named adapters on one model, stacked, switched, merged, saved."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import tqdm
from torch import nn

from tt_core import combining, serving, status
from tt_core.api.combining import Combination
from tt_core.api.config import AdapterConfig
from tt_core.api.errors import AdapterStateError, ArgumentTypeError, ConfigError, PluginError
from tt_core.disk import manifest, storage
from tt_core.formats import native, peft, trainer
from tt_core.merging import Merges
from tt_core.plugins import get_plugin_manager
from tt_core.records import AdapterRecord, Site, check_adapter_name
from tt_core.tensors.bank import BankCapacity, bankable, needed_capacity
from tt_core.tensors.distributed import whole_adapter_tensors
from tt_core.tensors.state import AdapterState
from tt_core.tensors.targets import find_tied_modules, named_base_modules
from tt_core.tensors.wrapper import AdapterLayer, wrappers_in


def _names(value: object, argument: str = "adapter_names") -> list[str]:
    """A name or a list of names as a list; anything else is a TypeError naming the argument."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return list(value)
    raise ArgumentTypeError(f"{argument} must be an adapter name or a list of adapter names, got {value!r}")


def _call_model(adapter_model: AdapterModel, *args: Any, **kwargs: Any) -> Any:
    return serving.call_with_adapter_names(adapter_model._serving, adapter_model.model, args, kwargs)


# transformers.Trainer looks for label columns in the *class's* forward (it has no instance
# there); most models call them ``labels``, and a dataset without such a column loses nothing.
# Without it Trainer finds no labels, and evaluation reports no eval_loss. (tt_core/formats/trainer.py)
_call_model.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("adapter_model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


class _ForwardWithModelSignature:
    # AdapterModel.forward takes what the base model's forward takes; exposing
    # that signature lets transformers.Trainer keep the right dataset columns.
    def __get__(self, obj: AdapterModel | None, objtype: type | None = None) -> Any:
        if obj is None:
            return _call_model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return serving.call_with_adapter_names(obj._serving, obj.model, args, kwargs)

        return functools.wraps(obj.model.forward)(forward)


class AdapterModel(nn.Module):
    """A model with named adapters. Unknown attributes pass through to the model.

    Build one with :func:`get_adapter_model` or :meth:`from_pretrained`.
    """

    forward = _ForwardWithModelSignature()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        wrapped = [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
        if wrapped:
            raise AdapterStateError(
                f"{type(model).__name__} already carries adapters (at {wrapped}) from another AdapterModel; "
                "add adapters through that AdapterModel, or unload() it first"
            )
        self.model = model
        self._records: dict[str, AdapterRecord] = {}
        self._disabled = 0  # depth of disable_adapter() blocks
        self._active: list[str] = []
        self._merges = Merges(model, self._records, self)  # the merge engine (tt_core/merging.py)
        self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def adapter_configs(self) -> dict[str, AdapterConfig]:
        """Each adapter's config, by name: copies, since editing one could not change the adapter."""
        return {name: copy.deepcopy(record.config) for name, record in self._records.items()}

    # ----------------------------------------------------------------- adding
    def add_adapter(
        self, adapter_name: str, peft_config: AdapterConfig, *, is_trainable: bool = True
    ) -> None:
        """Add an inactive, frozen adapter; :meth:`set_adapter` activates it.

        ``peft_config`` is the method's config (PEFT's name for the argument).
        ``is_trainable=False`` holds it for inference: activating it does not
        unfreeze it (:meth:`set_requires_grad` does). Nothing on the model
        changes unless every target accepts the config.
        """
        check_adapter_name(adapter_name)
        config = peft_config
        if not isinstance(config, AdapterConfig):
            raise ArgumentTypeError(
                f"config must be an adapter config (e.g. TrainableTokensConfig), got {config!r}"
            )
        if adapter_name in self._records:
            raise AdapterStateError(
                f"an adapter named {adapter_name!r} already exists (adapters: {self.adapters}); "
                "pick another name or delete_adapter() it first"
            )
        config = copy.deepcopy(config)  # later edits to the caller's object change nothing here
        sites = self._new_sites(adapter_name, config)
        # Every check passed: only now is the model touched.
        self._install(adapter_name, AdapterRecord(config, sites, False, not is_trainable, {}))

    def _new_sites(self, adapter_name: str, config: AdapterConfig) -> list[Site]:
        """The states ``config``'s plugin creates for this model, and the modules each applies to.

        Every check runs here; nothing on the model changes.
        """
        manager = get_plugin_manager()
        hooks = manager.hooks_for(manager.method_for(config).name)
        targets = hooks.detect_target(model=self.model, config=config)
        if not targets:
            raise PluginError(f"no plugin found a module to adapt for method {config.method!r}")
        modules = dict(named_base_modules(self.model))
        sites: list[Site] = []
        covered: set[str] = set()
        for target in targets:
            if target in covered:
                continue  # already shares the state of an earlier, tied target
            base_layer = modules[target]
            state = hooks.create_layer(
                config=config, adapter_name=adapter_name, target_name=target, base_layer=base_layer
            )
            if state is None:
                raise PluginError(f"no plugin creates a {config.method!r} layer for {target!r}")
            if not isinstance(state, AdapterState):
                raise PluginError(
                    f"the create_layer hook of method {config.method!r} returned {type(state).__name__}, "
                    "not a tt_core.AdapterState"
                )
            tied = hooks.tie_handler(
                model=self.model, config=config, target_name=target, base_layer=base_layer
            )
            shared = find_tied_modules(self.model, target)
            declined = [name for name in shared if name not in tied]
            site = Site(state, [target, *tied], declined)
            for name in site.modules:
                AdapterLayer.check_wrappable(name, modules[name], site.state)
            covered.update(site.modules)
            sites.append(site)
        return sites

    def _install(self, adapter_name: str, record: AdapterRecord) -> None:
        """Put the checked sites of a new, inactive and frozen adapter on the model; record it."""
        for site in record.sites:
            for name in site.modules:
                self._wrapper(name).adapters[adapter_name] = site.state
            site.state.requires_grad_(False)
        record.fingerprint = native.base_fingerprint(self.model, record.sites)
        self._records[adapter_name] = record
        self._sync_adapter_tables()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        *,
        seed: int | None = None,
    ) -> None:
        """Add ``adapter_name``, the weighted combination of ``adapters``: inactive and frozen, as added.

        PEFT's arguments in PEFT's order (``LoraModel.add_weighted_adapter``),
        plus ``seed`` for the ``dare_*`` types (drawn from torch's generator
        when left out; recorded either way). The sources must be of one method
        and adapt the same modules; the method's plugin combines them (the
        types each supports, and what the weights mean: docs/combining.md).
        The result is an ordinary adapter that trains, stacks, merges, saves
        and publishes; its manifest entry records ``combined_from``. Any
        refusal leaves the model and its adapters as they were.
        """
        if not isinstance(adapters, (list, tuple)) or not all(isinstance(name, str) for name in adapters):
            raise ArgumentTypeError(f"adapters must be a list of adapter names, got {adapters!r}")
        if not isinstance(weights, (list, tuple)):
            raise ArgumentTypeError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
        if not adapters:
            raise ConfigError("adapters is empty; name the adapters to combine, e.g. ['medical', 'legal']")
        names = list(adapters)
        self._check_known(names)
        check_adapter_name(adapter_name)
        if adapter_name in self._records:
            raise AdapterStateError(
                f"an adapter named {adapter_name!r} already exists (adapters: {self.adapters}); "
                "pick another name for the combination, or delete_adapter() it first"
            )
        combination = Combination(
            combination_type=combination_type,
            adapters=tuple(names),
            weights=tuple(weights),
            density=density,
            majority_sign_method=majority_sign_method,
            seed=seed,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
        )
        config, sites, combined_from = combining.combine(
            self.model, self._records, self._merges.merged, combination
        )
        self._install(adapter_name, AdapterRecord(config, sites, False, False, {}, combined_from))

    def _wrapper(self, module_name: str) -> AdapterLayer:
        parent_name, _, child_name = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        module = getattr(parent, child_name)
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            setattr(parent, child_name, module)
        return module

    def _wrappers(self) -> list[tuple[nn.Module, str, AdapterLayer]]:
        return wrappers_in(self.model)

    def _serving(self) -> serving.Adapters:
        """What a per-sample call (``adapter_names=``) is checked against (tt_core/serving.py)."""
        return serving.Adapters(
            self.model, self.adapters, self.merged_adapters, bool(self._disabled), self._compile_stack()
        )

    # ------------------------------------------------------------- switching
    @property
    def adapters(self) -> list[str]:
        """Names of every adapter on the model, in the order they were added."""
        return list(self._records)

    @property
    def active_adapters(self) -> list[str]:
        """The active stack, applied in this order."""
        return list(self._active)

    def _check_known(self, names: list[str]) -> None:
        unknown = [name for name in names if not isinstance(name, str) or name not in self._records]
        if unknown:
            raise AdapterStateError(f"unknown adapter(s) {unknown}; the model has {self.adapters}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise AdapterStateError(f"adapter(s) {repeated} named more than once in {names}")

    def _refuse_while_disabled(self, verb: str) -> None:
        if self._disabled:
            raise AdapterStateError(
                f"{verb}() cannot run inside `with disable_adapter():`, which restores the adapters "
                "and merges it found when the block ends; call it after the block"
            )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate these adapters, stacked in the given order; only they train.

        As in PEFT, every other adapter is frozen, and these are made trainable
        unless ``inference_mode=True`` (which freezes them too). Unlike PEFT,
        an adapter loaded with ``is_trainable=False`` stays frozen: use
        :meth:`set_requires_grad` to train it (docs/peft.md says why).
        """
        names = _names(adapter_name, "adapter_name")
        self._check_known(names)
        if not isinstance(inference_mode, bool):
            raise ArgumentTypeError(f"inference_mode must be True or False, got {inference_mode!r}")
        self._refuse_while_disabled("set_adapter")
        if self._merges.merged:
            warnings.warn(
                f"adapters {self._merges.merged} are merged; unmerging them before switching", stacklevel=2
            )
            self._merges.unmerge_all()
        for name, record in self._records.items():
            record.trainable = name in names and not inference_mode and not record.for_inference
        self._activate(names)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make these adapters' parameters require a gradient (or not) now, active or not, as PEFT does.

        ``requires_grad=True`` also ends an adapter's hold for inference
        (``is_trainable=False``), so later activations train it.
        """
        names = _names(adapter_names)
        self._check_known(names)
        if not isinstance(requires_grad, bool):
            raise ArgumentTypeError(f"requires_grad must be True or False, got {requires_grad!r}")
        for name in names:
            self._records[name].trainable = requires_grad
            if requires_grad:
                self._records[name].for_inference = False
        self._apply_requires_grad()

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (PEFT's singular form); the stack as a list when several are active."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Each adapter's config by name, as PEFT calls it."""
        return self.adapter_configs

    def _activate(self, names: list[str]) -> None:
        self._active = list(names)
        for _, _, wrapper in self._wrappers():
            wrapper.active_adapters = [name for name in names if name in wrapper.adapters]
        self._apply_requires_grad()
        self._sync_adapter_tables()

    def _apply_requires_grad(self) -> None:
        for record in self._records.values():
            train = record.trainable and not self._disabled
            for site in record.sites:
                site.state.requires_grad_(train)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; wrappers left with no adapter give the base module back.

        As in PEFT, deleting the only active adapter activates the first one
        left, with a warning; it never leaves the model silently adapter-free.
        Deleting an active adapter then activates the ones left as
        :meth:`set_adapter` would (they train, every other adapter is frozen).
        """
        if not isinstance(adapter_name, str):
            raise ArgumentTypeError(f"adapter_name must be an adapter name, got {adapter_name!r}")
        self._check_known([adapter_name])
        self._refuse_while_disabled("delete_adapter")
        merged = [name for name in self._merges.merged if name != adapter_name]
        if adapter_name in self._merges.merged:  # unmerge it and whatever was merged after it
            self._merges.merge_exactly(self._merges.merged[: self._merges.merged.index(adapter_name)])
        for parent, child_name, wrapper in self._wrappers():
            if adapter_name in wrapper.adapters:
                del wrapper.adapters[adapter_name]
                if not len(wrapper.adapters):
                    setattr(parent, child_name, wrapper.base_layer)
        del self._records[adapter_name]
        was_active = adapter_name in self._active
        active = [name for name in self._active if name != adapter_name]
        if not active and adapter_name in self._active and self._records:
            active = [next(iter(self._records))]
            warnings.warn(
                f"adapter {adapter_name!r} was active and is now deleted; {active[0]!r} is active now",
                stacklevel=2,
            )
        if was_active:  # PEFT calls set_adapter(those left active)
            for name, record in self._records.items():
                record.trainable = name in active and not record.for_inference
        self._activate(active)
        self._merges.merge_exactly([name for name in merged if name in active])
        self._sync_adapter_tables()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves as the base model; merges come back after."""
        if self._disabled:  # nested: the outer block restores
            self._disabled += 1
            try:
                yield
            finally:
                self._disabled -= 1
            return
        merged, active = list(self._merges.merged), list(self._active)
        self._merges.unmerge_all()
        self._disabled = 1  # every adapter is frozen inside; each gets its requires_grad back after
        self._activate([])
        try:
            yield
        finally:
            self._disabled = 0
            self._activate(active)
            self._merges.merge_exactly(merged)
            self._sync_adapter_tables()

    def clear_inference_cache(self) -> None:
        """Forget every stack folded for calls without a gradient (see :mod:`tt_core.tensors.folded`).

        Needed only after writing a weight through ``.data``, which no version
        counter sees; any other change of a weight is noticed by itself.
        """
        for _, _, layer in self._wrappers():
            layer.folded = None

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold active adapters (default: all) into the base weights; outputs stay the same.

        A merge that would change the outputs is refused and nothing changes.
        With ``safe_merge=True`` the merge is first tried on copies of the
        weights (in their dtype, costing one copy of each) and refused if it
        would write NaN or inf.
        """
        names = self.active_adapters if adapter_names is None else _names(adapter_names)
        self._check_known(names)
        self._refuse_while_disabled("merge_adapter")
        inactive = [name for name in names if name not in self._active]
        if inactive:
            raise AdapterStateError(
                f"adapter(s) {inactive} are not active (active stack: {self._active}); merging them "
                "would change the outputs. Activate them with set_adapter() first, or use "
                "merge_and_unload(adapter_names=...) to bake them into a plain model."
            )
        new = [name for name in self._active if name in names and name not in self._merges.merged]
        self._merges.check_order(self._active, self._merges.merged + new)
        self._merges.check_ties(new)
        if safe_merge:
            self._merges.check_writes(new)
        self._merges.merge_all_or_none(new)
        self._sync_adapter_tables()

    def unmerge_adapter(self) -> None:
        """Undo every merge, newest first; trainable-token rows come back bit for bit."""
        self._refuse_while_disabled("unmerge_adapter")
        self._merges.unmerge_all()
        self._sync_adapter_tables()

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters now folded into the base weights, in merge order."""
        return list(self._merges.merged)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Return the base model with these adapters (default: the active stack) folded in, in order.

        PEFT's arguments in PEFT's order; ``progressbar`` shows one step per adapter.
        """
        names = self.active_adapters if adapter_names is None else _names(adapter_names)
        self._check_known(names)
        self._refuse_while_disabled("merge_and_unload")
        self._merges.check_ties(names)
        merged = list(self._merges.merged)
        self._merges.unmerge_all()
        try:
            if safe_merge:
                self._merges.check_writes(names)
            with tqdm.tqdm(total=len(names), desc="merging", disable=not progressbar) as bar:
                self._merges.merge_all_or_none(names, bar.update)
        except BaseException:
            self._merges.merge_exactly(merged)
            raise
        return self._unload()

    def unload(self) -> nn.Module:
        """Return the base model as it was, without any adapter."""
        self._refuse_while_disabled("unload")
        self._merges.unmerge_all()
        return self._unload()

    def _unload(self) -> nn.Module:
        for parent, child_name, wrapper in self._wrappers():
            setattr(parent, child_name, wrapper.base_layer)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._base_requires_grad.get(name, True))
        self._records.clear()
        self._active = []
        self._merges.merged.clear()
        return self.model

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its adapted modules are wrapped while adapters exist)."""
        return self.model

    # ------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a tied weight counts once."""
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def get_layer_status(self) -> list[status.LayerStatus]:
        """Each wrapped module's adapters: active, merged, trainable, devices (PEFT's fields)."""
        return status.layer_status(self.model, self.merged_adapters, enabled=not self._disabled)

    def get_model_status(self) -> status.ModelStatus:
        """The model's adapters in one report (PEFT's fields; ``peft_types`` holds method names)."""
        return status.model_status(
            self.model,
            self._records,
            self.active_adapters,
            self.merged_adapters,
            enabled=not self._disabled,
            parameter_counts=self.get_nb_trainable_parameters(),
            adapter_model_type=type(self).__name__,
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate``, with the active stack applied.

        ``adapter_names=[...]`` (one entry per sample: a name, a list of names,
        or ``"__base__"``) runs each sample with its own stack instead; see
        :mod:`tt_core.serving`.
        """
        generate: Any = self.model.generate
        return serving.call_with_adapter_names(self._serving, generate, args, kwargs)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------- save/load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        *,
        format: str = "tt",
    ) -> None:
        """Save adapters (default: all) into ``save_directory``, all-or-nothing.

        Writes ``manifest.json`` and one folder per adapter (config, safetensors,
        hashes); adapters saved there before are kept. See docs/manifest.md.
        PEFT's arguments in PEFT's order: only safetensors are written, the
        adapter never needs the whole embedding saved, and a process with
        ``is_main_process=False`` writes nothing. ``format="peft"`` writes what
        ``peft.PeftModel.from_pretrained`` loads instead; ``format="peft-lora"``
        writes trainable tokens as the equivalent PEFT LoRA on the embedding,
        which serving engines that take LoRA load (docs/peft.md).
        """
        if format not in ("tt", "peft", "peft-lora"):
            raise ConfigError(
                f"format={format!r} is not one of 'tt' (tt-adapters' own), 'peft' (PEFT's) and 'peft-lora' "
                "(trainable tokens as a PEFT LoRA)"
            )
        if safe_serialization is not True:
            raise ConfigError(
                "tt-adapters writes safetensors only (nothing is pickled); drop safe_serialization"
            )
        if save_embedding_layers not in ("auto", False):
            raise ConfigError(
                "save_embedding_layers=True would save the whole embedding; an adapter saves only its own "
                "rows, which is all it needs. Leave it at 'auto'."
            )
        names = self.adapters if selected_adapters is None else _names(selected_adapters, "selected_adapters")
        self._check_known(names)
        states = [state for record in self._records.values() for state in record.states()]
        with whole_adapter_tensors(self, states):  # FSDP2: every rank gathers the rows; one writes
            if is_main_process and format == "peft":
                peft.save(self.model, self._records, self.active_adapters, save_directory, names)
            elif is_main_process and format == "peft-lora":
                for name in names:
                    merged = self.merged_adapters
                    peft.save_rows_as_lora(self.model, self._records, merged, save_directory, name)
            elif is_main_process:
                native.save_pretrained(self.model, self._records, self.active_adapters, save_directory, names)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str | None = None,
        is_trainable: bool = False,
        *,
        strict: bool = True,
    ) -> AdapterModel:
        """Load the adapters saved in the folder ``model_id`` onto ``model``.

        All of them, with their saved stack, when ``adapter_name`` is None
        (PEFT loads one, as "default"), or the one called ``adapter_name``.
        On any error ``model`` is left exactly as it was. ``strict=False``
        loads adapters saved from another base model, with a warning.
        """
        adapter_model = cls(model)
        try:
            root = Path(model_id)
            if peft.is_peft_folder(root):  # PEFT's layout, converted (docs/peft.md)
                adapter_model.set_adapter(adapter_model._load_peft(root, adapter_name, is_trainable, strict))
            elif adapter_name is None and trainer.is_trainer_folder(root):  # Trainer's save_model()
                active, saved = trainer.read_trainer_folder(root)
                for name, adapter in saved.items():
                    adapter_model.load_saved(adapter, name, is_trainable, strict)
                adapter_model.set_adapter(active or list(saved))
            elif adapter_name is None and manifest.exists(root):
                found, saved = storage.read_all(root)
                for name, adapter in saved.items():
                    adapter_model.load_saved(adapter, name, is_trainable, strict)
                adapter_model.set_adapter(found.active or list(saved))
            else:
                name = "default" if adapter_name is None else adapter_name
                adapter_model.load_adapter(root, name, is_trainable=is_trainable, strict=strict)
                adapter_model.set_adapter(name)
        except BaseException:
            adapter_model._unload()  # gives back the base model's requires_grad flags
            raise
        if not is_trainable:
            adapter_model.eval()
        return adapter_model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        *,
        strict: bool = True,
    ) -> None:
        """Load one saved adapter as ``adapter_name`` (inactive until :meth:`set_adapter`).

        As in PEFT, ``is_trainable=True`` makes its parameters trainable at once,
        and ``False`` loads it frozen, for inference (see :meth:`set_adapter`).
        ``model_id`` is a folder written by :meth:`save_pretrained` (the adapter
        called ``adapter_name``, or its only adapter) or one adapter's folder.
        Every file is checked against its hash, and the adapter's recorded base
        model against this one; on any error the model is left as it was.
        A PEFT folder is converted (docs/peft.md); a LoRA on linear layers with
        ``trainable_token_indices`` is one adapter, as in PEFT (one on the
        embedding loads as ``adapter_name`` and ``adapter_name + "_tokens"``).
        """
        if peft.is_peft_folder(model_id):
            names = self._load_peft(model_id, adapter_name, is_trainable, strict)
        else:
            if trainer.is_trainer_folder(model_id):  # a folder Trainer wrote (tt_core/formats/trainer.py)
                _, found = trainer.read_trainer_folder(model_id, adapter_name)
                saved = next(iter(found.values()))
            else:
                saved = storage.read(Path(model_id), adapter_name)
            self.load_saved(saved, adapter_name, is_trainable=is_trainable, strict=strict)
            names = [adapter_name]
        if is_trainable:
            self.set_requires_grad(names)

    def load_saved(
        self, saved: storage.SavedAdapter, adapter_name: str, is_trainable: bool = False, strict: bool = True
    ) -> None:
        """Add the verified adapter ``saved`` (read by :mod:`tt_core.disk.storage`) as ``adapter_name``.

        Inactive, as :meth:`add_adapter` adds it; on any error the model is left as it was.
        """
        config, tensors = native.read_adapter(saved, adapter_name, self.model, strict)
        self.add_adapter(adapter_name, config, is_trainable=is_trainable)
        try:
            native.fill(self._records[adapter_name], tensors, saved.folder / manifest.WEIGHTS_FILE)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._records[adapter_name].combined_from = copy.deepcopy(saved.entry.get(manifest.COMBINED_FROM))
        self._sync_adapter_tables()

    def _load_peft(
        self, path: str | os.PathLike[str], adapter_name: str | None, is_trainable: bool, strict: bool
    ) -> list[str]:
        """Add the PEFT adapters of ``path`` (:func:`tt_core.formats.peft.read`), all or none;
        return the names to activate."""
        converted, active = peft.read(path, adapter_name, model=self.model, strict=strict)
        added: list[str] = []
        try:
            for name, saved in converted.items():
                self.load_saved(saved, name, is_trainable=is_trainable, strict=strict)
                added.append(name)
        except BaseException:
            for name in reversed(added):
                self.delete_adapter(name)
            raise
        return active

    # --------------------------------------------------------------- hot-swap
    def hotswap_adapter(
        self, adapter_name: str, source: str | os.PathLike[str], *, source_name: str | None = None
    ) -> None:
        """Replace ``adapter_name``'s weights in place by ``source``'s: it then computes what the source does.

        ``source`` is the name of another adapter on this model, or a saved
        folder (native or PEFT format; ``source_name`` picks one adapter of a
        folder holding several). It must be of the same method, on the same
        modules. Tensors of the same shapes keep their identity, so a
        ``torch.compile``'d model runs the new weights without recompiling;
        another rank or number of token ids replaces them, which a model
        prepared with :meth:`prepare_for_compile` serves from its adapter
        tables without recompiling while they fit its capacities. The adapter keeps its name,
        place in the stack and trainability; its config becomes the
        source's, so saving it afterwards writes the source. Refused while it
        is merged; on any error nothing changes.
        """
        if not isinstance(adapter_name, str):
            raise ArgumentTypeError(f"adapter_name must be an adapter name, got {adapter_name!r}")
        self._check_known([adapter_name])
        if source_name is not None and not isinstance(source_name, str):
            raise ArgumentTypeError(f"source_name must be an adapter name or None, got {source_name!r}")
        if isinstance(source, str) and source in self._records:
            if source_name is not None:
                raise ArgumentTypeError(
                    f"source_name picks an adapter of a saved folder, and {source!r} is an adapter of this "
                    "model; drop source_name"
                )
            record = self._records[source]
            self._hotswap(adapter_name, record.config, record.sites, f"adapter {source!r}")
            return
        if not isinstance(source, (str, os.PathLike)):
            raise ArgumentTypeError(
                f"source must be the name of an adapter of this model or a saved folder, got {source!r}"
            )
        path = Path(source)
        if not path.is_dir():
            raise ConfigError(
                f"{str(source)!r} is neither an adapter of this model (it has {self.adapters}) nor a folder; "
                "pass an adapter's name, or a folder written by save_pretrained()"
            )
        if peft.is_peft_folder(path):  # converted as loading converts it (docs/peft.md)
            converted, _ = peft.read(path, source_name, model=self.model)
            if len(converted) != 1:
                raise ConfigError(
                    f"{path} holds the PEFT adapters {sorted(converted)}; pick the one to hot-swap in with "
                    "source_name="
                )
            saved = next(iter(converted.values()))
        else:
            saved = storage.read(path, source_name)
        self.hotswap_saved(adapter_name, saved)

    def hotswap_saved(self, adapter_name: str, saved: storage.SavedAdapter, strict: bool = True) -> None:
        """:meth:`hotswap_adapter` from the verified adapter ``saved`` (read by :mod:`tt_core.disk.storage`).

        ``strict=False`` takes an adapter saved from another base model, with a
        warning, as :meth:`load_adapter` does.
        """
        self._check_known([adapter_name])
        config, tensors = native.read_adapter(saved, adapter_name, self.model, strict)
        where = f"the adapter in {saved.folder}"
        self._check_swappable(adapter_name, config, None, where)
        sites = self._new_sites(adapter_name, config)
        source = AdapterRecord(config, sites, False, True, {})
        native.fill(source, tensors, saved.folder / manifest.WEIGHTS_FILE)
        self._hotswap(adapter_name, config, sites, where)

    def _check_swappable(
        self, adapter_name: str, config: AdapterConfig, sites: list[Site] | None, where: str
    ) -> None:
        """Refuse a hot-swap of ``where`` (``config``, its ``sites``) into ``adapter_name``, saying why."""
        record = self._records[adapter_name]
        if adapter_name in self._merges.merged:
            raise AdapterStateError(
                f"adapter {adapter_name!r} is merged into the base weights, which a hot-swap would leave "
                "holding the old weights; unmerge_adapter() first, hot-swap, then merge_adapter() again"
            )
        if config.method != record.config.method:
            raise ConfigError(
                f"{where} is a {config.method!r} adapter and {adapter_name!r} a {record.config.method!r} "
                "one; a hot-swap keeps the method. Load it as a new adapter (load_adapter) instead"
            )
        if sites is None:
            return
        ours, theirs = [site.modules for site in record.sites], [site.modules for site in sites]
        if ours != theirs:
            raise ConfigError(
                f"{where} adapts {theirs} and {adapter_name!r} adapts {ours}; a hot-swap keeps the modules. "
                "Load it as a new adapter (load_adapter) instead"
            )
        for site, other in zip(record.sites, sites, strict=True):
            if type(site.state) is not type(other.state):
                raise ConfigError(
                    f"on {site.modules[0]} {where} holds a {type(other.state).__name__} and "
                    f"{adapter_name!r} a {type(site.state).__name__}; a hot-swap keeps the kind of state. "
                    "Load it as a new adapter (load_adapter) instead"
                )

    def _hotswap(self, adapter_name: str, config: AdapterConfig, sites: list[Site], where: str) -> None:
        """Make each state of ``adapter_name`` compute what the matching one of ``sites`` does (the hook)."""
        self._check_swappable(adapter_name, config, sites, where)
        record = self._records[adapter_name]
        manager = get_plugin_manager()
        hooks = manager.hooks_for(record.config.method)
        backups = [copy.deepcopy(site.state) for site in record.sites]
        started = 0
        try:
            for site, other in zip(record.sites, sites, strict=True):
                started += 1
                if hooks.hotswap(state=site.state, source=other.state) is not True:
                    raise PluginError(
                        f"the hotswap hook of method {config.method!r} did not return True for "
                        f"{site.modules[0]}; it must return True once the state computes what the source does"
                    )
            # What a save records of the base depends on the rows the adapter replaces (formats/native.py).
            fingerprint = native.base_fingerprint(self.model, record.sites)
        except BaseException:
            for site, backup in zip(record.sites[:started], backups, strict=False):
                hooks.hotswap(state=site.state, source=backup)
            raise
        record.config = copy.deepcopy(config)
        record.fingerprint = fingerprint
        # The adapter banks keep copies of the adapters' tensors for compiled and per-sample serving.
        self.refresh_adapter_tables()

    def adapter_record(self, adapter_name: str) -> AdapterRecord:
        """The record of one adapter (config, sites, base fingerprint), as the formats take it."""
        self._check_known([adapter_name])
        return self._records[adapter_name]

    # ------------------------------------------- Trainer, DDP, FSDP2 (tt_core/formats/trainer.py)
    # transformers.Trainer saves and resumes any nn.Module through state_dict() and
    # load_state_dict(state, strict=False). An AdapterModel's state is its adapters:
    # checkpoints hold the rows (once, even when tied) and a description of them,
    # never the base model, and resuming copies the rows back into the same parameters.
    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The adapters' tensors, each state once, and ``_extra_state`` (configs, bases, stack).

        The base model's weights are not in it: ``adapter_model.model.state_dict()`` has them.
        """
        if args:  # nn.Module's deprecated positional form
            destination, prefix, keep_vars = (*args, destination, prefix, keep_vars)[:3]
        if destination is None:
            destination = collections.OrderedDict()
            destination._metadata = collections.OrderedDict()
        for name, record in self._records.items():
            for site in record.sites:
                site.state.state_dict(
                    destination=destination,
                    prefix=prefix + trainer.module_key(name, site.modules[0], ""),
                    keep_vars=keep_vars,
                )
        destination[prefix + trainer.EXTRA_STATE_KEY] = self.get_extra_state()
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load what :meth:`state_dict` returned: the adapters must exist, with the same configs."""
        from torch.nn.modules.module import _IncompatibleKeys

        expected = self.state_dict(keep_vars=True)
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        if strict and (missing or unexpected):
            raise AdapterStateError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]} ({len(missing)} and {len(unexpected)} in all). An "
                "AdapterModel's state_dict() holds its adapters only; load base-model weights into "
                "adapter_model.model"
            )
        if self._merges.merged:
            raise AdapterStateError(
                f"adapters {self._merges.merged} are merged into the base weights; unmerge_adapter() before "
                "loading adapter rows, or the weights would keep the old ones"
            )
        ours = {key: value for key, value in state_dict.items() if key in expected}
        super().load_state_dict(ours, strict=False, assign=assign)
        self._sync_adapter_tables()
        return _IncompatibleKeys(missing, unexpected)

    def get_extra_state(self) -> torch.Tensor:
        return trainer.encode(trainer.describe(self.model, self._records, self.active_adapters))

    def set_extra_state(self, state: Any) -> None:
        """Refuse a state whose adapters this model lacks or has with other configs."""
        document = trainer.decode(state, "the state_dict")
        trainer.check_matches(self.model, self._records, document, "the state_dict")

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel: the adapters' constant buffers (token ids, the id-to-row
        # table) are built by every rank, so they need no broadcast every step.
        return trainer.ddp_ignored_names(self._records) + list(self.__dict__.get("_ddp_also_ignored", []))

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: list[str]) -> None:
        self.__dict__["_ddp_also_ignored"] = list(names)

    # ------------------------------- compiled inference (tt_core/tensors/bank.py, docs/serving.md)
    #: The capacities prepare_for_compile() asked for (None: not prepared): rows, rank, stack, adapters.
    _compile_request: dict[str, int | None] | None = None

    def prepare_for_compile(
        self,
        max_rows: int | None = None,
        max_rank: int | None = None,
        max_stack: int | None = None,
        max_adapters: int | None = None,
    ) -> None:
        """Fix the sizes of the adapter tables: a compiled model then switches without recompiling.

        Afterwards, under ``torch.compile`` in eval mode without a gradient,
        each adapted layer applies the active stack from its adapter bank
        (:mod:`tt_core.tensors.bank`): ``set_adapter`` to another adapter or
        stack, adding or loading an adapter, and per-sample calls with
        :meth:`adapter_entries` then only write into tensors the compiled graph
        already reads. The capacities (None: what the adapters loaded now need):

        * ``max_rows``: rows one row-replacing adapter (trainable tokens) may replace;
        * ``max_rank``: rank of one low-rank adapter (LoRA);
        * ``max_stack``: adapters in one stack (the active one, or one sample's);
        * ``max_adapters``: adapters on the model (default: twice as many as now, at least 4).

        Going beyond one later rebuilds the tables (a recompile) with a warning naming it.
        """
        request = {"rows": max_rows, "rank": max_rank, "stack": max_stack, "adapters": max_adapters}
        for argument, value in request.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ArgumentTypeError(f"max_{argument} must be a positive int or None, got {value!r}")
            if value is not None and value < 1:
                raise ConfigError(f"max_{argument} must be at least 1, got {value}")
        names = tuple(self._records)
        for module_name, layer in self._named_wrappers():
            states = {
                name: state for name, state in layer.adapters.items() if bankable(state, layer.base_layer)
            }
            needed = needed_capacity(states, names, len(self._active))  # type: ignore[arg-type]
            for argument, held in (("rows", needed.rows), ("rank", needed.rank), ("stack", needed.stack)):
                wanted = request[argument]
                if wanted is not None and wanted < held:
                    raise ConfigError(
                        f"prepare_for_compile(max_{argument}={wanted}): {module_name} already needs {held} "
                        f"({argument}); pass max_{argument}={held} or more, or None"
                    )
            if max_adapters is not None and max_adapters < len(names):
                raise ConfigError(
                    f"prepare_for_compile(max_adapters={max_adapters}): the model has {len(names)} adapters; "
                    f"pass max_adapters={len(names)} or more, or None"
                )
        # Every capacity checked: only now is anything changed.
        self._compile_request = request
        for module_name, layer in self._named_wrappers():
            unbanked = [
                name for name, state in layer.adapters.items() if not bankable(state, layer.base_layer)
            ]
            if unbanked:
                warnings.warn(
                    f"adapters {unbanked} on {module_name} do not fold (neither low-rank nor row-replacing); "
                    "a compiled model recompiles when a stack holding them is activated",
                    stacklevel=2,
                )
            layer.bank = None
            layer.bank_capacity = self._capacity_for(layer, names)
            layer.adapter_order = names
            layer.refresh_bank()

    def refresh_adapter_tables(self) -> None:
        """Recompute every layer's adapter tables from the adapters' current weights.

        The verbs (``set_adapter``, ``add_adapter``, ``load_adapter``,
        ``delete_adapter``, merges, ``train()``/``eval()``, ``load_state_dict``)
        do it themselves;
        call it after changing adapter weights by hand while serving a compiled
        model (a compiled graph cannot check them). In place within the capacities
        of :meth:`prepare_for_compile`: no recompilation.
        """
        names = tuple(self._records)
        for _, layer in self._named_wrappers():
            layer.adapter_order = names
            layer.refresh_bank()

    def adapter_entries(self, adapter_names: list[Any]) -> torch.Tensor:
        """``adapter_names`` (one entry per sample: a name, a stack, or ``"__base__"``) as a tensor.

        The ``(batch, depth)`` long tensor, on the device of the model's adapters,
        that ``model(..., adapter_names=entries)`` and ``generate`` accept in
        place of the names. A compiled model then gets a new assignment of
        adapters to samples without recompiling (the names would be guarded
        on). Valid until an adapter is added or deleted; ``depth`` is the stack
        capacity of :meth:`prepare_for_compile` when one was fixed.
        """
        entries = serving.entries_of(self._serving(), adapter_names)
        for _, _, layer in self._wrappers():
            weight: torch.Tensor = layer.base_layer.weight  # type: ignore[assignment]
            return entries.to(weight.device)
        return entries

    def train(self, mode: bool = True) -> AdapterModel:
        super().train(mode)
        self._sync_adapter_tables()
        return self

    def _compile_stack(self) -> int | None:
        """The stack capacity of the adapter tables (a per-sample call's depth), when prepared."""
        if self._compile_request is None:
            return None
        stacks = [layer.bank_capacity.stack for _, layer in self._named_wrappers() if layer.bank_capacity]
        return max(stacks, default=None)

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterModel:
        # .to(), .cuda(), .half()...: the adapter tables follow the weights to their device and dtype.
        super()._apply(fn, recurse)
        self._sync_adapter_tables()
        return self

    def _named_wrappers(self) -> list[tuple[str, AdapterLayer]]:
        return [
            (name, module) for name, module in self.model.named_modules() if isinstance(module, AdapterLayer)
        ]

    def _sync_adapter_tables(self) -> None:
        """After a verb: the adapter tables follow the adapters and the active stack, if prepared."""
        if self._compile_request is None:
            return
        names = tuple(self._records)
        for _, layer in self._named_wrappers():
            layer.adapter_order = names
            if layer.bank_capacity is None:  # a layer wrapped after prepare_for_compile
                layer.bank_capacity = self._capacity_for(layer, names)
            layer.sync_bank()

    def _capacity_for(self, layer: AdapterLayer, names: tuple[str, ...]) -> BankCapacity:
        request = self._compile_request or {}
        states = {name: state for name, state in layer.adapters.items() if bankable(state, layer.base_layer)}
        needed = needed_capacity(states, names, len(self._active))  # type: ignore[arg-type]
        adapters = max(request.get("adapters") or max(4, 2 * len(names)), len(names))
        return BankCapacity(
            rows=max(request.get("rows") or 0, needed.rows),
            rank=max(request.get("rank") or 0, needed.rank),
            adapters=adapters,
            row_slots=adapters if needed.row_slots else 0,
            rank_slots=adapters if needed.rank_slots else 0,
            stack=max(request.get("stack") or 0, needed.stack),
        )


def get_adapter_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Wrap ``model`` with one active adapter; every base weight is frozen."""
    adapter_model = AdapterModel(model)
    try:
        adapter_model.add_adapter(adapter_name, config)
    except Exception:
        adapter_model._unload()  # gives back the requires_grad flags it froze
        raise
    adapter_model.set_adapter(adapter_name)
    return adapter_model
