"""The registry on object storage: ``Registry("s3://bucket/prefix")`` (also ``gs://``, ``az://``, ``memory://``).

Layout under the URL (see docs/registry.md)::

    objects/<sha256>                  content, named by the SHA-256 of its bytes; never changes
    records/<name>/<version>.json     a version: the SHA-256 of each file of its folder
                                      (manifest.json, <name>/<snapshot>/...), created only if absent
    records/<name>/<version>.removed  removes that version, created only if absent

Object stores have no rename and no lock, so the promises of the local
registry rest on what they have:

- a publish uploads every file as a content-addressed object first, then
  creates the version record with create-if-absent (S3 ``If-None-Match: *``,
  GCS generation 0, Azure ``If-None-Match``): a version appears whole or not
  at all, and two publishers never get one number (the loser of a create
  takes the next number). A publisher that dies leaves only objects no
  record names, which :meth:`ObjectRegistry.gc` removes after a grace period;
- a removal is a record created the same way; version records are never
  deleted, so a number is never given out again;
- every object read is checked against its SHA-256, and kept in a local
  cache (:mod:`tt_core.disk.registry_cache`) checked again on every read. When the
  store cannot be reached, versions whose content is cached still load.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from tt_core.api.errors import MissingFiles, RegistryError, SavedFolderError, StorageError
from tt_core.disk import manifest, storage
from tt_core.disk.manifest import FILENAME, Manifest
from tt_core.disk.objectstore import ObjectStore, StoreUnreachable
from tt_core.disk.registry_cache import ContentCache
from tt_core.registry import Published, Registry, parse_spec

RECORD_FORMAT = 1
# Objects no record names are removed by gc() only once they are this old: a publish in flight
# uploads its objects first and creates its record within this time (it uploads them again if not).
GRACE_SECONDS = 3600.0
PROGRESS_BYTES = 4 * 2**20  # transfers bigger than this show a tqdm bar (on a terminal)
_CREATE_ATTEMPTS = 1000


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _progress(total: int, description: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        disable=None if total > PROGRESS_BYTES else True,
        leave=False,
    )


class ObjectRegistry(Registry):
    """Published adapters on an object store; the same interface and promises as a local :class:`Registry`."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        grace_seconds: float = GRACE_SECONDS,
    ) -> None:
        url = str(root) if root is not None else os.environ.get("TT_REGISTRY", "")
        self.store = ObjectStore(url, storage_options)
        self.root = self.store.url  # type: ignore[assignment]  # a URL (credentials never in it)
        self.cache = ContentCache(cache_dir, self.store.url)
        self.grace_seconds = float(grace_seconds)
        self._ahead = threading.local()  # what one load() fetched ahead: listings, cached versions

    def __repr__(self) -> str:
        return f"Registry({self.store.url!r})"

    # ------------------------------------------------------------ keys
    @staticmethod
    def _record_key(name: str, version: int, removed: bool = False) -> str:
        return f"records/{name}/{version}.{'removed' if removed else 'json'}"

    @staticmethod
    def _object_key(digest: str) -> str:
        return f"objects/{digest}"

    def _listing(self, name: str | None = None) -> dict[str, tuple[set[int], set[int]]]:
        """name -> (versions with a record, versions with a removal record), from one listing."""
        found: dict[str, tuple[set[int], set[int]]] = {}
        for key in self.store.list("records" if name is None else f"records/{name}"):
            parts = key.split("/")
            if name is not None:
                parts = [name, *parts]
            if len(parts) != 2:
                continue
            stem, _, suffix = parts[1].partition(".")
            if not stem.isdigit() or stem.startswith("0") or suffix not in ("json", "removed"):
                continue
            present, removed = found.setdefault(parts[0], (set(), set()))
            (present if suffix == "json" else removed).add(int(stem))
        return found

    def _numbers(self, name: str, include_removed: bool = False) -> list[int]:
        present, removed = self._listing(name).get(name, (set(), set()))
        return sorted(present | removed) if include_removed else sorted(present - removed)

    def names(self) -> list[str]:
        local = [name for name, (present, removed) in self._listing().items() if present - removed]
        return sorted(set(local) | set(self._packaged()))

    def _version_path(self, name: str, version: int) -> str:  # type: ignore[override]
        return self.store.name(self._record_key(name, version))

    def _half_removed(self) -> list[Path]:
        return []  # a removal is one record: it cannot be cut in half

    # ------------------------------------------------------------ content
    def _fetch(self, digest: str, what: str) -> bytes:
        """The verified bytes of the object ``digest``: from the cache, else from the store (then cached)."""
        cached = self.cache.get(digest, what)
        if cached is not None:
            return cached
        key = self._object_key(digest)
        data = self.store.get(key)
        if _sha256(data) != digest:
            raise SavedFolderError(
                f"{what}: the object {self.store.name(key)} does not match its SHA-256 (damaged in the "
                "store), so it was not loaded; publish the adapter again, or remove that version"
            )
        self.cache.put(digest, data)
        return data

    def _record(self, name: str, version: int) -> dict[str, Any]:
        """The record of ``name@version`` (immutable: cached once read)."""
        record = self.cache.record(name, version)
        if record is None or not self._valid_record(record, name, version):
            key = self._record_key(name, version)
            raw = self.store.get(key)
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not self._valid_record(record, name, version):
                raise SavedFolderError(f"{self.store.name(key)} is not a valid version record")
            self.cache.put_record(name, version, record)
        return record

    @staticmethod
    def _valid_record(record: dict[str, Any], name: str, version: int) -> bool:
        files = record.get("files")
        return (
            record.get("format") == RECORD_FORMAT
            and record.get("name") == name
            and record.get("version") == version
            and isinstance(files, dict)
            and FILENAME in files
            and all(isinstance(d, str) and len(d) == 64 for d in files.values())
        )

    def _manifest(self, name: str, version: int, record: dict[str, Any]) -> Manifest:
        raw = self._fetch(record["files"][FILENAME], f"{name}@{version} {FILENAME}")
        return manifest.parse(Path(f"{name}@{version}") / FILENAME, raw)

    # ------------------------------------------------------------ reading
    def info(self, spec: str) -> Published:
        name, version = parse_spec(spec)
        packaged = self._packaged()
        if name in packaged:
            return super().info(spec)
        try:
            present, removed = self._listing_of(name).get(name, (set(), set()))
        except StoreUnreachable as error:
            return self._offline_info(name, version, error)
        versions = sorted(present - removed)
        if version is not None and version in removed:
            raise RegistryError(f"{name}@{version} was removed (versions left: {versions})")
        if not versions:
            raise RegistryError(
                f"no adapter {name!r} in the registry at {self.store.url} (it has: {self.names()}); "
                "publish it first"
            )
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise RegistryError(
                f"{name!r} has no version {version} in {self.store.url} (versions: {versions})"
            )
        return self._describe_record(name, version, self._record(name, version))

    def _describe_record(self, name: str, version: int, record: dict[str, Any]) -> Published:
        found = self._manifest(name, version, record)
        entry = found.adapters.get(name) or next(iter(found.adapters.values()))
        published = found.extra.get("published")
        published = published if isinstance(published, dict) else {}
        return Published(
            name=name,
            version=version,
            path=self._version_path(name, version),
            method=str(entry.get("method", "?")),
            description=str(published.get("description", "")),
            published_at=str(published.get("published_at", "")),
            source=self.store.protocol,
            added_tokens=list(published.get("added_tokens", [])),
            combined_from=entry.get(manifest.COMBINED_FROM),
        )

    def _offline_info(self, name: str, version: int | None, error: StoreUnreachable) -> Published:
        """``name[@version]`` from the cache, when the store cannot be reached."""
        cached = [v for v in self.cache.versions(name) if self._fully_cached(name, v)]
        if version is None and cached:
            version = cached[-1]
            warnings.warn(
                f"{error}; {name} resolves to {name}@{version}, the newest version in the cache "
                f"({self.cache.folder}), which may not be the newest published",
                stacklevel=3,
            )
        elif version in cached:
            warnings.warn(f"{error}; {name}@{version} loads from the cache", stacklevel=3)
        else:
            have = f" (cached: {[f'{name}@{v}' for v in cached]})" if cached else "; nothing of it is cached"
            raise StoreUnreachable(f"{error}{have}") from None
        record = self.cache.record(name, version)
        assert record is not None
        return self._describe_record(name, version, record)

    def _fully_cached(self, name: str, version: int) -> bool:
        record = self.cache.record(name, version)
        return bool(
            record is not None
            and self._valid_record(record, name, version)
            and all(self.cache.has(digest) for digest in record["files"].values())
        )

    def _listing_of(self, name: str) -> dict[str, tuple[set[int], set[int]]]:
        """The listing of ``name``'s records: the one load() started ahead, else a new one."""
        ahead = getattr(self._ahead, "listings", {}).pop(name, None)
        return ahead.result() if ahead is not None else self._listing(name)

    def load(self, base_model: Any, specs: str | list[str], *args: Any, **kwargs: Any) -> Any:
        """:meth:`Registry.load`; a warm load reads and checks the cached files during the listing.

        The listing of each name's records (one round trip, needed to see the
        newest version and removals) runs in a thread while the version the
        cache suggests (the one asked for, or the newest cached) is read from
        the cache and hashed. What the listing then names is what loads: a
        guess it contradicts is dropped and the version is read as usual.
        """
        spec_list = [specs] if isinstance(specs, str) else list(specs)
        parsed = [parse_spec(spec) for spec in spec_list if isinstance(spec, str)]
        pool = concurrent.futures.ThreadPoolExecutor(max(1, len(parsed)), thread_name_prefix="tt-registry")
        try:
            self._ahead.listings = {name: pool.submit(self._listing, name) for name, _ in parsed}
            self._ahead.read = {}
            for name, version in parsed:
                guess = version if version is not None else max(self.cache.versions(name), default=None)
                if guess is not None and self._fully_cached(name, guess):
                    # On any fault it is read again, as usual, once the listing says which version.
                    with contextlib.suppress(OSError, ValueError):
                        self._ahead.read[(name, guess)] = self._read_version(name, guess)
            return super().load(base_model, specs, *args, **kwargs)
        finally:
            self._ahead.listings, self._ahead.read = {}, {}
            pool.shutdown(wait=False)

    def _read_adapter(self, info: Published) -> storage.SavedAdapter:
        if info.source != self.store.protocol:
            return super()._read_adapter(info)  # a packaged adapter
        ahead = getattr(self._ahead, "read", {}).pop((info.name, info.version), None)
        if ahead is not None:
            return ahead  # read from the cache and checked while the listing ran; the listing names it
        try:
            return self._read_version(info.name, info.version)
        except (FileNotFoundError, MissingFiles) as error:
            removed = False
            try:
                _, gone = self._listing(info.name).get(info.name, (set(), set()))
                removed = info.version in gone
            except StorageError:
                pass
            if removed:
                raise RegistryError(f"{info.spec} was removed while it was being loaded") from None
            # Not removed: an object is missing (a gc in a race, or damage). Not MissingFiles, which
            # load() reports as a removal.
            raise SavedFolderError(str(error)) from None

    def _read_version(self, name: str, version: int) -> storage.SavedAdapter:
        record = self._record(name, version)
        found = self._manifest(name, version, record)
        entry = found.adapters.get(name) or next(iter(found.adapters.values()))
        folder = entry["path"]
        files = {}
        sizes: dict[str, Any] = record["sizes"] if isinstance(record.get("sizes"), dict) else {}
        missing = [f"{folder}/{n}" for n, d in entry["files"].items() if not self.cache.has(d)]
        bar = _progress(sum(int(sizes.get(path, 0)) for path in missing), f"fetching {name}@{version}")
        for filename, digest in entry["files"].items():
            relative = f"{folder}/{filename}"
            if record["files"].get(relative) != digest:
                raise SavedFolderError(
                    f"{name}@{version}: its record {self._version_path(name, version)} and its "
                    f"{FILENAME} disagree about {relative}; publish the adapter again"
                )
            try:
                files[filename] = self._fetch(digest, f"{name}@{version} {relative}")
                bar.update(int(sizes.get(relative, 0)) if relative in missing else 0)
            except FileNotFoundError:
                raise MissingFiles(
                    f"{name}@{version}: the object {self.store.name(self._object_key(digest))} ({relative}) "
                    "is missing from the store"
                ) from None
        bar.close()
        listed_in = Path(f"{name}@{version}") / FILENAME
        return storage.SavedAdapter(Path(f"{name}@{version}") / folder, entry, files, listed_in)

    # ------------------------------------------------------------ writing
    def _publish(
        self,
        name: str,
        files: dict[str, bytes],
        entry: dict[str, Any],
        description: str,
        tokens: list[dict[str, Any]],
        extra: dict[str, Any] | None = None,
    ) -> int:
        published = self._publication(name, description, tokens, extra)
        self.store.check_writable()
        # The same folder a local publish writes: manifest.json and <name>/<snapshot>/<files>.
        folder = f"{name}/{storage.snapshot_name(files)}"
        document = Manifest(
            manifest.FORMAT_VERSION, {name: {"path": folder, **entry}}, [name], {"published": published}
        )
        contents = {FILENAME: document.to_json(), **{f"{folder}/{n}": data for n, data in files.items()}}
        digests = {path: _sha256(data) for path, data in contents.items()}
        uploaded = self._upload(contents, digests, name)
        for _attempt in range(_CREATE_ATTEMPTS):
            if time.monotonic() - uploaded > self.grace_seconds / 2:
                uploaded = self._upload(contents, digests, name)  # gc() may count them as orphans now
            version = max(self._numbers(name, include_removed=True), default=0) + 1
            record = {
                "format": RECORD_FORMAT,
                "name": name,
                "version": version,
                "files": digests,
                "sizes": {path: len(data) for path, data in contents.items()},
            }
            try:
                self.store.create(self._record_key(name, version), json.dumps(record, indent=1).encode())
            except FileExistsError:
                continue  # another publisher took this number first: take the next one
            break
        else:
            raise RegistryError(f"publishing {name} in {self.store.url}: {_CREATE_ATTEMPTS} numbers taken")
        # A gc() that listed these objects as old orphans just before this publish re-uploaded them may
        # have deleted them since: put back any that are gone (the version is readable again at once).
        for path, digest in digests.items():
            if not self.store.exists(self._object_key(digest)):
                self.store.put(self._object_key(digest), contents[path])
        self.cache.put_record(name, version, record)
        return version

    def _upload(self, contents: dict[str, bytes], digests: dict[str, str], name: str) -> float:
        """Put every object (again: a fresh time protects it from gc); return when the upload began."""
        began = time.monotonic()
        with _progress(sum(map(len, contents.values())), f"publishing {name}") as bar:
            for path, data in contents.items():
                self.store.put(self._object_key(digests[path]), data)
                self.cache.put(digests[path], data)
                bar.update(len(data))
        return began

    def remove(self, spec: str) -> None:
        name, version = parse_spec(spec)
        if version is None:
            raise RegistryError(
                f"say which version of {name!r} to remove, e.g. {name}@1 (versions: {self.versions(name)})"
            )
        if name in self._packaged():
            raise RegistryError(
                f"{name!r} is provided read-only by {self._packaged()[name].source}; uninstall it instead"
            )
        self.store.check_writable()
        if version not in self._numbers(name):
            raise self._no_version(name, version)
        removal = {
            "format": RECORD_FORMAT,
            "name": name,
            "version": version,
            "removed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            self.store.create(self._record_key(name, version, removed=True), json.dumps(removal).encode())
        except FileExistsError:
            raise self._no_version(name, version) from None  # another remover was first

    def gc(self) -> list[str]:  # type: ignore[override]
        """Delete objects no version record names that are older than the grace period; return their URLs.

        Version records stay (their numbers are never given out again); the
        objects of removed versions go, once nothing else names them.
        """
        self.store.check_writable()
        objects = self.store.list("objects")  # listed before the records: see docs/registry.md
        listing = self._listing()
        live: set[str] = set()
        for name, (present, removed) in listing.items():
            for version in present - removed:
                live.update(self._record(name, version)["files"].values())
        now = time.time()
        doomed = [
            self._object_key(digest)
            for digest, info in objects.items()
            if digest not in live
            and "/" not in digest
            and info["modified"] is not None
            and now - info["modified"] >= self.grace_seconds
        ]
        if doomed:  # records created while this gc listed: their content stays (narrows the race)
            for name, (present, removed) in self._listing().items():
                known = listing.get(name, (set(), set()))[0]
                for version in present - removed - known:
                    live.update(self._record(name, version)["files"].values())
            doomed = [key for key in doomed if key.removeprefix("objects/") not in live]
        self.store.delete(doomed)
        return [self.store.name(key) for key in doomed]

    def list(self) -> list[Published]:
        """The newest version of every adapter, from one listing of the records (paginated by the store)."""
        listing, packaged = self._listing(), self._packaged()
        found = []
        names = {name for name, (present, removed) in listing.items() if present - removed}
        for name in sorted(names | set(packaged)):
            if name in packaged:
                found.append(packaged[name])  # a broken package too: its problem says why
                continue
            present, removed = listing[name]
            version = max(present - removed)
            try:
                found.append(self._describe_record(name, version, self._record(name, version)))
            except (OSError, ValueError) as error:
                problem = " ".join(str(error).split())
                path = self._version_path(name, version)
                found.append(Published(name, version, path, "?", "", "", "broken", [], problem=problem))
        return found
