"""Adapters to files and back: configs, safetensors, and the base model's fingerprint.

``storage`` makes the files safe on disk; this module decides what goes in
them and checks, before the model is touched, that what comes out fits it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from tt_core.api.config import AdapterConfig
from tt_core.api.errors import SavedFolderError
from tt_core.disk import manifest, storage
from tt_core.disk.manifest import ADAPTER_MANIFEST, CONFIG_FILE, WEIGHTS_FILE
from tt_core.plugins import get_plugin_manager
from tt_core.tensors.state import AdapterState
from tt_core.tensors.targets import named_base_modules
from tt_core.tensors.wrapper import AdapterLayer

if TYPE_CHECKING:
    from tt_core.records import AdapterRecord, Site

SHAPES_KEY = "tt_base_shapes"
_FINGERPRINT_ROWS = 4096


# ------------------------------------------------------------------ fingerprint
def _bfloat16_rows(weight: torch.Tensor, rows: int) -> np.ndarray:
    """The first ``rows`` rows as bfloat16 bit patterns (so a float32 base and its bfloat16 copy agree)."""
    sample = weight.detach()[:rows].to(torch.bfloat16).cpu().contiguous()
    return sample.view(torch.int16).numpy()


def _rows_digest(weight: torch.Tensor, rows: int) -> str:
    """SHA-256 of the first ``rows`` rows, as bfloat16."""
    return manifest.sha256(_bfloat16_rows(weight, rows).tobytes())


def _fingerprint_rows(weight: torch.Tensor, touched: torch.Tensor | None) -> int:
    rows = min(int(weight.shape[0]), _FINGERPRINT_ROWS)
    if touched is not None and touched.numel():
        rows = min(rows, int(touched.min()))
    return rows


def weight_fingerprint(
    weight: torch.Tensor, touched: torch.Tensor | None, digest: str | None = None
) -> dict[str, Any]:
    """What identifies the pretrained base of one adapted weight: a hash of its first rows.

    At most the first 4,096 rows (the cost stays flat in the vocabulary),
    and none from the first row the adapter replaces on: tokens added to a
    tokenizer sit at the end, and ``resize_token_embeddings`` fills their rows
    at random, so a fresh resized copy of the same base shares only the rows
    before them. ``digest``: the hash of those rows, when ``weight`` is not
    the base as it is (see :func:`base_fingerprint`).
    """
    rows = _fingerprint_rows(weight, touched)
    return {
        "shape": [int(size) for size in weight.shape],
        "dtype": str(weight.dtype).removeprefix("torch."),
        "rows": rows,
        "sha256": digest if digest is not None else _rows_digest(weight, rows),
    }


@dataclasses.dataclass
class _CleanRows:
    """What a weight's fingerprinted rows were while no adapter was merged into it."""

    digests: list[str]  # digests[r]: the SHA-256 of the first r rows as bfloat16
    sums: torch.Tensor  # each row's sum (float64), to tell a base changed since from merge rounding
    magnitudes: torch.Tensor  # each row's sum of absolute values (float64)

    def describes(self, rows: torch.Tensor) -> bool:
        """Whether ``rows`` (the first rows, unmerged again up to rounding) are still these."""
        count = len(self.digests) - 1
        if rows.shape[0] < count:
            return False
        sums = rows[:count].detach().to("cpu", torch.float64).sum(1)
        return bool(((sums - self.sums).abs() <= 1e-4 * self.magnitudes + 1e-30).all())


# Per weight (by identity, while it lives): its rows as last seen with nothing merged.
_clean_rows: dict[int, tuple[weakref.ref[torch.Tensor], _CleanRows]] = {}


