"""The on-disk manifest: which adapters a folder holds, and proof their files are intact.

Layout written by ``AdapterModel.save_pretrained`` (format 2)::

    path/manifest.json                          the only root: names -> snapshots
    path/<adapter>/<snapshot>/adapter_config.json
    path/<adapter>/<snapshot>/adapter_model.safetensors
    path/<adapter>/<snapshot>/adapter_manifest.json   the entry below, for direct loads

A snapshot folder never changes once it has its name (see ``storage``).
Format 1 folders (``path/<adapter>/adapter_config.json``) are still read.

Everything read here is validated before it is trusted: each fault is a
``ValueError`` that names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from tt_core.api.errors import MissingFiles, SavedFolderError

FILENAME = "manifest.json"
ADAPTER_MANIFEST = "adapter_manifest.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 2
#: The optional entry key recording where a combined adapter came from (``add_weighted_adapter``).
COMBINED_FROM = "combined_from"
_SHA256_HEX = frozenset("0123456789abcdef")


@dataclasses.dataclass
class Manifest:
    """What ``manifest.json`` says: adapters by name, the active stack, and any extra keys."""

    format_version: int
    adapters: dict[str, dict[str, Any]]
    active: list[str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> bytes:
        document = {
            "format_version": self.format_version,
            "adapters": self.adapters,
            "active": self.active,
            **self.extra,
        }
        return (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fault(path: Path, message: str, fix: str = "save the adapters again") -> SavedFolderError:
    return SavedFolderError(f"{path}: {message}; {fix}")


def load_json_object(path: Path, data: bytes) -> dict[str, Any]:
    """Parse ``data`` (the bytes of ``path``) as a JSON object, or raise a ValueError naming the file."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fault(path, f"is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise _fault(path, f"holds a JSON {type(document).__name__}, not an object")
    return document


def check_format_version(path: Path, value: Any) -> int:
    """An integer >= 1 that this version of tt-adapters can read."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fault(path, f"key 'format_version' is {value!r}; it must be a whole number >= 1")
    if value > FORMAT_VERSION:
        raise _fault(
            path,
            f"has format version {value}; this tt-adapters reads up to {FORMAT_VERSION}",
            "upgrade tt-adapters (pip install -U tt-adapters); nothing was changed",
        )
    return value


def _relative_path(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fault(path, f"key {key!r} is {value!r}; it must be a relative folder path")
    parts = PurePosixPath(value).parts
    if value.startswith(("/", "\\")) or ".." in parts or "\\" in value or ":" in value:
        raise _fault(path, f"key {key!r} is {value!r}, which points outside its folder")
    return value


def validate_entry(path: Path, name: str, entry: Any, needs_path: bool = True) -> dict[str, Any]:
    """Check the types and keys of one adapter's entry; return it."""
    where = f"adapters[{name!r}]" if needs_path else "the entry"
    if not isinstance(entry, dict):
        raise _fault(path, f"{where} is a {type(entry).__name__}, not an object")
    required = (["path"] if needs_path else []) + ["method", "files"]
    missing = [key for key in required if key not in entry]
    if missing:
        raise _fault(path, f"{where} lacks the key(s) {missing}")
    if needs_path:
        _relative_path(path, f"{where}.path", entry["path"])
    for key in ("method", "plugin"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key]):
            raise _fault(path, f"key {where}.{key} is {entry[key]!r}; it must be a non-empty string")
    files = entry["files"]
    if not isinstance(files, dict) or not files:
        raise _fault(path, f"key {where}.files is {files!r}; it must map each file name to its SHA-256")
    for filename, digest in files.items():
        if "/" in filename or "\\" in filename or filename in ("", ".", ".."):
            raise _fault(path, f"key {where}.files names {filename!r}, which is not a plain file name")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise _fault(path, f"key {where}.files[{filename!r}] is {digest!r}, not a SHA-256 hex digest")
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        if filename not in files:
            raise _fault(path, f"key {where}.files does not list {filename}")
    if "base" in entry and not isinstance(entry["base"], dict):
        raise _fault(path, f"key {where}.base is {entry['base']!r}; it must be an object")
    if COMBINED_FROM in entry:
        _check_combined_from(path, f"{where}.{COMBINED_FROM}", entry[COMBINED_FROM])
    return entry


