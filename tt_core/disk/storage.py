"""Folders of saved adapters that survive crashes and concurrent writers.

How a save stays all-or-nothing (see docs/manifest.md):

- each adapter's files go into a temporary folder, which is renamed into
  place as ``<adapter>/<snapshot>``, named by a hash of its content; a
  snapshot folder never changes after that rename;
- ``manifest.json`` is the only root: one atomic ``os.replace`` switches the
  folder from the old set of snapshots to the new one;
- writers hold a ``filelock`` lock on the folder from reading the old
  manifest to removing the snapshots it no longer names, so two writers never
  lose each other's entries;
- readers take no lock: they read the manifest, then the bytes of the files
  it names; if a writer removed a snapshot in between, the manifest has
  changed and they read again.

A writer killed at any point leaves the old manifest and its snapshots
intact; what it left (temporary folders, unnamed snapshots) is removed by the
next writer, which holds the lock and so knows no other writer is running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from tt_core.api.errors import ConfigError, MissingFiles, SavedFolderError, StorageError
from tt_core.disk import manifest
from tt_core.disk.manifest import ADAPTER_MANIFEST, CONFIG_FILE, FILENAME, Manifest

LOCK_FILE = ".tt.lock"
TEMPORARY_PREFIX = ".tt-tmp-"
SNAPSHOT = re.compile(r"[0-9a-f]{16}")
_READ_ATTEMPTS = 20
# What fsync of a folder answers on file systems that cannot sync folders (some network ones):
# nothing to do there, the server commits a rename itself.
_FOLDER_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


@dataclasses.dataclass
class SavedAdapter:
    """One adapter's verified files, as read from disk."""

    folder: Path
    entry: dict[str, Any]
    files: dict[str, bytes]
    listed_in: Path


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the writers' lock of ``root`` (a ``filelock`` lock, released by the OS if we die)."""
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_FILE
    # Created here with 0o666 so the umask decides its mode (colleagues sharing the folder can take
    # the lock too); filelock would otherwise set the mode it is given, whatever the umask.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    with filelock.FileLock(str(lock), mode=stat.S_IMODE(lock.stat().st_mode) | 0o600):
        yield


def _failed(step: str, path: Path, error: OSError) -> StorageError:
    """A :class:`StorageError` naming the step, the path and the system's answer."""
    return StorageError(error.errno, f"{step} {path} failed: {error.strerror or error}")


def write_file(path: Path, data: bytes) -> None:
    """Write a new file (permissions from the umask) and flush it to the disk."""
    try:
        with open(path, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise _failed("writing", path, error) from error


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename into it) to the disk; a no-op where folders cannot be synced."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        if error.errno in _FOLDER_SYNC_UNSUPPORTED:
            return
        raise _failed("flushing the folder", folder, error) from error


def temporary_folder(root: Path) -> Path:
    """A new, empty folder in ``root`` that readers ignore and the next writer removes."""
    folder = root / f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}"
    try:
        os.mkdir(folder)  # honours the umask, unlike tempfile.mkdtemp's 0700
    except OSError as error:
        raise _failed("creating the folder", folder, error) from error
    return folder


def remove(path: Path) -> bool:
    """Remove a file or a folder tree as far as the file system lets us; return whether it is gone.

    Best effort, never raising: what is left is garbage the next writer removes.
    """
    if not os.path.lexists(path):
        return True
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return not os.path.lexists(path)


def snapshot_name(files: dict[str, bytes]) -> str:
    listing = "\n".join(f"{name} {manifest.sha256(data)}" for name, data in sorted(files.items()))
    return manifest.sha256(listing.encode())[:16]


def write_snapshot(root: Path, adapter: str, files: dict[str, bytes]) -> tuple[str, bool]:
    """Put ``files`` in place as ``root/adapter/<snapshot>``; return that path and whether it is new.

    Call with the lock held. On any failure nothing new is left in place.
    """
    name = snapshot_name(files)
    parent = root / adapter
    if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
        raise ConfigError(f"{parent} exists and is not a folder; move it away, or save under another name")
    try:
        parent.mkdir(exist_ok=True)
    except OSError as error:
        raise _failed("creating the folder", parent, error) from error
    destination = parent / name
    temporary = temporary_folder(root)
    try:
        for filename, data in files.items():
            write_file(temporary / filename, data)
        fsync_folder(temporary)
        if destination.exists():
            if _holds(destination, files):
                return f"{adapter}/{name}", False  # the same content is already there, intact
            _move_aside(root, destination)  # damaged: removed by collect_garbage
        try:
            os.rename(temporary, destination)
        except OSError as error:
            raise _failed("renaming into place", destination, error) from error
        try:
            fsync_folder(parent)
        except OSError:
            remove(destination)  # not durable: the caller's rollback never saw it
            raise
        return f"{adapter}/{name}", True
    finally:
        remove(temporary)


