"""The Trainer format: ``state_dict`` keys and extra state, the folder ``Trainer.save_model()`` writes.

``Trainer`` treats a model that is neither a ``PreTrainedModel`` nor a
``PeftModel`` as a plain ``nn.Module``: a checkpoint (and ``save_model()``) is
``model.safetensors`` holding ``model.state_dict()``, and resuming or
``load_best_model_at_end`` calls ``model.load_state_dict(state, False)``. So
``AdapterModel.state_dict()`` holds the adapters only: each adapter state's
tensors once (a tied head shares the embedding's rows), under their module
paths, plus one ``_extra_state`` tensor, the JSON bytes of :func:`describe`
(configs, base fingerprints, the active stack). A checkpoint is then the size
of the rows, resuming copies them back in place (the optimizer keeps its
parameters), and a folder ``save_model()`` wrote describes itself:
:func:`read_trainer_folder` turns it into the adapters
``AdapterModel.from_pretrained`` loads. See docs/distributed.md.

Under DDP, the adapters' non-persistent buffers (token ids and the id-to-row
table, rebuilt by every rank from the config) are named in
:func:`ddp_ignored_names`, so DDP does not broadcast a vocabulary-sized table
every step. (Under FSDP2, :func:`tt_core.tensors.distributed.whole_adapter_tensors`
gathers sharded adapter tensors so rank 0 can save whole rows.) The functions
take the model and its adapter records; :class:`~tt_core.AdapterModel` answers
Trainer, DDP and FSDP2 through them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from tt_core.api.errors import SavedFolderError
from tt_core.disk import manifest, storage
from tt_core.disk.manifest import ADAPTER_MANIFEST, CONFIG_FILE, WEIGHTS_FILE
from tt_core.formats.native import SHAPES_KEY
from tt_core.plugins import get_plugin_manager

if TYPE_CHECKING:
    from tt_core.records import AdapterRecord

STATE_FORMAT = "tt-adapters.state"
STATE_VERSION = 1
#: The file ``Trainer`` writes ``state_dict()`` into (transformers' SAFE_WEIGHTS_NAME).
TRAINER_WEIGHTS = "model.safetensors"
#: nn.Module's key for ``get_extra_state()`` (at the root: no prefix).
EXTRA_STATE_KEY = "_extra_state"


def module_key(adapter_name: str, target: str, key: str) -> str:
    """The ``state_dict`` key of an adapter state's tensor ``key`` on module ``target``."""
    return f"model.{target}.adapters.{adapter_name}.{key}"


