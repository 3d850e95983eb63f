"""Adapters in PEFT's format: folders ``peft.PeftModel.from_pretrained`` loads, and loading PEFT's folders.

This module holds what any method shares (see docs/peft.md):

- the layout PEFT's ``save_pretrained`` writes: the adapter called
  ``"default"`` in the folder itself, every other one in a subfolder named
  after it, each as ``adapter_config.json`` (with ``peft_type``) and
  ``adapter_model.safetensors`` (keys prefixed ``base_model.model.``, adapter
  names left out);
- copies of base weights PEFT saves beside an adapter (``*.base_layer.weight``),
  checked against the model instead of loaded;
- LoRA's ``trainable_token_indices`` when no plugin reads the rows with the
  LoRA (a LoRA on an embedding): split off as a ``TRAINABLE_TOKENS`` adapter
  of its own (PEFT keeps its rows under ``*.token_adapter.``). The
  ``lora_linear`` plugin reads and writes them itself, as one adapter;
- whether a whole stack of adapters can be written so that PEFT computes the
  same outputs.

What one method's adapter becomes in PEFT's terms, and back, is its plugin's
business: the ``peft_export`` and ``peft_import`` hooks (:mod:`tt_core.api.hookspecs`).
A PEFT folder is converted into the files :func:`tt_core.native.load_adapter`
reads, so loading it goes through every check a native load does, all-or-nothing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import nn

from tt_core.api.config import AdapterConfig
from tt_core.api.errors import AdapterStateError, ConfigError, PluginError, SavedFolderError
from tt_core.api.peft_hooks import is_unset, lora_config
from tt_core.disk import manifest, storage
from tt_core.disk.manifest import CONFIG_FILE, WEIGHTS_FILE
from tt_core.formats import native
from tt_core.plugins import PluginManager, get_plugin_manager
from tt_core.tensors.targets import input_embedding_name, named_base_modules

if TYPE_CHECKING:
    from tt_core.records import AdapterRecord

#: PEFT's name for the adapter kept in the folder itself; the others live in subfolders.
DEFAULT_ADAPTER = "default"
#: What PEFT puts before every tensor key: ``PeftModel.base_model`` (the tuner), then its ``model``.
KEY_PREFIX = "base_model.model."
#: The name of the trainable-tokens half of a LoRA with ``trainable_token_indices``: ``<name>_tokens``.
TOKENS_SUFFIX = "_tokens"
_LEGACY_WEIGHTS = "adapter_model.bin"
_BASE_COPY = re.compile(r"(?P<module>.+?)(?:\.token_adapter)?\.base_layer\.weight")
_ROWS = "trainable_tokens_delta"  # PEFT's key of token rows
_TOKEN_ROWS = re.compile(r"(?P<module>.+)\.token_adapter\.trainable_tokens_delta")
# Trainer's checkpoint folders hold a PEFT adapter too; they are not adapters saved beside the root one.
_CHECKPOINT_MARKER = "trainer_state.json"


# ------------------------------------------------------------------- detection
def _peft_config_file(folder: Path) -> Path | None:
    """``folder/adapter_config.json`` if it is PEFT's (it names a ``peft_type``), else None."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return path if isinstance(document, dict) and "peft_type" in document else None


def _candidates(root: Path) -> dict[str, Path]:
    """PEFT adapters in ``root`` by PEFT's name: ``"default"`` for the root itself, else the subfolder's."""
    found: dict[str, Path] = {}
    if _peft_config_file(root) is not None:
        found[DEFAULT_ADAPTER] = root
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and not (child / _CHECKPOINT_MARKER).exists() and _peft_config_file(child):
                if child.name in found:
                    raise SavedFolderError(
                        f"{root} holds a PEFT adapter in the folder itself and one in {child}; both would be "
                        f"called {child.name!r}. Move one of them."
                    )
                found[child.name] = child
    return found


def adapter_names(path: str | os.PathLike[str]) -> list[str]:
    """The PEFT adapters in ``path``, by PEFT's name (``"default"`` for one saved in the folder itself)."""
    return sorted(_candidates(Path(path)))


