"""The hook contract between tt_core and adapter-method plugins, and its two pluggy markers.

A method plugin is a module or object with functions marked ``@tt_core.hookimpl``
(the :data:`hookimpl` marker defined here) and named after the specs below.
The core asks a method's hooks only of the plugin that registered that
method, then of the core defaults (:mod:`tt_core.defaults`), so a plugin
never sees another method's configs and implements only what differs from
the defaults. Every hook except
``register_methods`` is ``firstresult``: the plugin's answer wins, ``None``
falls through to the default.

The order of calls when ``add_adapter`` runs for a config::

    detect_target(model, config)                   -> names of the modules to wrap
    create_layer(config, adapter_name, name, base)  -> one AdapterState per target
    tie_handler(model, config, name, base)          -> modules that share its weight

and on ``merge_adapter`` / ``unmerge_adapter``, once per adapted weight::

    merge(state, weight, unmerge)                    -> True once done

and on ``add_weighted_adapter``, once for the whole new adapter::

    combine(configs, sites, combination)            -> (config, one AdapterState per site)

and on ``hotswap_adapter``, once per adapted weight, after the source's states
were built with ``create_layer`` for the same modules::

    hotswap(state, source)                           -> True once done
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tt_core.api.combining import Combination, CombineSite
    from tt_core.api.config import AdapterConfig
    from tt_core.api.register import MethodRegister
    from tt_core.tensors.state import AdapterState

PROJECT_NAME = "tt_core"
#: Marks the specs below.
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a plugin's answers; exported as ``tt_core.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_methods(register: MethodRegister) -> None:
    """Declare the adapter methods this plugin provides. Required.

    Call ``register(ConfigClass)`` once per method. The method's name is the
    config class's ``method`` attribute; manifests and ``adapter_config.json``
    store it. ``ConfigClass`` must subclass :class:`tt_core.AdapterConfig`.
    Called once, when the plugin is registered; a name another plugin already
    owns gets this plugin skipped and reported.
    """


@hookspec(firstresult=True)
def detect_target(model: nn.Module, config: AdapterConfig) -> list[str] | None:
    """Return the full names of the modules to wrap for ``config``.

    Default: :func:`tt_core.tensors.targets.resolve_targets`, which honours
    ``config.target_modules`` and otherwise picks the module that
    ``model.get_input_embeddings()`` returns. Raise ``ValueError`` for a target
    that does not exist, naming the modules that do.
    """


@hookspec(firstresult=True)
def create_layer(
    config: AdapterConfig, adapter_name: str, target_name: str, base_layer: nn.Module
) -> AdapterState | None:
    """Return the adapter state (an :class:`tt_core.AdapterState`) for one base module. Required.

    Validate the config against ``base_layer`` here (index ranges, shapes) and
    raise ``ValueError`` with the fix; the model has not been touched yet, so
    an error leaves it as it was. Create parameters on the base weight's
    device, in float32. The core wraps ``nn.Embedding``, ``nn.Linear`` and
    transformers' ``Conv1D`` (weight stored (in, out)); the last only for a
    state declaring :attr:`~tt_core.AdapterState.adapts_conv1d`.
    """


@hookspec(firstresult=True)
def tie_handler(
    model: nn.Module, config: AdapterConfig, target_name: str, base_layer: nn.Module
) -> list[str] | None:
    """Return the names of other modules that must share the target's adapter state.

    Default: every module holding the very same weight Parameter (a tied LM
    head, T5's encoder and decoder embeddings), found with
    :func:`tt_core.tensors.targets.find_tied_modules`. Every returned module is
    wrapped with the *same* state object, so its parameters exist, train and
    save once. A plugin may decline a tie (leave a module out); then merging
    into the shared weight would change that module's outputs, so the core
    refuses to merge such an adapter, with an error saying why.
    """


@hookspec(firstresult=True)
def merge(state: AdapterState, weight: torch.Tensor, unmerge: bool) -> bool | None:
    """Fold ``state`` into ``weight`` in place (``unmerge=False``), or undo that.

    Default: ``state.merge_into(weight)`` / ``state.unmerge_from(weight)``.
    Called once per adapted weight, however many modules share it, with the
    weight the model holds now. Keep whatever is needed to undo the merge
    exactly; the core unmerges in the reverse order of merging. Return
    ``True`` when handled; anything else is an error and the core undoes the
    merges it already made.
    """


@hookspec(firstresult=True)
def combine(
    configs: list[AdapterConfig], sites: list[CombineSite], combination: Combination
) -> tuple[AdapterConfig, list[AdapterState]] | None:
    """Combine adapters of this method into a new one: return its config and one state per site.

    Asked of the plugin that registered the sources' method (the core refuses
    sources of different methods or targets). ``configs[i]`` is the config of
    ``combination.adapters[i]``; ``sites`` holds, per adapted weight, the
    modules using it, the base module and every source's state there
    (:class:`tt_core.api.combining.CombineSite`); ``combination`` the type,
    the weights and the type's options, already checked
    (:class:`tt_core.api.combining.Combination`;
    :mod:`tt_core.tensors.task_vectors` has PEFT's task-vector arithmetic).

    Return ``(config, states)``: a config of this method that
    :meth:`AdapterModel.add_adapter` would turn into states of the same
    shapes on the same modules (saves load back through it), and
    ``states[j]`` the new state for ``sites[j]``, on the base weight's device,
    float32. Change nothing: not the sources, not the model (the core adds
    the new adapter, inactive and frozen, as ``add_adapter`` would). Raise
    ``ValueError`` naming what cannot be combined and the fix, e.g. with
    :meth:`~tt_core.api.combining.Combination.refuse_unsupported` for a type
    the method does not support. Default: refuses, saying the method does not
    implement combining.
    """


@hookspec(firstresult=True)
def hotswap(state: AdapterState, source: AdapterState) -> bool | None:
    """Make ``state`` compute what ``source`` computes, in place.

    ``source`` is a state of the same method, built by ``create_layer`` for
    the same base module (from another adapter, or from a saved folder).
    Tensors that keep their shape must keep their identity (copy into them):
    a model compiled with ``torch.compile`` reads them as graph inputs, so it
    then runs the new adapter without recompiling. Keep whatever decides the
    outputs in tensors rather than Python numbers, which a compiled graph
    holds as constants (the LoRA plugins keep ``scaling`` in a buffer).
    A method whose sizes may differ (another rank, another number of rows)
    replaces those tensors instead (``copy_tensors_from(source,
    resize=True)``); otherwise raise ``ValueError`` (:class:`tt_core.ConfigError`)
    naming what differs and the fix, before changing anything. Default:
    :meth:`AdapterState.copy_tensors_from`, which copies every parameter and
    buffer of equal name and shape and refuses anything else. Return
    ``True`` when done. Never called for a merged adapter.
    """


# --------------------------------------------------------------- PEFT's format
# ``save_pretrained(path, format="peft")`` and loading a PEFT folder go through
# these two hooks; :mod:`tt_core.formats.peft` does the rest (folder layout,
# safetensors, the ``base_model.model.`` prefix, base weight copies, PEFT's
# ``trainable_token_indices``). Tensor keys here are module paths relative to
# the model, without PEFT's prefix and without adapter names, e.g.
# ``"model.embed_tokens.lora_embedding_A"`` or ``"lm_head.lora_A.weight"``.


@hookspec(firstresult=True)
def peft_export(
    model: nn.Module, config: AdapterConfig, sites: list[tuple[list[str], dict[str, torch.Tensor]]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Return one of this method's adapters as a PEFT adapter: ``(adapter_config, tensors)``.

    Asked only of the plugin that registered ``config``'s method. ``sites``
    holds, per adapted weight, the names of the modules applying the state
    (the target first, then the modules tied to it) and the state's
    ``state_dict()``. ``model`` is the wrapped model (see
    :func:`tt_core.tensors.targets.named_base_modules`). ``adapter_config`` is what
    PEFT's ``adapter_config.json`` holds for it (``peft_type`` at least; the
    core adds ``base_model_name_or_path``, ``inference_mode`` and the like);
    ``tensors`` are PEFT's, keyed as above, one tensor per key (PEFT saves a
    tied module's tensors again under its own name). The outputs of
    ``peft.PeftModel.from_pretrained`` must equal this adapter's. Raise
    ``ValueError`` saying why when PEFT's format cannot express the adapter
    so that PEFT computes the same outputs; return ``None`` (the default) when
    the method has no PEFT form at all.
    """


@hookspec(firstresult=True)
def peft_import(
    peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]] | None:
    """Recognise a PEFT adapter of this plugin's kind and return it as ``(config, tensors)``.

    Asked of every plugin, the first answer wins: return ``None`` unless
    ``peft_config`` (one ``adapter_config.json``; when no plugin reads a
    LoRA's ``trainable_token_indices`` with it, the two parts the core then
    splits it into, the rows as a ``"TRAINABLE_TOKENS"`` config) is of your
    kind, usually by its
    ``peft_type``. Plugins reading one ``peft_type`` answer for disjoint
    folders (``lora_embedding`` and ``lora_linear`` split PEFT's ``LORA`` by
    the modules its tensors adapt), so the order they are asked in never
    matters. ``tensors`` are the folder's tensors for it, keyed as
    above, without copies of base weights (the core checks those). Return
    your config and the tensors your states load, keyed
    ``"<target>.<state_dict key>"`` with ``<target>`` the first module of each
    site as :meth:`AdapterModel.add_adapter` will find it. ``model`` is the
    model the adapter is loaded onto, or ``None`` when converting without one
    (publishing to a registry): then trust the folder's layout, and leave
    checks that need the model to loading. Anything you cannot apply so that
    the outputs equal PEFT's (an option, a module, a key you do not know) is a
    ``ValueError`` naming it: never load part of an adapter.
    """
