"""An object store under a URL, through ``fsspec``: immutable content and records created once.

The registry on object storage (``tt_core.object_registry``) rests on three
operations every store it writes to must have:

- ``put``: write an object whole (a PUT is atomic: readers see all of it or
  nothing). Used for content-addressed objects, whose bytes never change.
- ``create``: write an object only if no object has its key, atomically
  (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, local ``O_EXCL``,
  ``fsspec``'s ``pipe_file(..., mode="create")``); a second creator gets
  ``FileExistsError``. Version records and removal records are created so.
- ``list``: every key under a prefix, with its size and time of writing.

A store that cannot create-if-absent is refused for writing (reading works).
Credentials come from each backend's standard places (environment variables,
config files); they are never put in a URL this module prints: every
message names :attr:`ObjectStore.url`, the URL without user info or query.
"""

from __future__ import annotations

import datetime
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tt_core.api.errors import RegistryError, StorageError

T = TypeVar("T")

# Backends whose create-if-absent is known to be atomic on the server, and how fsspec exposes it.
# s3fs sends If-None-Match: * for pipe_file(mode="create") (botocore > 1.35.20); gcsfs sends
# ifGenerationMatch=0 for mode="create"; the memory and local file systems open with "xb" (O_EXCL).
_CREATE_MODE = {"s3", "s3a", "gs", "gcs", "memory", "file", "local"}
# adlfs: pipe_file(overwrite=False) is azure-storage-blob's upload_blob(overwrite=False), which
# sends If-None-Match: * (not run by the tests: no Azure server is started by them).
_CREATE_NO_OVERWRITE = {"az", "abfs", "abfss"}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}


class StoreUnreachable(StorageError):
    """The store did not answer (connection refused, timed out): cached content may still serve."""


def is_url(root: object) -> bool:
    """Whether ``root`` names an object store (``scheme://...``) rather than a local folder."""
    if not isinstance(root, str) or "://" not in root:
        return False
    scheme = root.split("://", 1)[0].lower()
    return scheme not in ("file", "local") and scheme.isidentifier()


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment: what may appear in records, logs and errors."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _unreachable(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    # botocore's EndpointConnectionError / ConnectTimeoutError / ReadTimeoutError, aiohttp's and
    # requests' connection errors: matched by name, since the backend packages are optional.
    return any("Connect" in name or "Timeout" in name for name in names)