def is_peft_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder of PEFT adapters (and not a tt-adapters save).

    True when it has no ``manifest.json`` and it, or a subfolder, holds an
    ``adapter_config.json`` naming a ``peft_type``.
    """
    root = Path(path)
    if not root.is_dir() or manifest.exists(root):
        return False
    try:
        return bool(_candidates(root))
    except ValueError:
        return True  # ambiguous, but PEFT's: reading it reports why


# ------------------------------------------------------------------------ save
def _export(
    model: nn.Module, name: str, record: AdapterRecord
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    manager = get_plugin_manager()
    method = manager.method_for(record.config)
    sites = [
        (list(site.modules), {key: value.detach() for key, value in site.state.state_dict().items()})
        for site in record.sites
    ]
    try:
        result = manager.hooks_for(method.name).peft_export(
            model=model, config=copy.deepcopy(record.config), sites=sites
        )
    except ValueError as error:
        raise AdapterStateError(
            f"adapter {name!r} cannot be saved in PEFT's format: {error}. Nothing was written."
        ) from None
    if result is None:
        raise AdapterStateError(
            f"adapter {name!r} uses method {method.name!r}, whose plugin {method.plugin!r} has no PEFT "
            "form for it (no peft_export hook); save it with format='tt'. Nothing was written."
        )
    peft_config, tensors = result
    if not isinstance(peft_config, dict) or not isinstance(peft_config.get("peft_type"), str):
        raise PluginError(f"the peft_export hook of {method.plugin!r} returned a config without a peft_type")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise PluginError(f"the peft_export hook of {method.plugin!r} must return tensors by key")
    config = _with_base_fields(model, peft_config)
    return config, tensors


def _join_tokens(
    model: nn.Module,
    records: Mapping[str, AdapterRecord],
    exported: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]],
) -> dict[str, str]:
    """Write a LoRA ``name`` and trainable tokens ``name_tokens`` saved together as one PEFT adapter.

    The inverse of :func:`_split_tokens`: PEFT holds them as one ``LoraConfig``
    with ``trainable_token_indices`` (a list for the input embedding, else
    ``{module: ids}``) and the rows under ``<module>.token_adapter.``; PEFT
    gives the rows to a head tied to the input embedding itself, so only the
    targets' rows are written. Changes ``exported`` in place; returns
    ``{tokens name: LoRA name}`` for the pairs joined.
    """
    joined = {}
    for name in list(exported):
        tokens_name = name + TOKENS_SUFFIX
        if tokens_name not in exported:
            continue
        (config, tensors), (tokens_config, token_tensors) = exported[name], exported[tokens_name]
        if (
            config["peft_type"] != "LORA"
            or tokens_config["peft_type"] != "TRAINABLE_TOKENS"
            or not is_unset(config.get("trainable_token_indices"))  # the LoRA holds rows of its own
        ):
            continue
        for site in records[name].sites:
            for tokens_site in records[tokens_name].sites:
                if site.weight(model) is tokens_site.weight(model):
                    raise AdapterStateError(
                        f"adapters {name!r} (LoRA on {site.modules}) and {tokens_name!r} (trainable tokens "
                        f"on {tokens_site.modules}) change one weight; PEFT saves them together as one "
                        "LoraConfig with trainable_token_indices, which it refuses on a module its LoRA "
                        "adapts. Save them in separate calls with selected_adapters=[...]. Nothing was "
                        "written."
                    )
        targets, ids = tokens_config["target_modules"], tokens_config["token_indices"]
        try:
            embedding = input_embedding_name(model)
        except ValueError:
            embedding = ""
        indices: Any = ids if targets == [embedding] else {target: ids for target in targets}
        rows = {f"{target}.token_adapter.{_ROWS}": token_tensors[f"{target}.{_ROWS}"] for target in targets}
        exported[name] = ({**config, "trainable_token_indices": indices}, {**tensors, **rows})
        del exported[tokens_name]
        joined[tokens_name] = name
    return joined


def _check_stack(
    model: nn.Module, records: Mapping[str, AdapterRecord], stack: list[str], peft_types: dict[str, str]
) -> None:
    """Refuse a stack (the saved adapters that are active) that PEFT cannot apply as tt-adapters does."""
    if len(stack) < 2:
        return
    kinds = {name: peft_types[name] for name in stack}
    if len(set(kinds.values())) > 1:
        raise AdapterStateError(
            f"the active stack {stack} mixes PEFT adapter types {kinds}; a PEFT model holds adapters of one "
            "type only, so PEFT cannot apply this stack. Activate adapters of one type (set_adapter), or "
            "save each in its own call with selected_adapters=[...]. Nothing was written."
        )
    for i, first in enumerate(stack):
        for second in stack[i + 1 :]:
            for site_a in records[first].sites:
                for site_b in records[second].sites:
                    if site_a.weight(model) is site_b.weight(model) and not site_a.state.commutes_with(
                        site_b.state
                    ):
                        raise AdapterStateError(
                            _ORDER_MATTERS.format(stack, first, second, site_a.modules[0])
                        )


_ORDER_MATTERS = (
    "the active stack {} applies {!r} then {!r} to the same rows of {}.weight, so their order decides the "
    "outputs; PEFT applies its active adapters as a set (its trainable tokens refuse overlapping rows), so "
    "it cannot express this stack. Save with format='tt', or activate one of them. Nothing was written."
)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        storage.write_file(temporary, data)
        os.replace(temporary, path)
    finally:
        storage.remove(temporary)


def save(
    model: nn.Module,
    records: Mapping[str, AdapterRecord],
    active: list[str],
    directory: str | os.PathLike[str],
    names: list[str],
) -> None:
    """Write ``names`` in PEFT's layout under ``directory``; check everything before writing anything.

    The adapter called ``"default"`` goes into ``directory`` itself, every
    other one into ``directory/<name>``, as PEFT's ``save_pretrained`` does;
    other files there are kept, these two are replaced.
    """
    root = Path(directory)
    if manifest.exists(root):
        raise ConfigError(
            f"{root} holds a tt-adapters save (manifest.json); a PEFT save beside it would make the folder "
            "ambiguous. Save in PEFT's format into another folder. Nothing was written."
        )
    exported = {name: _export(model, name, records[name]) for name in names}
    kinds = {name: config["peft_type"] for name, (config, _) in exported.items()}
    for tokens_name, name in _join_tokens(model, records, exported).items():
        kinds[tokens_name] = kinds[name]  # one PEFT adapter now: a LoRA with trainable_token_indices
    _check_stack(model, records, [name for name in active if name in names], kinds)
    files: dict[Path, tuple[bytes, bytes]] = {}
    for name, (config, tensors) in exported.items():
        folder = root if name == DEFAULT_ADAPTER else root / name
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} exists and is not a folder; move it away. Nothing was written.")
        weights = {
            KEY_PREFIX + key: tensor.detach().to("cpu").clone().contiguous()
            for key, tensor in tensors.items()
        }
        files[folder] = (
            (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            safetensors.torch.save(weights, metadata={"format": "pt"}),
        )
    for folder, (config_bytes, weight_bytes) in files.items():
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / WEIGHTS_FILE, weight_bytes)
        _write_atomically(folder / CONFIG_FILE, config_bytes)


def rows_as_lora(
    model: nn.Module, name: str, record: AdapterRecord, merged: list[str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A row-replacing adapter (trainable tokens) as an exactly equivalent PEFT LoRA: ``(config, tensors)``.

    An adapter that replaces the rows ``ids`` of a weight ``W`` by
    ``R = adapt_rows(ids, W[ids])`` adds ``onehot(ids).T @ (R - W[ids])`` to it:
    a LoRA of rank ``k = len(ids)`` whose one factor selects the rows and whose
    other holds the row deltas, with ``lora_alpha = r`` (scaling 1, so PEFT
    multiplies by 1.0). On an embedding that is ``lora_embedding_A = onehot``
    (k x vocabulary) and ``lora_embedding_B = (R - W[ids]).T``; on a head using
    the weight, ``lora_A.weight = R - W[ids]`` and ``lora_B.weight = onehot.T``:
    every module the state reaches gets its copy, as PEFT adapts only the
    modules it names. The outputs are the adapter's up to the rounding of
    ``W + (R - W)``: a head's bias is kept (PEFT's own trainable tokens drop
    it), and PEFT scales an embedding's update by its ``embed_scale`` as it
    scales the rows. Works from the :class:`AdapterState` API alone
    (``touched_rows``, ``adapt_rows``), so for any row-replacing method. The
    factors are k x vocabulary, on disk and in PEFT's memory.
    """
    if name in merged:
        raise AdapterStateError(
            f"adapter {name!r} is merged into the base weights; unmerge_adapter() first, so its rows can be "
            "told from the base ones. Nothing was written."
        )
    modules = dict(named_base_modules(model))
    targets: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    rank = None
    for site in record.sites:
        state = site.state
        ids = state.touched_rows()
        if state.additive or ids is None:
            raise AdapterStateError(
                f"adapter {name!r} ({record.config.method}) changes every row of {site.modules[0]}.weight, "
                "not chosen rows; only row-replacing adapters (trainable tokens) have this LoRA form. "
                "Nothing was written."
            )
        weight = site.weight(model)
        with torch.no_grad():
            base_rows = weight.detach()[ids].float()
            deltas = state.adapt_rows(ids, base_rows).float() - base_rows  # k x width
            selector = torch.zeros(len(ids), weight.shape[0], dtype=torch.float32, device=weight.device)
            selector[torch.arange(len(ids), device=weight.device), ids] = 1.0  # k x vocabulary
        if rank is not None and rank != len(ids):
            raise AdapterStateError(
                f"adapter {name!r} replaces {rank} rows of one weight and {len(ids)} of another; a PEFT LoRA "
                "has one rank. Nothing was written."
            )
        rank = len(ids)
        for module_name in site.modules:
            module = modules[module_name]
            if isinstance(module, nn.Embedding):
                tensors[f"{module_name}.lora_embedding_A"] = selector.clone()
                tensors[f"{module_name}.lora_embedding_B"] = deltas.T.contiguous()
            elif isinstance(module, nn.Linear):
                tensors[f"{module_name}.lora_A.weight"] = deltas.clone()
                tensors[f"{module_name}.lora_B.weight"] = selector.T.contiguous()
            else:
                raise AdapterStateError(
                    f"{module_name} is a {type(module).__name__}; the LoRA form covers nn.Embedding and "
                    "nn.Linear. Nothing was written."
                )
            targets.append(module_name)
    if rank is None:
        raise AdapterStateError(f"adapter {name!r} adapts no weight; there is nothing to write")
    return lora_config(rank, rank, targets), tensors  # lora_alpha = r: scaling 1