def _move_aside(root: Path, path: Path) -> None:
    """Rename ``path`` into a new temporary folder, which the next garbage collection removes."""
    holder = temporary_folder(root)
    try:
        os.rename(path, holder / "damaged")
    except OSError as error:
        remove(holder)
        raise _failed("moving aside the damaged", path, error) from error


def _holds(folder: Path, files: dict[str, bytes]) -> bool:
    try:
        names = {child.name for child in folder.iterdir()}
        return names == set(files) and all((folder / n).read_bytes() == d for n, d in files.items())
    except OSError:
        return False


def write_manifest(root: Path, document: Manifest) -> None:
    """Replace ``root/manifest.json`` atomically: afterwards it holds ``document``, or the old bytes.

    Raises only if the old manifest is still in place. The caller flushes
    ``root`` afterwards (see :func:`save`).
    """
    data = document.to_json()
    target = root / FILENAME
    temporary = root / f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}.json"
    try:
        write_file(temporary, data)
        try:
            os.replace(temporary, target)
        except OSError as error:
            # A replace that failed did not happen; a file system that says otherwise is checked.
            with contextlib.suppress(OSError):
                if target.read_bytes() == data:
                    return
            raise _failed("replacing", target, error) from error
    finally:
        remove(temporary)


def save(
    root: Path,
    payloads: dict[str, dict[str, bytes]],
    entries: dict[str, dict[str, Any]],
    active: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Save adapters into ``root`` all-or-nothing, keeping the adapters saved there before.

    ``payloads[name]`` are the files of one adapter (its ``adapter_manifest.json``
    included); ``entries[name]`` its manifest entry, without ``path``.

    Until the manifest switch, a failure removes what this save wrote and
    raises a :class:`StorageError`: the folder holds its previous save. Once
    the manifest is switched the save has happened: failing to flush the
    folder or to remove old files afterwards is a warning, never a rollback.
    """
    if manifest.exists(root):
        manifest.read(root)  # refuses a newer or damaged folder before even the lock file is made in it
    try:
        with locked(root):
            document, old = _switch(root, payloads, entries, active, extra)
            problems = _after_switch(root, old, document)
    except OSError as error:  # from _switch (which removed what it wrote), or taking the lock
        reason = error.strerror if isinstance(error, StorageError) else str(error)
        raise StorageError(
            error.errno,
            f"saving into {root} failed, so it holds what it held before (its previous save, if any): "
            f"{reason}. Check the disk (free space, permissions) and save again.",
        ) from error
    if problems:
        warnings.warn(
            f"saved into {root}: the new manifest is in place and loads, but "
            + "; ".join(problems)
            + ". Check the disk; the next save removes any old files left.",
            stacklevel=3,
        )


def _switch(
    root: Path,
    payloads: dict[str, dict[str, bytes]],
    entries: dict[str, dict[str, Any]],
    active: list[str],
    extra: dict[str, Any] | None,
) -> tuple[Manifest, Manifest | None]:
    """Write the snapshots and switch the manifest; on failure, remove what was written and raise."""
    old = manifest.read(root) if manifest.exists(root) else None  # refuses newer or damaged ones
    created: list[Path] = []
    new_folders = [root / name for name in payloads if not (root / name).exists()]
    try:
        adapters = dict(old.adapters) if old else {}
        for name, files in payloads.items():
            relative, new = write_snapshot(root, name, files)
            if new:
                created.append(root / relative)
            adapters[name] = {"path": relative, **entries[name]}
        kept = old.extra if old else {}
        document = Manifest(manifest.FORMAT_VERSION, adapters, active, {**kept, **(extra or {})})
        write_manifest(root, document)
    except BaseException:
        for folder in created:
            remove(folder)
        for folder in new_folders:
            with contextlib.suppress(OSError):
                folder.rmdir()  # made by this save, and empty again
        raise
    return document, old


def _after_switch(root: Path, old: Manifest | None, document: Manifest) -> list[str]:
    """Flush the switch and remove what no manifest names; return what failed (never raises OSError)."""
    problems = []
    try:
        fsync_folder(root)
    except OSError as error:
        problems.append(f"{error} (after a power loss the folder may hold the previous save)")
    try:
        left = [path for path in collect_garbage(root, old, document) if os.path.lexists(path)]
    except OSError as error:
        left = [Path(str(error.filename or root))]
    if left:
        problems.append(f"removing old files failed ({', '.join(map(str, left))})")
    return problems


def collect_garbage(root: Path, old: Manifest | None, new: Manifest) -> list[Path]:
    """Remove what no manifest names any more: temporary files, old snapshots, format-1 files.

    Call with the lock held. Only files this package writes are touched, so a
    folder shared with other content (a training output folder) keeps it.
    """
    referenced = {entry["path"] for entry in new.adapters.values()}
    removed = [path for path in root.glob(f"{TEMPORARY_PREFIX}*")]
    names = set(new.adapters) | set(old.adapters if old else ())
    for name in sorted(names):
        folder = root / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        for child in folder.iterdir():
            if child.is_dir() and SNAPSHOT.fullmatch(child.name) and f"{name}/{child.name}" not in referenced:
                removed.append(child)
        old_entry = old.adapters.get(name) if old else None
        if old_entry and old_entry["path"] == name and name not in referenced:
            removed.extend(folder / filename for filename in old_entry["files"])  # a format-1 save
    for path in removed:
        remove(path)
    for name in names:
        with contextlib.suppress(OSError):
            (root / name).rmdir()  # only if empty
    return removed


def _pick(root: Path, found: Manifest, adapter_name: str | None) -> str:
    if adapter_name in found.adapters:
        return adapter_name
    if len(found.adapters) == 1:
        return next(iter(found.adapters))
    raise SavedFolderError(
        f"{root} holds adapters {sorted(found.adapters)}, not {adapter_name!r}; pass one of those names"
    )


def read_all(root: Path, adapter_name: str | None = None) -> tuple[Manifest, dict[str, SavedAdapter]]:
    """One consistent reading of a saved folder: its manifest and the verified files of its adapters.

    All adapters, or only ``adapter_name`` (or the only one). If a writer
    replaces the folder's content meanwhile, the reading starts again.
    """
    listed_in = root / FILENAME
    failed_unchanged = False
    for _ in range(_READ_ATTEMPTS):
        raw = listed_in.read_bytes()
        found = manifest.parse(listed_in, raw)
        names = list(found.adapters) if adapter_name is None else [_pick(root, found, adapter_name)]
        extra = frozenset({ADAPTER_MANIFEST}) if found.format_version >= 2 else frozenset()
        try:
            adapters = {}
            for name in names:
                entry = found.adapters[name]
                folder = manifest.inside(root, entry["path"])
                adapters[name] = SavedAdapter(
                    folder, entry, read_files(folder, entry, listed_in, extra), listed_in
                )
            return found, adapters
        except MissingFiles:  # files gone: a writer's garbage collection, seen whole or halfway
            # Anything else (a bad hash, a stray file) no writer causes: it is reported at once.
            # Unchanged twice in a row: nobody is writing, the files are really gone or damaged. (Once is
            # not proof: writers saving A, B, A again put back the very bytes of the manifest read first.)
            if listed_in.read_bytes() == raw:
                if failed_unchanged:
                    raise
                failed_unchanged = True
            else:
                failed_unchanged = False
    raise SavedFolderError(f"{root} kept changing while it was read; try again when the writers are done")


def _read_root(root: Path, adapter_name: str | None) -> SavedAdapter:
    _, adapters = read_all(root, adapter_name)
    return next(iter(adapters.values()))


def read_files(
    folder: Path, entry: dict[str, Any], listed_in: Path, extra: frozenset[str]
) -> dict[str, bytes]:
    """:func:`manifest.read_files`, telling missing files apart from damaged ones."""
    if not folder.exists() and not folder.is_symlink():
        raise MissingFiles(f"{folder} (listed in {listed_in}) is missing; save the adapter again")
    try:
        return manifest.read_files(folder, entry, listed_in, extra)
    except FileNotFoundError as error:
        raise MissingFiles(
            f"{error.filename} (listed in {listed_in}) is missing; save the adapter again"
        ) from None


def read(path: Path, adapter_name: str | None = None) -> SavedAdapter:
    """Find and verify one saved adapter under ``path``; every way in checks the hashes.

    ``path`` is a folder written by ``save_pretrained`` (the adapter
    ``adapter_name``, or its only adapter), one adapter's snapshot folder, or
    (format 1) one adapter's folder.
    """
    if manifest.exists(path):
        return _read_root(path, adapter_name)
    own = path / ADAPTER_MANIFEST
    if own.is_file():
        entry = manifest.validate_entry(
            own, path.name, manifest.load_json_object(own, own.read_bytes()), False
        )
        return SavedAdapter(path, entry, read_files(path, entry, own, frozenset({ADAPTER_MANIFEST})), own)
    parent = path.parent
    if manifest.exists(parent):
        found = manifest.read(parent)
        for name, entry in found.adapters.items():
            if entry["path"] == path.name or entry["path"].startswith(f"{path.name}/"):
                return _read_root(parent, name)
    if (path / CONFIG_FILE).is_file():
        raise SavedFolderError(
            f"{path} has no {ADAPTER_MANIFEST} and no {FILENAME} beside it lists it, so its files cannot be "
            "checked; load the folder save_pretrained() wrote, or save the adapter again"
        )
    raise SavedFolderError(
        f"{path} holds neither {FILENAME} nor {CONFIG_FILE}; pass a folder written by save_pretrained()"
    )