# ---------------------------------------------------------------- the extra state
def describe(model: nn.Module, records: Mapping[str, AdapterRecord], active: list[str]) -> dict[str, Any]:
    """What the rows alone do not say: each adapter's config, base and targets, and the active stack.

    Nothing that a save and load changes (which adapters train is the caller's choice, not
    state: ``is_trainable`` decides it on loading), so a loaded model's state_dict() equals
    the saved one's, as PEFT's tests compare them.
    """
    adapters: dict[str, Any] = {}
    for name, record in records.items():
        method = get_plugin_manager().method_for(record.config)
        entry: dict[str, Any] = {"method": method.name, "plugin": method.plugin}
        if method.distribution:
            entry.update(distribution=method.distribution, distribution_version=method.version)
        entry["base"] = record.fingerprint
        adapters[name] = {
            "config": _plain(record.config.to_dict()),
            "entry": entry,
            "targets": {site.modules[0]: [int(n) for n in site.weight(model).shape] for site in record.sites},
        }
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "active": list(active),
        "adapters": adapters,
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so saved and live configs compare equal."""
    return json.loads(json.dumps(value))


def encode(document: dict[str, Any]) -> torch.Tensor:
    """JSON bytes as a uint8 tensor: safetensors (so ``Trainer``) stores tensors only."""
    data = bytearray(json.dumps(document, sort_keys=True).encode())
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def decode(value: Any, where: str) -> dict[str, Any]:
    """The document :func:`encode` made, checked; a ValueError naming ``where`` if it is not one."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise SavedFolderError(
            f"{where}: {EXTRA_STATE_KEY!r} is not the uint8 tensor AdapterModel.state_dict() writes"
        )
    try:
        document = json.loads(bytes(value.cpu().numpy().tobytes()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SavedFolderError(f"{where}: {EXTRA_STATE_KEY!r} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise SavedFolderError(f"{where}: {EXTRA_STATE_KEY!r} was not written by tt-adapters")
    version = document.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise SavedFolderError(
            f"{where}: the adapter state has version {version!r}; this tt-adapters reads up to "
            f"{STATE_VERSION}. Upgrade tt-adapters."
        )
    adapters, active = document.get("adapters"), document.get("active")
    if not isinstance(adapters, dict) or not isinstance(active, list):
        raise SavedFolderError(f"{where}: the adapter state has no 'adapters' object or 'active' list")
    for name, adapter in adapters.items():
        keys = ("config", "entry", "targets")
        if not isinstance(adapter, dict) or not all(isinstance(adapter.get(key), dict) for key in keys):
            raise SavedFolderError(f"{where}: adapter {name!r} of the adapter state is malformed")
    return document


def check_matches(
    model: nn.Module, records: Mapping[str, AdapterRecord], document: dict[str, Any], where: str
) -> None:
    """Refuse a state whose adapters this model lacks, or has with another config or base shape.

    Loading rows trained for other token ids (or another vocabulary) would
    silently put them on the wrong tokens.
    """
    live = describe(model, records, [])["adapters"]
    for name, saved in document["adapters"].items():
        if name not in live:
            raise SavedFolderError(
                f"{where} holds adapter {name!r}, which this model does not have (it has "
                f"{list(records)}). Add it with the same config first, or load the folder with "
                "AdapterModel.from_pretrained(base_model, folder)."
            )
        for key in ("config", "targets"):
            if saved[key] != live[name][key]:
                raise SavedFolderError(
                    f"{where}: adapter {name!r} was saved with {key} {saved[key]} but this model's is "
                    f"{live[name][key]}; its rows belong to other tokens or another vocabulary"
                )


# ------------------------------------------------------------ Trainer's folders
def _header(path: Path) -> dict[str, Any]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return {key: None for key in handle.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def is_trainer_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds the ``model.safetensors`` that ``Trainer`` wrote from an AdapterModel."""
    weights = Path(path) / TRAINER_WEIGHTS
    if manifest.exists(Path(path)) or not weights.is_file():
        return False
    try:
        return EXTRA_STATE_KEY in _header(weights)
    except Exception:  # not safetensors at all: not ours either
        return False


def read_trainer_folder(
    path: str | os.PathLike[str], adapter_name: str | None = None
) -> tuple[list[str], dict[str, storage.SavedAdapter]]:
    """The adapters in a ``Trainer`` folder, as ``save_pretrained`` would have written them.

    All of them, or ``adapter_name`` (or the only one). Returns the saved
    active stack (of those read) and each adapter's files, ready for
    ``native.load_adapter``, which checks them like any saved adapter.
    """
    root = Path(path)
    weights = root / TRAINER_WEIGHTS
    try:
        tensors = safetensors.torch.load_file(str(weights))
    except Exception as error:
        raise SavedFolderError(f"{weights} is not a valid safetensors file ({error})") from None
    if EXTRA_STATE_KEY not in tensors:
        raise SavedFolderError(
            f"{weights} was not written from an AdapterModel (it has no {EXTRA_STATE_KEY!r}); "
            "pass a folder that Trainer or save_pretrained() wrote from one"
        )
    document = decode(tensors[EXTRA_STATE_KEY], str(weights))
    adapters: dict[str, Any] = document["adapters"]
    if adapter_name is None:
        names = list(adapters)
    elif adapter_name in adapters:
        names = [adapter_name]
    elif len(adapters) == 1:
        names = list(adapters)
    else:
        raise SavedFolderError(
            f"{weights} holds adapters {sorted(adapters)}, not {adapter_name!r}; pass one of those names"
        )
    saved: dict[str, storage.SavedAdapter] = {}
    for name in names:
        adapter = adapters[name]
        own: dict[str, torch.Tensor] = {}
        for target in adapter["targets"]:
            prefix = module_key(name, target, "")
            for key, tensor in tensors.items():
                if key.startswith(prefix):
                    own[f"{target}.{key[len(prefix) :]}"] = tensor
        files = {
            CONFIG_FILE: (json.dumps(adapter["config"], indent=2) + "\n").encode(),
            WEIGHTS_FILE: safetensors.torch.save(own, metadata={SHAPES_KEY: json.dumps(adapter["targets"])}),
        }
        entry = dict(adapter["entry"])
        entry["files"] = {filename: manifest.sha256(data) for filename, data in files.items()}
        files[ADAPTER_MANIFEST] = (json.dumps(entry, indent=2) + "\n").encode()
        saved[name] = storage.SavedAdapter(root, entry, files, weights)
    active = [name for name in document["active"] if name in saved]
    return active, saved


# ------------------------------------------------------------------- distributed
def ddp_ignored_names(records: Mapping[str, AdapterRecord]) -> list[str]:
    """The adapters' non-persistent buffers, under every module path that reaches them.

    They are built from the config on every rank (token ids, the id-to-row
    table) and never change while training, so DDP need not broadcast them
    each step; it reads this list as ``_ddp_params_and_buffers_to_ignore``.
    """
    names: list[str] = []
    for adapter_name, record in records.items():
        for site in record.sites:
            persistent = set(site.state.state_dict(keep_vars=True))
            for buffer_name, _ in site.state.named_buffers():
                if buffer_name in persistent:
                    continue
                names.extend(module_key(adapter_name, module, buffer_name) for module in site.modules)
    return names