def _with_base_fields(model: nn.Module, peft_config: dict[str, Any]) -> dict[str, Any]:
    """``peft_config`` with the fields PEFT writes about the base model and the mode."""
    base_name = getattr(model, "name_or_path", None) or None
    return {
        "task_type": None,
        "base_model_name_or_path": base_name if isinstance(base_name, str) else None,
        "revision": None,
        "inference_mode": True,
        **peft_config,
    }


def save_rows_as_lora(
    model: nn.Module,
    records: Mapping[str, AdapterRecord],
    merged: list[str],
    directory: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
) -> None:
    """Write one trainable-tokens adapter as a PEFT LoRA folder (:func:`rows_as_lora`), all-or-nothing.

    The folder is ``directory`` for ``"default"``, else ``directory/<name>``,
    as PEFT's layout has it; ``peft.PeftModel.from_pretrained`` loads it with
    the adapter's outputs (LoRA on the embedding and on every module sharing
    its weight), and so does :meth:`AdapterModel.from_pretrained`, as LoRA on
    the embedding.
    """
    if adapter_name not in records:
        raise AdapterStateError(f"unknown adapter {adapter_name!r}; the model has {list(records)}")
    root = Path(directory)
    if manifest.exists(root):
        raise ConfigError(
            f"{root} holds a tt-adapters save (manifest.json); save the PEFT folder elsewhere. Nothing was "
            "written."
        )
    peft_config, tensors = rows_as_lora(model, adapter_name, records[adapter_name], merged)
    config = _with_base_fields(model, peft_config)
    weights = {KEY_PREFIX + key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    folder = root if adapter_name == DEFAULT_ADAPTER else root / adapter_name
    weight_bytes = safetensors.torch.save(weights, metadata={"format": "pt"})
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / WEIGHTS_FILE, weight_bytes)
    _write_atomically(folder / CONFIG_FILE, config_bytes)


