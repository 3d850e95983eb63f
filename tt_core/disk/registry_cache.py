"""The local cache of content fetched from a registry on object storage.

Layout (default folder: ``platformdirs``' user cache folder, or ``cache_dir=``)::

    cache/objects/<sha256>                       content, named by the SHA-256 of its bytes
    cache/records/<store>/<name>/<version>.json  version records seen, with their SHA-256, for
                                                 offline loads (<store>: a hash of the registry's URL)

Every read of an object hashes its bytes (and every read of a record checks
the hash stored beside it): an entry whose hash does not match (a flipped
byte, a truncated write) is reported with a warning, removed, and treated as
absent, so the caller fetches it again; damaged
content is never returned. Entries are written to a temporary file and
renamed into place (``os.replace``), so a reader never sees half an entry;
two processes caching one object write the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import platformdirs


def default_folder() -> Path:
    """``$TT_REGISTRY_CACHE``, else the user's cache folder (``platformdirs``)."""
    configured = os.environ.get("TT_REGISTRY_CACHE")
    if configured:
        return Path(configured)
    return platformdirs.user_cache_path("tt-adapters") / "registry"


class ContentCache:
    """Content-addressed objects and version records under ``folder``, verified on every read."""

    def __init__(self, folder: str | os.PathLike[str] | None, store_url: str) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.store_id = hashlib.sha256(store_url.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ContentCache({str(self.folder)!r})"

    def _object(self, digest: str) -> Path:
        return self.folder / "objects" / digest

    def _record(self, name: str, version: int) -> Path:
        return self.folder / "records" / self.store_id / name / f"{version}.json"

    # ---------------------------------------------------------------- objects
    def get(self, digest: str, what: str = "") -> bytes | None:
        """The cached bytes of ``digest``, checked against it; None if absent or damaged (then removed)."""
        path = self._object(digest)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            warnings.warn(
                f"the cached copy {path}{f' of {what}' if what else ''} does not match its SHA-256 "
                "(damaged in the cache); it is removed and fetched again",
                stacklevel=3,
            )
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def has(self, digest: str) -> bool:
        return self._object(digest).is_file()

    def put(self, digest: str, data: bytes) -> None:
        """Keep ``data`` (whose SHA-256 is ``digest``, checked by the caller); best effort."""
        self._write(self._object(digest), data)

    # ---------------------------------------------------------------- records
    def put_record(self, name: str, version: int, record: dict[str, Any]) -> None:
        body = json.dumps(record, sort_keys=True)
        document = {"sha256": hashlib.sha256(body.encode()).hexdigest(), "record": body}
        self._write(self._record(name, version), json.dumps(document).encode())

    def record(self, name: str, version: int) -> dict[str, Any] | None:
        """The cached record of ``name@version``, checked against its hash; None if absent or damaged."""
        path = self._record(name, version)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            document = json.loads(data)
            body = document["record"]
            if hashlib.sha256(body.encode()).hexdigest() != document["sha256"]:
                raise ValueError("hash mismatch")
            record = json.loads(body)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, KeyError, TypeError, AttributeError):
            warnings.warn(
                f"the cached record {path} of {name}@{version} is damaged; it is removed and read again",
                stacklevel=3,
            )
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return record

    def versions(self, name: str) -> list[int]:
        """The versions of ``name`` whose records are cached."""
        folder = self.folder / "records" / self.store_id / name
        try:
            stems = [path.name.removesuffix(".json") for path in folder.iterdir()]
        except OSError:
            return []
        return sorted(int(stem) for stem in stems if stem.isdigit())

    def _write(self, path: Path, data: bytes) -> None:
        # A cache is an optimisation: a full disk or a read-only folder costs a fetch, not the load.
        temporary = path.with_name(f".tmp-{secrets.token_hex(8)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except OSError as error:
            warnings.warn(f"could not cache {path}: {error}", stacklevel=3)
            with contextlib.suppress(OSError):
                temporary.unlink()