def _remember_clean(weight: torch.Tensor) -> _CleanRows:
    limit = min(int(weight.shape[0]), _FINGERPRINT_ROWS)
    sample = _bfloat16_rows(weight, limit)
    running = hashlib.sha256()
    digests = [running.hexdigest()]
    for row in sample:
        running.update(row.tobytes())
        digests.append(running.hexdigest())
    values = weight.detach()[:limit].to("cpu", torch.float64)
    clean = _CleanRows(digests, values.sum(1), values.abs().sum(1))
    key = id(weight)

    def forget(_: weakref.ref[torch.Tensor]) -> None:
        _clean_rows.pop(key, None)

    _clean_rows[key] = (weakref.ref(weight, forget), clean)
    return clean


def _recall_clean(weight: torch.Tensor) -> _CleanRows | None:
    found = _clean_rows.get(id(weight))
    return found[1] if found is not None and found[0]() is weight else None


def _merged_states(model: nn.Module, modules: list[str], exclude: object = None) -> list[AdapterState]:
    """The adapters but ``exclude`` merged into the weight of ``modules``, in the layers' order."""
    found: list[AdapterState] = []
    for name in modules:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            for state in module.adapters.values():
                if not isinstance(state, AdapterState) or state is exclude:
                    continue
                if state.merged and all(state is not seen for seen in found):
                    found.append(state)
    return found


def _unmerged_digest(weight: torch.Tensor, merged: list[AdapterState], rows: int) -> str:
    """The digest of the first ``rows`` rows of ``weight`` without the adapters ``merged`` into it.

    Unmerging a copy gives them back up to rounding (an additive update
    subtracted again), and a hash tells no rounding apart; so the digest comes
    from the rows remembered while nothing was merged, once the unmerged copy
    shows they are still those rows (the base did not change since).
    """
    copy = weight.detach().clone()
    try:
        for state in reversed(merged):
            kept = dict(state._buffers)  # what the state keeps for its own unmerge (rows it replaced)
            try:
                state.unmerge_from(copy)
            finally:
                state._buffers.update(kept)
    except NotImplementedError:  # a plugin that merges through its own hook: trust what was remembered
        clean = _recall_clean(weight)
        return clean.digests[rows] if clean is not None else _rows_digest(weight, rows)
    clean = _recall_clean(weight)
    if clean is not None and len(clean.digests) > rows and clean.describes(copy):
        return clean.digests[rows]
    return _rows_digest(copy, rows)


def base_fingerprint(model: nn.Module, sites: list[Site]) -> dict[str, Any]:
    """The fingerprint of the base under ``sites``, as it is without the adapters merged into it.

    Adapters merged into a weight are not part of its base: the hash is of
    the rows with them unmerged (see :func:`_unmerged_digest`).
    """
    weights = {}
    for site in sites:
        weight, touched = site.weight(model), site.state.touched_rows()
        rows = _fingerprint_rows(weight, touched)
        merged = _merged_states(model, site.modules, site.state)
        digest = _unmerged_digest(weight, merged, rows) if merged else _remember_clean(weight).digests[rows]
        weights[site.modules[0]] = weight_fingerprint(weight, touched, digest)
    return {"model": type(model).__name__, "weights": weights}


def base_mismatches(saved: dict[str, Any], model: nn.Module, where: Path) -> list[str]:
    """How ``model`` differs from the base recorded in ``saved`` (empty when it is the same base)."""
    problems = []
    if saved.get("model") not in (None, type(model).__name__):
        problems.append(f"it was trained on a {saved['model']}, this model is a {type(model).__name__}")
    weights = saved.get("weights")
    if not isinstance(weights, dict):
        raise SavedFolderError(
            f"{where}: key 'base.weights' is {weights!r}; it must be an object. Save the adapter again."
        )
    modules = dict(named_base_modules(model))
    for target, recorded in weights.items():
        weight = getattr(modules.get(target), "weight", None)
        try:
            rows, digest = int(recorded["rows"]), str(recorded["sha256"])
        except (KeyError, TypeError, ValueError):
            raise SavedFolderError(
                f"{where}: key 'base.weights[{target!r}]' is malformed ({recorded!r}); save the adapter again"
            ) from None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] < rows:
            continue  # the shape check reports it, with the fix
        merged = _merged_states(model, [target])  # adapters merged into it are not the base
        if (_unmerged_digest(weight, merged, rows) if merged else _rows_digest(weight, rows)) != digest:
            dtype, mine = recorded.get("dtype"), str(weight.dtype).removeprefix("torch.")
            note = (
                f" (it was saved from a {dtype} weight; this one is {mine})"
                if dtype not in (None, mine)
                else ""
            )
            problems.append(
                f"the first {rows} rows of {target}.weight are not the ones it was trained on{note}"
            )
    return problems


