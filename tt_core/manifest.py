"""The on-disk manifest: which adapters a folder holds, and proof their files are intact.

Layout written by ``AdapterModel.save_pretrained``::

    path/manifest.json
    path/<adapter>/adapter_config.json
    path/<adapter>/adapter_model.safetensors

Files are written to a temporary name and renamed, so an interrupted save
never leaves a half-written file under a real name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILENAME = "manifest.json"
FORMAT_VERSION = 1
_CONFIG = "adapter_config.json"


@dataclasses.dataclass
class Manifest:
    """What ``manifest.json`` says: adapters by name, and the active stack."""

    format_version: int
    adapters: dict[str, dict[str, Any]]
    active: list[str]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temporary_beside(path: Path) -> str:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    return name


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    temporary = _temporary_beside(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def save_tensors_atomic(
    path: Path, tensors: dict[str, Any], metadata: dict[str, str], save: Callable[..., None]
) -> None:
    """Save a safetensors file through a temporary file and a rename."""
    temporary = _temporary_beside(path)
    try:
        save(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def entry_for(folder: Path, name: str, method: str, plugin: str) -> dict[str, Any]:
    """The manifest entry of one saved adapter folder, with its files' hashes."""
    files = {child.name: _sha256(child) for child in sorted(folder.iterdir()) if child.is_file()}
    return {"path": folder.name, "method": method, "plugin": plugin, "files": files}


def exists(root: Path) -> bool:
    return (root / FILENAME).is_file()


def write(root: Path, entries: dict[str, dict[str, Any]], active: list[str]) -> None:
    """Write ``root/manifest.json``, keeping entries of adapters saved there earlier."""
    adapters: dict[str, dict[str, Any]] = {}
    if exists(root):
        adapters = {
            name: entry for name, entry in read(root).adapters.items() if (root / entry["path"]).is_dir()
        }
    adapters.update(entries)
    document = {"format_version": FORMAT_VERSION, "adapters": adapters, "active": active}
    write_atomic(root / FILENAME, (json.dumps(document, indent=2) + "\n").encode())


def read(root: Path) -> Manifest:
    """Read ``root/manifest.json``; a newer format or a malformed file is a clear error."""
    path = root / FILENAME
    try:
        document = json.loads(path.read_text())
        version = int(document["format_version"])
        adapters = dict(document["adapters"])
        active = list(document.get("active", []))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a valid tt-adapters manifest ({error}); save the adapters again"
        ) from error
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}; this tt-adapters reads up to {FORMAT_VERSION}. "
            "Upgrade tt-adapters."
        )
    return Manifest(version, adapters, active)


def verify(root: Path, name: str) -> Path:
    """Check one adapter's files against the manifest and return its folder."""
    entry = read(root).adapters[name]
    folder = root / entry["path"]
    if root.resolve() not in folder.resolve().parents:
        raise ValueError(f"{root / FILENAME} points adapter {name!r} outside its folder ({entry['path']!r})")
    for filename, expected in entry["files"].items():
        path = folder / filename
        if not path.is_file():
            raise ValueError(f"{path} is listed in {root / FILENAME} but missing; save the adapter again")
        if _sha256(path) != expected:
            raise ValueError(
                f"{path} does not match the hash in {root / FILENAME}: the file was changed or "
                "damaged after saving. Save the adapter again."
            )
    return folder


def adapter_folder(path: Path, adapter_name: str) -> Path:
    """The verified folder holding ``adapter_name`` (or the only adapter) under ``path``."""
    if exists(path):
        adapters = read(path).adapters
        if adapter_name in adapters:
            return verify(path, adapter_name)
        if len(adapters) == 1:
            return verify(path, next(iter(adapters)))
        raise ValueError(
            f"{path} holds adapters {sorted(adapters)}, not {adapter_name!r}; pass one of those names"
        )
    if (path / _CONFIG).is_file():
        return path
    raise ValueError(
        f"{path} holds neither {FILENAME} nor {_CONFIG}; pass a folder written by save_pretrained()"
    )