# ------------------------------------------------------------------------ read
def _read_peft(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One PEFT adapter's config and tensors, keys without PEFT's prefix."""
    config_path = folder / CONFIG_FILE
    config = manifest.load_json_object(config_path, config_path.read_bytes())
    if not isinstance(config.get("peft_type"), str):
        raise SavedFolderError(
            f"{config_path}: key 'peft_type' is {config.get('peft_type')!r}; it must name a PEFT type"
        )
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        if (folder / _LEGACY_WEIGHTS).is_file():
            raise SavedFolderError(
                f"{folder} holds {_LEGACY_WEIGHTS}, a pickle, which tt-adapters never loads (it can run "
                "code); save the adapter again with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise SavedFolderError(
            f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}; save the PEFT adapter again"
        )
    try:
        raw = safetensors.torch.load(weights_path.read_bytes())
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise SavedFolderError(f"{weights_path} is not a valid safetensors file ({error})") from None
    tensors = {}
    for key, tensor in raw.items():
        if not key.startswith(KEY_PREFIX):
            raise SavedFolderError(
                f"{weights_path} holds {key!r}, which does not start with {KEY_PREFIX!r}: it is not an "
                "adapter PEFT saved for a model's modules (prompt-learning methods cannot be applied here)"
            )
        tensors[key[len(KEY_PREFIX) :]] = tensor
    return config, tensors


def _split_tokens(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Split ``trainable_token_indices`` off a PEFT config as a ``TRAINABLE_TOKENS`` config of its own."""
    indices = config.get("trainable_token_indices")
    if is_unset(indices):
        return config, tensors, None, {}
    rest = {key: value for key, value in tensors.items() if not _TOKEN_ROWS.fullmatch(key)}
    rows = {}
    for key, tensor in tensors.items():
        match = _TOKEN_ROWS.fullmatch(key)
        if match:
            rows[f"{match['module']}.trainable_tokens_delta"] = tensor
    modules = [key.rsplit(".", 1)[0] for key in rows]
    if not modules:
        raise SavedFolderError(
            f"{where}: trainable_token_indices is {indices!r}, but the folder holds no token rows"
        )
    token_indices: Any
    if isinstance(indices, dict):
        token_indices = {}
        for module in modules:
            given = [ids for name, ids in indices.items() if module == name or module.endswith("." + name)]
            if len(given) != 1:
                raise SavedFolderError(
                    f"{where}: the folder holds token rows for {module}, which trainable_token_indices "
                    f"({sorted(indices)}) names {len(given)} times; it must name it once"
                )
            token_indices[module] = given[0]
    else:
        token_indices = indices
    tokens_config = {
        "peft_type": "TRAINABLE_TOKENS",
        "token_indices": token_indices,
        "target_modules": modules,
    }
    return {**config, "trainable_token_indices": None}, rest, tokens_config, rows


def _check_base_copies(copies: dict[str, torch.Tensor], model: nn.Module, where: str, strict: bool) -> None:
    """A PEFT folder may hold copies of base weights; they must be this model's (PEFT would load them)."""
    modules = dict(named_base_modules(model))
    for name, saved in copies.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise SavedFolderError(
                f"{where} holds a copy of {name}.weight, but this model has no module {name!r}"
            )
        if tuple(weight.shape) != tuple(saved.shape):
            raise SavedFolderError(
                f"{where} was saved for {name}.weight of shape {tuple(saved.shape)}, but this model's is "
                f"{tuple(weight.shape)}. Load it onto the base model it was trained with "
                "(resize_token_embeddings to its tokenizer first)."
            )
        if not torch.equal(saved.to(device=weight.device, dtype=weight.dtype), weight.detach()):
            problem = (
                f"{where} holds a copy of {name}.weight (PEFT saves the embedding beside a LoRA on it) that "
                "differs from this model's, and PEFT would load that copy into the model"
            )
            if strict:
                raise SavedFolderError(
                    f"{problem}; tt-adapters never changes base weights. Load it onto that base model "
                    "(unmerged), or pass strict=False to load the adapter anyway."
                )
            warnings.warn(f"{problem} (loaded anyway, strict=False)", stacklevel=4)


def _native(
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    folder: Path,
    base: dict[str, torch.Tensor],
) -> storage.SavedAdapter:
    """The files a native save of this adapter would hold, in memory, as :func:`storage.read` returns them."""
    method = get_plugin_manager().method_for(config)
    weights = {key: tensor.detach().to("cpu").clone().contiguous() for key, tensor in tensors.items()}
    metadata = None
    if base:  # converted without a model: the base is checked at loading, as for a native save
        shapes = {name: list(tensor.shape) for name, tensor in base.items()}
        metadata = {native.SHAPES_KEY: json.dumps(shapes)}
    files = {
        CONFIG_FILE: (json.dumps(config.to_dict(), indent=2) + "\n").encode(),
        WEIGHTS_FILE: safetensors.torch.save(weights, metadata=metadata),
    }
    entry: dict[str, Any] = {"method": method.name, "plugin": method.plugin}
    if method.distribution:
        entry.update(distribution=method.distribution, distribution_version=method.version)
    entry["files"] = {filename: manifest.sha256(data) for filename, data in files.items()}
    if base:
        entry["base"] = {
            "weights": {name: native.weight_fingerprint(tensor, None) for name, tensor in base.items()}
        }
    return storage.SavedAdapter(folder, entry, files, folder / CONFIG_FILE)


def _convert(
    folder: Path, name: str, model: nn.Module | None, strict: bool
) -> dict[str, storage.SavedAdapter]:
    """One PEFT adapter as the native adapters it becomes: ``name``, and ``name_tokens`` for token rows."""
    where = str(folder / CONFIG_FILE)
    config, tensors = _read_peft(folder)
    modules_to_save = config.get("modules_to_save")
    if not is_unset(modules_to_save) or any(".modules_to_save." in key for key in tensors):
        raise SavedFolderError(
            f"{where}: modules_to_save={modules_to_save!r} trains whole copies of modules, which tt-adapters "
            "cannot apply (it adapts token embeddings only). Nothing was loaded."
        )
    base = {}
    for key in list(tensors):
        match = _BASE_COPY.fullmatch(key)
        if match:
            base[match["module"]] = tensors.pop(key)
    if model is not None and base:
        _check_base_copies(base, model, where, strict)
    manager = get_plugin_manager()
    parts = [(name, config, _import(manager, config, tensors, model, where))]
    if parts[0][2] is None and not is_unset(config.get("trainable_token_indices")):
        # No plugin reads the token rows with the LoRA (one on an embedding): they become an adapter of
        # their own, name + TOKENS_SUFFIX.
        config, tensors, tokens_config, token_rows = _split_tokens(config, tensors, where)
        parts = [(name, config, _import(manager, config, tensors, model, where))]
        if tokens_config is not None:
            tokens = _import(manager, tokens_config, token_rows, model, where)
            parts.append((name + TOKENS_SUFFIX, tokens_config, tokens))
    converted = {}
    for part_name, part_config, result in parts:
        if result is None:
            raise SavedFolderError(
                f"{where}: no installed tt plugin reads PEFT adapters of type {part_config['peft_type']!r} "
                f"(installed methods: {sorted(manager.methods)}). Nothing was loaded."
            )
        adapter_config, native_tensors = result
        converted[part_name] = _native(adapter_config, native_tensors, folder, base if model is None else {})
    return converted


def _import(
    manager: PluginManager,
    peft_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    model: nn.Module | None,
    where: str,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]] | None:
    """The peft_import hooks' answer for one PEFT config, or None when no plugin reads it."""
    try:
        result = manager.hook.peft_import(peft_config=dict(peft_config), tensors=dict(tensors), model=model)
    except ValueError as error:
        raise SavedFolderError(f"{where}: {error}. Nothing was loaded.") from None
    if result is None:
        return None
    adapter_config, native_tensors = result
    if not isinstance(adapter_config, AdapterConfig) or not isinstance(native_tensors, dict):
        raise PluginError(
            f"the peft_import hook answering for {peft_config['peft_type']!r} must return (config, tensors)"
        )
    return adapter_config, native_tensors