def _check_combined_from(path: Path, where: str, value: Any) -> None:
    """An object naming the combination type and a non-empty list of sources, each a name and a weight."""
    if not isinstance(value, dict) or not isinstance(value.get("combination_type"), str):
        raise _fault(path, f"key {where} is {value!r}; it must be an object with a 'combination_type'")
    sources = value.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _fault(path, f"key {where}.sources is {sources!r}; it must list the combined adapters")
    for source in sources:
        if (
            not isinstance(source, dict)
            or not isinstance(source.get("adapter"), str)
            or isinstance(source.get("weight"), bool)
            or not isinstance(source.get("weight"), (int, float))
        ):
            raise _fault(
                path, f"key {where}.sources holds {source!r}; each source is an 'adapter' and a 'weight'"
            )


def parse(path: Path, data: bytes) -> Manifest:
    """Validate the bytes of a ``manifest.json``; a newer format or a malformed file is a clear error."""
    document = load_json_object(path, data)
    if "format_version" not in document:
        raise _fault(path, "lacks the key 'format_version'")
    version = check_format_version(path, document.pop("format_version"))
    adapters = document.pop("adapters", None)
    if not isinstance(adapters, dict) or not adapters:
        raise _fault(path, f"key 'adapters' is {adapters!r}; it must name at least one saved adapter")
    for name, entry in adapters.items():
        validate_entry(path, name, entry)
    active = document.pop("active", [])
    if not isinstance(active, list) or not all(isinstance(n, str) and n in adapters for n in active):
        raise _fault(path, f"key 'active' is {active!r}; it must list adapters the manifest holds")
    return Manifest(version, adapters, active, document)


def read(root: Path) -> Manifest:
    """Read and validate ``root/manifest.json``."""
    path = root / FILENAME
    try:
        return parse(path, path.read_bytes())
    except FileNotFoundError:
        raise SavedFolderError(f"{path} does not exist; pass a folder written by save_pretrained()") from None


def exists(root: Path) -> bool:
    return (root / FILENAME).is_file()


def read_files(
    folder: Path, entry: dict[str, Any], listed_in: Path, extra: frozenset[str]
) -> dict[str, bytes]:
    """Read the files ``entry`` lists from ``folder``, each checked against its hash.

    The folder must hold exactly those plain files (plus ``extra``), none a
    symbolic link. The bytes returned are the ones that were hashed, so what
    is parsed later is what was verified.
    """
    if folder.is_symlink():
        raise SavedFolderError(f"{folder} (listed in {listed_in}) is a symbolic link; save the adapter again")
    if not folder.is_dir():
        raise MissingFiles(f"{folder} (listed in {listed_in}) is missing; save the adapter again")
    present = set()
    for child in folder.iterdir():
        try:
            mode = child.lstat().st_mode  # one look: a writer's clean-up may remove it at any moment
        except FileNotFoundError:
            continue  # removed since the listing: reported as missing below, so the reader retries
        if not stat.S_ISREG(mode):
            raise SavedFolderError(
                f"{child} is {'a symbolic link' if stat.S_ISLNK(mode) else 'not a plain file'}; an adapter "
                "folder holds plain files only. Remove it, or save the adapter again."
            )
        present.add(child.name)
    listed = set(entry["files"])
    if present - extra != listed:
        unlisted, missing = sorted(present - extra - listed), sorted(listed - present)
        # Files gone and nothing else: what a writer's clean-up leaves halfway, so a reader retries.
        raise (MissingFiles if missing and not unlisted else SavedFolderError)(
            f"{folder} does not hold the files {listed_in} lists (not listed: {unlisted}, missing: "
            f"{missing}); remove stray files, or save the adapter again"
        )
    contents = {}
    for filename, expected in entry["files"].items():
        data = (folder / filename).read_bytes()
        if sha256(data) != expected:
            raise SavedFolderError(
                f"{folder / filename} does not match the hash in {listed_in}: the file was changed or "
                "damaged after saving. Save the adapter again."
            )
        contents[filename] = data
    return contents


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that resolves outside ``root`` (a symlink, say)."""
    folder = root / relative
    if root.resolve() not in folder.resolve().parents:
        raise SavedFolderError(
            f"{root / FILENAME} points outside its folder ({relative!r}); save the adapters again"
        )
    return folder