class ObjectStore:
    """Objects under ``url`` (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``memory://...``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = display_url(url).rstrip("/")
        protocol = url.split("://", 1)[0].lower()
        self.protocol = protocol
        options = dict(storage_options or {})
        # A file system of its own: fsspec's shared instances would keep an endpoint or credentials
        # read from the environment when an earlier registry was opened.
        options.setdefault("skip_instance_cache", True)
        # Listings must be fresh: a cached one would hide a version published since, or a removal.
        options.setdefault("use_listings_cache", False)
        if protocol in ("s3", "s3a"):
            # Fail in seconds, not minutes, when the server is gone: cached versions then still load.
            options.setdefault("config_kwargs", {"retries": {"max_attempts": 2}, "connect_timeout": 5})
        import fsspec  # here, not at the top: ``import tt_core`` stays light for ``tt``

        try:
            fs, path = fsspec.core.url_to_fs(url, **options)
        except ImportError as error:
            extra = _EXTRAS.get(protocol)
            hint = f" (pip install 'tt-adapters[{extra}]')" if extra else ""
            raise RegistryError(
                f"the registry {self.url} needs the fsspec backend for {protocol}://{hint}: {error}"
            ) from None
        except ValueError as error:
            raise RegistryError(f"the registry {self.url} is not a URL fsspec knows: {error}") from None
        except OSError as error:  # a backend that connects at once (ftp://, sftp://...)
            raise StorageError(f"the registry {self.url} cannot be opened: {error}") from None
        if protocol in ("s3", "s3a") and hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own retries, on top of botocore's
        self.fs = fs
        self.root = str(path).rstrip("/")

    @property
    def can_create(self) -> bool:
        """Whether this store creates an object only if absent, atomically (needed to write)."""
        return self.protocol in _CREATE_MODE or self.protocol in _CREATE_NO_OVERWRITE

    def check_writable(self) -> None:
        if not self.can_create:
            raise RegistryError(
                f"the registry {self.url} is on {self.protocol}://, whose fsspec backend cannot create an "
                "object only if it is absent; without that two publishers could get one version number, "
                "so it is read-only here. Use s3://, gs://, az://, memory:// or a local folder to publish."
            )

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def name(self, key: str) -> str:
        """The URL of ``key``, for messages."""
        return f"{self.url}/{key}"

    def _call(
        self, step: str, key: str, action: Callable[[], T], passing: tuple[type[OSError], ...] = ()
    ) -> T:
        """Run one request; its errors become StorageError naming the URL, but for those of ``passing``."""
        try:
            return action()
        except passing:
            raise
        except Exception as error:
            text = " ".join(str(error).split()) or type(error).__name__
            if _unreachable(error):
                message = f"the registry {self.url} cannot be reached ({step} {key}): {text}"
                raise StoreUnreachable(message) from None
            if isinstance(error, FileNotFoundError) and "bucket" not in text.lower():
                text = f"{text} (does the bucket or container exist?)"
            raise StorageError(f"the registry {self.url}: {step} {key} failed: {text}") from None

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> bytes:
        """The bytes of ``key``; ``FileNotFoundError`` if there is no such object."""
        # s3fs asks for the size first (a HEAD) to fetch big objects in parallel ranges: one GET instead.
        options = {"max_concurrency": 1} if self.protocol in ("s3", "s3a") else {}
        data = self._call(
            "reading", key, lambda: self.fs.cat_file(self.path(key), **options), (FileNotFoundError,)
        )
        return bytes(data)

    def exists(self, key: str) -> bool:
        return bool(self._call("looking for", key, lambda: self.fs.exists(self.path(key))))

    def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` (a folder-like key): relative key -> {"size", "modified"}."""
        base = self.path(prefix).rstrip("/")
        found = self._call("listing", prefix, lambda: self.fs.find(base, detail=True))
        result = {}
        for full, info in found.items():
            if info.get("type") == "directory":
                continue
            relative = full[len(base) :].lstrip("/") if full.startswith(base) else full
            result[relative] = {"size": info.get("size"), "modified": _modified(info)}
        return result

    # ----------------------------------------------------------------- writes
    def put(self, key: str, data: bytes) -> None:
        """Write ``key`` whole (replacing the same content, for content-addressed keys)."""
        self._call("writing", key, lambda: self.fs.pipe_file(self.path(key), data))

    def create(self, key: str, data: bytes) -> None:
        """Create ``key`` only if absent, atomically on the server; ``FileExistsError`` if it exists."""
        self.check_writable()
        if self.protocol in _CREATE_NO_OVERWRITE:
            action: Callable[[], Any] = lambda: self.fs.pipe_file(self.path(key), data, overwrite=False)  # noqa: E731
        elif self.protocol in ("memory", "file", "local"):
            action = lambda: _create_by_open(self.fs, self.path(key), data)  # noqa: E731
        else:
            action = lambda: self.fs.pipe_file(self.path(key), data, mode="create")  # noqa: E731
        try:
            self._call("creating", key, action, (FileExistsError,))
        except StorageError as error:
            if "ResourceExists" in str(error) or "BlobAlreadyExists" in str(error):
                raise FileExistsError(key) from None
            raise

    def delete(self, keys: Iterable[str]) -> None:
        paths = [self.path(key) for key in keys]
        if paths:
            self._call("deleting", f"{len(paths)} object(s)", lambda: self.fs.rm(paths))


def _create_by_open(fs: Any, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "xb") as handle:
        handle.write(data)


def _modified(info: dict[str, Any]) -> float | None:
    """The time an object was written, in seconds since the epoch; None if the store does not say."""
    for key in ("LastModified", "last_modified", "updated", "mtime", "created"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.timezone.utc)
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=datetime.timezone.utc)
            return parsed.timestamp()
    return None