def read(
    path: str | os.PathLike[str],
    adapter_name: str | None = None,
    model: nn.Module | None = None,
    strict: bool = True,
) -> tuple[dict[str, storage.SavedAdapter], list[str]]:
    """Convert the PEFT adapters of the folder ``path``; return them by name and the names to activate.

    With ``adapter_name=None``: every adapter, under PEFT's names
    (``"default"`` for the one in the folder itself), activating the
    default one (else all). Otherwise the adapter called ``adapter_name``,
    or the folder's only one, as ``adapter_name``. A LoRA with
    ``trainable_token_indices`` that no plugin reads whole (one on an
    embedding) becomes two adapters, ``<name>`` and ``<name>_tokens``.
    ``model`` (the model to load onto) lets the plugins check more and pick
    the closest equivalent; without it, base-weight
    copies are recorded as the adapter's base, checked at loading.
    """
    root = Path(path)
    found = _candidates(root)
    if not found:
        raise SavedFolderError(f"{root} holds no PEFT adapter ({CONFIG_FILE} with a 'peft_type')")
    converted: dict[str, storage.SavedAdapter] = {}
    if adapter_name is None:
        for name, folder in found.items():
            converted.update(_convert(folder, name, model, strict))
        chosen = [DEFAULT_ADAPTER] if DEFAULT_ADAPTER in found else list(found)
        active = [name for name in converted if any(name in (c, c + TOKENS_SUFFIX) for c in chosen)]
        return converted, active
    if adapter_name in found:
        folder = found[adapter_name]
    elif len(found) == 1:
        folder = next(iter(found.values()))
    else:
        raise SavedFolderError(
            f"{root} holds PEFT adapters {sorted(found)}, not {adapter_name!r}; pass one of those names"
        )
    converted = _convert(folder, adapter_name, model, strict)
    return converted, list(converted)


def read_one(path: str | os.PathLike[str], adapter_name: str | None = None) -> storage.SavedAdapter:
    """One PEFT adapter of ``path`` (``adapter_name``, or the only one) as native files, without a model.

    For publishing to a registry: the base-weight copies PEFT saved become the
    adapter's recorded base, checked when it is loaded.
    """
    root = Path(path)
    found = _candidates(root)
    if adapter_name is None and len(found) > 1:
        raise SavedFolderError(f"{root} holds PEFT adapters {sorted(found)}; say which with adapter=...")
    converted, _ = read(root, adapter_name or next(iter(found), DEFAULT_ADAPTER))
    if len(converted) != 1:
        raise SavedFolderError(
            f"the PEFT adapter in {root} is a LoRA on an embedding with trainable_token_indices, which "
            "tt-adapters holds as "
            f"two adapters {sorted(converted)}; load it (AdapterModel.from_pretrained) and publish each "
            "with Registry.publish(adapter_model, name, adapter=...)"
        )
    return next(iter(converted.values()))