# ------------------------------------------------------------------------ save
def adapter_files(model: nn.Module, record: AdapterRecord) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of one adapter of ``model`` and its manifest entry (without ``path``)."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for site in record.sites:
        target = site.modules[0]
        shapes[target] = list(site.weight(model).shape)
        for key, tensor in site.state.state_dict().items():
            tensors[f"{target}.{key}"] = tensor.detach().to("cpu").contiguous()
    files = {
        CONFIG_FILE: (json.dumps(record.config.to_dict(), indent=2) + "\n").encode(),
        WEIGHTS_FILE: safetensors.torch.save(tensors, metadata={SHAPES_KEY: json.dumps(shapes)}),
    }
    method = get_plugin_manager().method_for(record.config)
    entry: dict[str, Any] = {"method": method.name, "plugin": method.plugin}
    if method.distribution:
        entry.update(distribution=method.distribution, distribution_version=method.version)
    entry["files"] = {filename: manifest.sha256(data) for filename, data in files.items()}
    entry["base"] = record.fingerprint
    if record.combined_from is not None:
        entry[manifest.COMBINED_FROM] = record.combined_from
    files[ADAPTER_MANIFEST] = (json.dumps(entry, indent=2) + "\n").encode()
    return files, entry


def save_pretrained(
    model: nn.Module,
    records: Mapping[str, AdapterRecord],
    active: list[str],
    directory: str | os.PathLike[str],
    names: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Save the adapters ``names`` of ``model`` into ``directory``, all-or-nothing, with their stack."""
    payloads, entries = {}, {}
    for name in names:
        payloads[name], entries[name] = adapter_files(model, records[name])
    storage.save(Path(directory), payloads, entries, [name for name in active if name in names], extra)


# ------------------------------------------------------------------------ load
def _parse_weights(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    try:
        tensors = safetensors.torch.load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise SavedFolderError(
            f"{path} is not a valid safetensors file ({error}); save the adapter again"
        ) from None
    shapes: Any = {}
    if SHAPES_KEY in metadata:
        try:
            shapes = json.loads(metadata[SHAPES_KEY])
        except (TypeError, json.JSONDecodeError):
            shapes = None
    valid = isinstance(shapes, dict) and all(
        isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
        for shape in shapes.values()
    )
    if not valid:
        raise SavedFolderError(
            f"{path}: metadata key {SHAPES_KEY!r} is {metadata.get(SHAPES_KEY)!r}; it must map module names "
            "to [vocabulary, width]. Save the adapter again."
        )
    not_float = sorted(key for key, tensor in tensors.items() if not tensor.is_floating_point())
    if not_float:
        raise SavedFolderError(
            f"{path} holds non-float tensors {not_float}; adapter weights are floats. Save it again."
        )
    return tensors, shapes


def read_tensors(saved: storage.SavedAdapter) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The tensors of the verified adapter ``saved``, and the shape of the weight of each of its targets."""
    return _parse_weights(saved.folder / WEIGHTS_FILE, saved.files[WEIGHTS_FILE])


def with_contents(
    saved: storage.SavedAdapter,
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
) -> storage.SavedAdapter:
    """``saved`` holding ``config`` and ``tensors`` for weights of ``shapes``: in memory, for a load."""
    files = dict(saved.files)
    files[CONFIG_FILE] = (json.dumps(config.to_dict(), indent=2) + "\n").encode()
    contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
    files[WEIGHTS_FILE] = safetensors.torch.save(contiguous, metadata={SHAPES_KEY: json.dumps(shapes)})
    entry = dict(saved.entry)
    entry["files"] = {
        **entry.get("files", {}),
        **{name: manifest.sha256(files[name]) for name in (CONFIG_FILE, WEIGHTS_FILE)},
    }
    return dataclasses.replace(saved, entry=entry, files=files)


def read_config(saved: storage.SavedAdapter) -> AdapterConfig:
    path = saved.folder / CONFIG_FILE
    data = manifest.load_json_object(path, saved.files[CONFIG_FILE])
    if data.get("method") != saved.entry["method"]:
        raise SavedFolderError(
            f"{path}: key 'method' is {data.get('method')!r} but {saved.listed_in} says "
            f"{saved.entry['method']!r}; save the adapter again"
        )
    manager = get_plugin_manager()
    if data["method"] not in manager.methods:
        package = saved.entry.get("distribution")
        hint = f"pip install {package}" if package else "install the plugin that provides it"
        raise SavedFolderError(
            f"{path}: the adapter uses method {data['method']!r}, which no installed plugin provides "
            f"(installed: {sorted(manager.methods)}); {hint}"
        )
    try:
        return manager.config_from_dict(data)
    except ValueError as error:
        raise SavedFolderError(f"{path}: {error}") from None


def read_adapter(
    saved: storage.SavedAdapter, adapter_name: str, model: nn.Module, strict: bool = True
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the verified adapter ``saved``, checked against ``model``'s shapes and base.

    Nothing is changed; :func:`fill` puts the tensors into the adapter once it is added.
    """
    config = read_config(saved)
    tensors, saved_shapes = _parse_weights(saved.folder / WEIGHTS_FILE, saved.files[WEIGHTS_FILE])
    modules = dict(named_base_modules(model))
    for target, shape in saved_shapes.items():
        weight = getattr(modules.get(target), "weight", None)
        if weight is None or list(weight.shape) != shape:
            have = "missing" if weight is None else f"of shape {tuple(weight.shape)}"
            raise SavedFolderError(
                f"adapter {adapter_name!r} in {saved.folder} was saved for {target} of shape {tuple(shape)} "
                f"(vocabulary {shape[0]}, width {shape[1]}), but this model's is {have}. Load it onto "
                "the base model it was trained with (resize_token_embeddings to its tokenizer first)."
            )
    if "base" in saved.entry:
        problems = base_mismatches(saved.entry["base"], model, saved.listed_in)
        if problems and strict:
            raise SavedFolderError(
                f"adapter {adapter_name!r} in {saved.folder} was trained on another base model: "
                + "; ".join(problems)
                + ". Load it onto that base (unmerged), or pass strict=False to load it anyway."
            )
        for problem in problems:
            warnings.warn(f"adapter {adapter_name!r}: {problem} (loaded anyway, strict=False)", stacklevel=4)
    return config, tensors


def fill(record: AdapterRecord, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``tensors`` (read from ``path``) into the states of ``record``; exactly what they need."""
    expected: dict[str, torch.Size] = {}
    for site in record.sites:
        for key, tensor in site.state.state_dict().items():
            expected[f"{site.modules[0]}.{key}"] = tensor.shape
    unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise SavedFolderError(
            f"{path} does not hold what this adapter needs (unexpected tensors: {unexpected}; missing: "
            f"{missing}); was it saved for another model or method version?"
        )
    wrong = [
        f"{k} {tuple(t.shape)} (expected {tuple(expected[k])})"
        for k, t in tensors.items()
        if t.shape != expected[k]
    ]
    if wrong:
        raise SavedFolderError(f"{path} holds tensors of the wrong shape: {wrong}; save the adapter again")
    for site in record.sites:
        prefix = f"{site.modules[0]}."
        state_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        site.state.load_state_dict(state_dict, strict=True)
