"""A shared registry of published adapters: names, versions that never change, packaged adapters.

Layout (see docs/registry.md)::

    root/<name>/<version>/            one published version: a folder written like
                                      save_pretrained's, holding the adapter <name>
    root/<name>/<version>.removed     marks a removed version; numbers are never reused
    root/.tt-tmp-*                    a publish or removal in progress (or killed): ignored, removed by gc

A version appears by one atomic rename of a complete folder, under the
registry's ``filelock`` lock (which also hands out the numbers), and
disappears by one rename to a temporary name, so a reader sees a version
whole or not at all. Installed distributions can ship adapters through the
entry-point group ``tt_core.adapters``; those are listed beside the local
ones and are read-only.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import platformdirs
from torch import nn

from tt_core.api.errors import ArgumentTypeError, RegistryError, StorageError
from tt_core.disk import manifest, objectstore, storage
from tt_core.disk.manifest import ADAPTER_MANIFEST
from tt_core.formats import native, peft
from tt_core.model import AdapterModel
from tt_core.records import check_adapter_name
from tt_core.relocation import (
    Relocation,
    RelocationWarning,
    check_fits,
    plan,
    relocate_saved,
    vocabulary_modules,
)

ENTRY_POINT_GROUP = "tt_core.adapters"
PACKAGED_VERSION = 1
_VERSION = re.compile(r"[1-9][0-9]*")
_REMOVED = ".removed"


def default_root() -> Path:
    """``$TT_REGISTRY`` (a folder or a ``file://`` URL), else the user's data folder (``platformdirs``)."""
    configured = os.environ.get("TT_REGISTRY")
    if configured:
        return Path(configured.removeprefix("file://"))
    return platformdirs.user_data_path("tt-adapters") / "registry"


@dataclasses.dataclass(frozen=True)
class Published:
    """One published version of an adapter."""

    name: str
    version: int
    path: Path | str  # a URL for a registry on object storage
    method: str
    description: str
    published_at: str
    source: str  # "local", "package <distribution> <version>", or "broken"
    added_tokens: list[dict[str, Any]]
    problem: str = ""  # why this version cannot be read; "" when it can
    #: For a combined adapter, what the manifest's ``combined_from`` records (add_weighted_adapter).
    combined_from: dict[str, Any] | None = None

    @property
    def broken(self) -> bool:
        return bool(self.problem)

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["spec"] = self.spec
        data["broken"] = self.broken
        return data


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    if not isinstance(spec, str):
        raise ArgumentTypeError(f"an adapter is named by a string 'name' or 'name@version', got {spec!r}")
    name, _, version = spec.partition("@")
    check_adapter_name(name)
    if not version:
        return name, None
    if not _VERSION.fullmatch(version):
        raise RegistryError(f"{spec!r}: the version after '@' must be a whole number >= 1, e.g. {name}@1")
    return name, int(version)


def added_tokens(tokenizer: Any) -> list[dict[str, Any]]:
    """The tokens added to ``tokenizer`` (a transformers tokenizer), by id.

    ``new`` tells the tokens beyond its base vocabulary (``vocab_size``), the
    ones a load may have to add, from those it had already (its special
    tokens, say), recorded so a load can check their ids.
    """
    special = set(getattr(tokenizer, "all_special_tokens", []))
    base_size = getattr(tokenizer, "vocab_size", None)
    vocabulary = tokenizer.get_added_vocab()
    found = []
    for content, index in sorted(vocabulary.items(), key=lambda item: item[1]):
        token: dict[str, Any] = {"content": content, "id": int(index), "special": content in special}
        if isinstance(base_size, int):
            token["new"] = int(index) >= base_size
        found.append(token)
    return found


def sync_tokenizer(tokenizer: Any, recorded: list[dict[str, Any]], where: str, add: bool = True) -> list[str]:
    """Add the recorded tokens ``tokenizer`` lacks, at their recorded ids; return the ones added.

    Refuses, changing nothing, when a token has another id here or the
    missing ones cannot land on their ids. ``add=False`` only checks, and
    returns the ones it would add.
    """
    vocabulary = tokenizer.get_vocab()
    missing = []
    for token in recorded:
        have = vocabulary.get(token["content"])
        if have is None:
            missing.append(token)
        elif have != token["id"]:
            raise RegistryError(
                f"token {token['content']!r} has id {have} in this tokenizer but {token['id']} in {where}; "
                "the adapter's rows would train the wrong token. Load the tokenizer it was published with."
            )
    missing.sort(key=lambda token: token["id"])
    start = len(tokenizer)
    wanted = [token["id"] for token in missing]
    if wanted != list(range(start, start + len(missing))):
        raise RegistryError(
            f"{where} needs tokens {[t['content'] for t in missing]} at ids {wanted}, but this tokenizer "
            f"has {start} tokens, so they would land at {list(range(start, start + len(missing)))}. "
            "Load the tokenizer the adapter was published with."
        )
    if not add:
        return [token["content"] for token in missing]
    for token in missing:
        tokenizer.add_tokens([token["content"]], special_tokens=token["special"])
        if tokenizer.convert_tokens_to_ids(token["content"]) != token["id"]:
            raise RegistryError(
                f"token {token['content']!r} did not land at id {token['id']} in this tokenizer"
            )
    return [token["content"] for token in missing]


def saved_adapter_names(path: str | os.PathLike[str]) -> list[str]:
    """The adapters a saved folder holds: one ``save_pretrained`` wrote, or PEFT's; [] when it is neither."""
    if peft.is_peft_folder(path):
        return peft.adapter_names(path)
    if manifest.exists(Path(path)):
        return sorted(manifest.read(Path(path)).adapters)
    return []


def _where(infos: list[Published]) -> str:
    """The versions a load names, for its messages."""
    return infos[0].spec if len(infos) == 1 else f"the adapters {[info.spec for info in infos]}"


class Registry:
    """Published adapters under ``root`` (default: :func:`default_root`).

    ``root`` is a folder (or ``file://`` URL), or an object store's URL
    (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``memory://...``): then
    the registry is a :class:`tt_core.object_registry.ObjectRegistry`, which
    takes ``cache_dir=``, ``storage_options=`` and ``grace_seconds=`` too.
    """

    def __new__(cls, root: str | os.PathLike[str] | None = None, **options: Any) -> Registry:
        where = root if root is not None else os.environ.get("TT_REGISTRY")
        if cls is Registry and objectstore.is_url(where):
            from tt_core.object_registry import ObjectRegistry

            return super().__new__(ObjectRegistry)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike[str] | None = None, cache_dir: Any = None) -> None:
        # cache_dir is accepted for a local registry too, which needs no cache, so code can pass it always.
        if isinstance(root, str) and root.startswith("file://"):
            root = root.removeprefix("file://")
        self.root = Path(root) if root is not None else default_root()
        # A folder, or a path a folder can be made at (the first publish makes it): never a file.
        existing = next((path for path in (self.root, *self.root.parents) if path.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "" if existing == self.root else f" (its parent {existing} is a file)"
            raise RegistryError(
                f"the registry {self.root} is not a folder{where}; pass a folder, or a path where one can be "
                "made"
            )

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------ publishing
    def publish(
        self,
        adapter_model: AdapterModel,
        name: str,
        adapter: str | None = None,
        tokenizer: Any = None,
        description: str = "",
    ) -> int:
        """Publish one adapter of ``adapter_model`` as a new version of ``name``; return the version.

        ``adapter`` defaults to the model's only adapter (or its only active
        one). With ``tokenizer``, the tokens added to it are recorded, so
        :meth:`load` can add them to another tokenizer at the same ids.
        """
        if adapter is None:
            candidates = adapter_model.adapters
            if len(candidates) != 1:
                candidates = adapter_model.active_adapters
            if len(candidates) != 1:
                raise RegistryError(
                    f"the model has adapters {adapter_model.adapters}; say which to publish with adapter=..."
                )
            adapter = candidates[0]
        files, entry = native.adapter_files(adapter_model.model, adapter_model.adapter_record(adapter))
        tokens = added_tokens(tokenizer) if tokenizer is not None else []
        return self._publish(name, files, entry, description, tokens)

    def publish_folder(
        self,
        path: str | os.PathLike[str],
        name: str,
        adapter: str | None = None,
        description: str = "",
        tokenizer: Any = None,
    ) -> int:
        """Publish an adapter saved by ``save_pretrained`` (checked first) as a new version of ``name``.

        ``adapter`` may be left out only when the folder holds one adapter.
        A folder in PEFT's format is converted to tt-adapters' files first (docs/peft.md).
        """
        if adapter is None:
            names = saved_adapter_names(path)
            if len(names) > 1:
                raise RegistryError(f"{path} holds adapters {names}; say which to publish with adapter=...")
        if peft.is_peft_folder(path):
            saved = peft.read_one(path, adapter)
        else:
            saved = storage.read(Path(path), adapter)
        native.read_config(saved)
        entry = {key: value for key, value in saved.entry.items() if key != "path"}
        files = dict(saved.files)
        files[ADAPTER_MANIFEST] = (json.dumps(entry, indent=2) + "\n").encode()
        tokens = added_tokens(tokenizer) if tokenizer is not None else []
        return self._publish(name, files, entry, description, tokens)

    def _publication(
        self, name: str, description: str, tokens: list[dict[str, Any]], extra: dict[str, Any] | None
    ) -> dict[str, Any]:
        """What a publish of ``name`` records beside the files; a name or description it refuses raises."""
        check_adapter_name(name)
        if not isinstance(description, str):
            raise ArgumentTypeError(f"description must be a string, got {description!r}")
        if name in self._packaged():
            source = self._packaged()[name].source
            raise RegistryError(f"{name!r} is provided read-only by {source}; publish under another name")
        return {
            "description": description,
            "published_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "added_tokens": tokens,
            **(extra or {}),
        }

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
        self.root.mkdir(parents=True, exist_ok=True)
        # Under the lock: the number is handed out once, and gc() knows no publish is running.
        with storage.locked(self.root):
            staging = storage.temporary_folder(self.root)
            try:
                storage.save(staging, {name: files}, {name: entry}, [name], {"published": published})
                storage.remove(staging / storage.LOCK_FILE)  # nobody writes a published version
                folder = self.root / name
                folder.mkdir(exist_ok=True)
                version = max(self._numbers(name, include_removed=True), default=0) + 1
                os.rename(staging, folder / str(version))
                return version
            finally:
                storage.remove(staging)

    # --------------------------------------------------------------- reading
    def _numbers(self, name: str, include_removed: bool = False) -> list[int]:
        """The versions of ``name`` on disk: those not removed, or (``include_removed``) every number given.

        A version with a ``.removed`` marker is removed, even while its folder
        is still there (a removal that was killed, finished by remove() or gc()).
        """
        folder = self.root / name
        if not folder.is_dir():
            return []
        present, removed = set(), set()
        for child in folder.iterdir():
            stem = child.name.removesuffix(_REMOVED)
            if not _VERSION.fullmatch(stem):
                continue
            if stem != child.name:
                removed.add(int(stem))
            elif child.is_dir():
                present.add(int(stem))
        return sorted(present | removed) if include_removed else sorted(present - removed)

    def _version_path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def _read_adapter(self, info: Published) -> storage.SavedAdapter:
        """The verified files of a published version (or a packaged adapter)."""
        # A package's folder may hold its one adapter under another name ("default", say).
        return next(iter(storage.read_all(Path(info.path), info.name)[1].values()))

    def copy(self, spec: str, destination: Registry) -> int:
        """Publish ``spec`` (``name`` or ``name@version``) as the next version of its name in ``destination``.

        Either registry may be a folder or an object store (``tt registry copy``).
        The destination gives the next number in its own history (numbers are
        never reused there); the record keeps the description, the added tokens
        and where it was copied from. The files are checked against their hashes
        on the way.
        """
        info = self.info(spec)
        if info.source == "broken":
            raise RegistryError(f"{spec} cannot be read: {info.problem}")
        saved = self._read_adapter(info)
        entry = {key: value for key, value in saved.entry.items() if key != "path"}
        files = dict(saved.files)
        files[ADAPTER_MANIFEST] = (json.dumps(entry, indent=2) + "\n").encode()
        copied = {"copied_from": f"{self.root} {info.spec}", "first_published_at": info.published_at}
        if info.version == PACKAGED_VERSION and info.source.startswith("package"):
            copied["copied_from"] = f"{info.source} {info.name}"
        return destination._publish(info.name, files, entry, info.description, info.added_tokens, copied)

    def _packaged(self) -> dict[str, Published]:
        found = {}
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                check_adapter_name(entry_point.name)
                target: Any = entry_point.load()
                path = Path(target() if callable(target) else target)
            except Exception as error:  # a broken package must not hide the rest of the registry
                problem = " ".join(str(error).split())
                description = f"broken: {problem}"
                found[entry_point.name] = Published(
                    entry_point.name, PACKAGED_VERSION, Path(), "?", description, "", "broken", [], problem
                )
                continue
            dist = entry_point.dist
            source = f"package {dist.name} {dist.version}" if dist else f"package {entry_point.value}"
            found[entry_point.name] = self._describe(entry_point.name, PACKAGED_VERSION, path, source)
        return found

    def _describe(self, name: str, version: int, path: Path, source: str) -> Published:
        found = manifest.read(path)
        entry = next(iter(found.adapters.values()))
        published = found.extra.get("published")
        published = published if isinstance(published, dict) else {}
        return Published(
            name=name,
            version=version,
            path=path,
            method=str(entry.get("method", "?")),
            description=str(published.get("description", "")),
            published_at=str(published.get("published_at", "")),
            source=source,
            added_tokens=list(published.get("added_tokens", [])),
            combined_from=entry.get(manifest.COMBINED_FROM),
        )

    def names(self) -> list[str]:
        """Every adapter name: local ones and packaged ones."""
        local = []
        if self.root.is_dir():
            local = [
                child.name
                for child in self.root.iterdir()
                if child.is_dir() and not child.name.startswith(".") and self._numbers(child.name)
            ]
        return sorted(set(local) | set(self._packaged()))

    def versions(self, name: str) -> list[int]:
        """The published versions of ``name`` that still exist, oldest first."""
        check_adapter_name(name)
        if name in self._packaged():
            return [PACKAGED_VERSION]
        return self._numbers(name)

    def info(self, spec: str) -> Published:
        """What ``"name"`` (the newest version) or ``"name@version"`` is."""
        name, version = parse_spec(spec)
        packaged = self._packaged()
        if name in packaged:
            if version not in (None, PACKAGED_VERSION):
                raise RegistryError(f"{name!r} is packaged ({packaged[name].source}) and has only version 1")
            if packaged[name].source == "broken":
                raise RegistryError(f"packaged adapter {name!r} cannot be read: {packaged[name].description}")
            return packaged[name]
        versions = self._numbers(name)
        if version not in (None, *versions) and (self.root / name / f"{version}{_REMOVED}").exists():
            raise RegistryError(f"{name}@{version} was removed (versions left: {versions})")
        if not versions:
            raise RegistryError(
                f"no adapter {name!r} in the registry at {self.root} (it has: {self.names()}); "
                "publish it first"
            )
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise RegistryError(f"{name!r} has no version {version} in {self.root} (versions: {versions})")
        folder = self.root / name / str(version)
        try:
            return self._describe(name, version, folder, "local")
        except (OSError, ValueError):
            if folder.is_dir():
                raise
            # manifest.read reports a missing manifest.json as a ValueError; here it means a remove() won.
            raise RegistryError(f"{name}@{version} was removed while it was being read") from None

    # --------------------------------------------------------------- loading
    def load(
        self,
        base_model: nn.Module,
        specs: str | list[str],
        into: AdapterModel | None = None,
        tokenizer: Any = None,
        is_trainable: bool = False,
        strict: bool = True,
        relocate: bool = False,
    ) -> AdapterModel:
        """Load published adapters, stacked in the given order.

        Returns a new AdapterModel on ``base_model`` with those adapters
        active, or, with ``into``, adds them (inactive) to that one. With
        ``tokenizer``, the tokens recorded at publishing are added to it at
        the same ids and the model's embeddings are resized to match. On any
        error the model is left as it was.

        ``relocate=True`` (with ``tokenizer``) loads adapters whose tokens
        claim the same ids with different strings: the later adapter's tokens
        get fresh ids, its rows move with them, and a
        :class:`~tt_core.relocation.RelocationWarning` says what moved (its
        ``relocation``; :meth:`plan_relocation` tells beforehand). See
        docs/combining.md, "Token collisions".
        """
        spec_list = [specs] if isinstance(specs, str) else list(specs)
        if not isinstance(relocate, bool):
            raise ArgumentTypeError(f"relocate must be True or False, got {relocate!r}")
        if relocate and tokenizer is None:
            raise RegistryError(
                "relocate=True gives tokens new ids in a tokenizer; pass tokenizer=... (the one used with "
                "the model)"
            )
        infos, saved = self._read_for_load(spec_list)
        names = [info.name for info in infos]
        relocation = None
        if relocate:
            relocation, saved = self._relocation(base_model, into, tokenizer, infos, saved, strict)
            self._apply_relocation(base_model, into, tokenizer, relocation, infos)
        elif tokenizer is not None:
            self._prepare_tokenizer(base_model, into, tokenizer, infos, saved, strict)
        target = into if into is not None else AdapterModel(base_model)
        loaded: list[str] = []
        try:
            for info in infos:
                target.load_saved(saved[info.name], info.name, is_trainable, strict)
                loaded.append(info.name)
                # Recorded as a source's version when the adapter is combined (add_weighted_adapter).
                target.adapter_record(info.name).origin = {"name": info.name, "version": info.version}
        except BaseException:
            for name in loaded:
                target.delete_adapter(name)
            if into is None:
                target.unload()  # gives back the requires_grad flags it froze
            raise
        if into is None:
            target.set_adapter(names)
            if not is_trainable:
                target.eval()
        if relocation is not None and relocation.moved:
            warnings.warn(RelocationWarning(relocation), stacklevel=2)
        return target

    def _read_for_load(self, spec_list: list[str]) -> tuple[list[Published], dict[str, storage.SavedAdapter]]:
        """The versions ``spec_list`` names and their verified files (configs checked), by name."""
        infos = [self.info(spec) for spec in spec_list]
        names = [info.name for info in infos]
        if len(set(names)) != len(names):
            raise RegistryError(f"{spec_list} names one adapter twice; an adapter model holds each name once")
        saved = {}
        for info in infos:
            try:
                saved[info.name] = self._read_adapter(info)
            except (FileNotFoundError, storage.MissingFiles):
                raise RegistryError(f"{info.spec} was removed while it was being loaded") from None
            native.read_config(saved[info.name])
        return infos, saved

    def plan_relocation(
        self,
        base_model: nn.Module,
        specs: str | list[str],
        tokenizer: Any,
        into: AdapterModel | None = None,
        strict: bool = True,
    ) -> Relocation:
        """What ``load(base_model, specs, tokenizer=tokenizer, relocate=True)`` would move; changes nothing.

        Raises the error that load would (a method that cannot move its
        tokens exactly, an adapter that would not fit).
        """
        spec_list = [specs] if isinstance(specs, str) else list(specs)
        infos, saved = self._read_for_load(spec_list)
        return self._relocation(base_model, into, tokenizer, infos, saved, strict)[0]

    def _relocation(
        self,
        base_model: nn.Module,
        into: AdapterModel | None,
        tokenizer: Any,
        infos: list[Published],
        saved: dict[str, storage.SavedAdapter],
        strict: bool,
    ) -> tuple[Relocation, dict[str, storage.SavedAdapter]]:
        """The relocation of ``infos``' tokens and their files rewritten for it; every check, no change."""
        relocation = plan(tokenizer.get_vocab(), len(tokenizer), [(i.spec, i.added_tokens) for i in infos])
        model: Any = into.model if into is not None else base_model
        rows = self._rows_after(model, into, tokenizer, list(relocation.tokens), infos)
        vocabulary = vocabulary_modules(model)
        relocated = {}
        for info in infos:
            moves = relocation.moves_for(info.spec)
            relocated[info.name] = relocate_saved(saved[info.name], info.spec, moves, rows, vocabulary)
            check_fits(relocated[info.name], info.spec, model, rows, vocabulary, strict)
        return dataclasses.replace(relocation, rows=rows), relocated

    @staticmethod
    def _apply_relocation(
        base_model: nn.Module,
        into: AdapterModel | None,
        tokenizer: Any,
        relocation: Relocation,
        infos: list[Published],
    ) -> None:
        """Add the planned tokens to ``tokenizer`` and resize the model once, keeping a tied head tied."""
        sync_tokenizer(tokenizer, list(relocation.tokens), _where(infos))
        model: Any = into.model if into is not None else base_model
        if int(model.get_input_embeddings().weight.shape[0]) >= relocation.rows:
            return
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        model.resize_token_embeddings(relocation.rows)
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.tie_weights()

    def hotswap(self, spec: str, adapter_model: AdapterModel, adapter_name: str) -> None:
        """Hot-swap the published adapter ``spec`` into ``adapter_model``'s ``adapter_name``.

        See :meth:`AdapterModel.hotswap_adapter`: the same method on the same
        modules; tensors of the same shape are written in place, so a compiled
        model does not recompile. On any error nothing changes.
        """
        infos, saved = self._read_for_load([spec])
        adapter_model.hotswap_saved(adapter_name, saved[infos[0].name])

    def _prepare_tokenizer(
        self,
        base_model: nn.Module,
        into: AdapterModel | None,
        tokenizer: Any,
        infos: list[Published],
        saved: dict[str, storage.SavedAdapter],
        strict: bool,
    ) -> None:
        # Every check runs before the tokenizer changes: a refused load leaves it as it was.
        recorded: dict[str, dict[str, Any]] = {}  # by content, each with the spec that records it
        at_id: dict[int, dict[str, Any]] = {}
        for info in infos:
            for token in info.added_tokens:
                for seen in (recorded.get(token["content"]), at_id.get(token["id"])):
                    if seen is not None and (seen["content"], seen["id"]) != (token["content"], token["id"]):
                        raise RegistryError(
                            f"{seen['spec']} records token {seen['content']!r} at id {seen['id']} and "
                            f"{info.spec} token {token['content']!r} at id {token['id']}: they were "
                            "published with different tokenizers and cannot be loaded together as they are; "
                            "pass relocate=True to give the later adapter's tokens fresh ids"
                        )
                recorded[token["content"]] = at_id[token["id"]] = {**token, "spec": info.spec}
        tokens = [{k: v for k, v in token.items() if k != "spec"} for token in recorded.values()]
        model: Any = into.model if into is not None else base_model
        rows = self._rows_after(model, into, tokenizer, tokens, infos)
        # What the load checks after the resize (shapes, the base), checked before it.
        vocabulary = vocabulary_modules(model)
        for info in infos:
            check_fits(saved[info.name], info.spec, model, rows, vocabulary, strict)
        sync_tokenizer(tokenizer, tokens, _where(infos))
        if int(model.get_input_embeddings().weight.shape[0]) < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))

    @staticmethod
    def _rows_after(
        model: Any,
        into: AdapterModel | None,
        tokenizer: Any,
        tokens: list[dict[str, Any]],
        infos: list[Published],
    ) -> int:
        """The embedding rows once ``tokens`` are in ``tokenizer``; refuses a model that cannot grow."""
        missing = sync_tokenizer(tokenizer, tokens, _where(infos), add=False)
        rows = int(model.get_input_embeddings().weight.shape[0])
        size = len(tokenizer) + len(missing)
        if rows < size and into is not None and into.adapters:
            raise RegistryError(
                f"the tokenizer would have {size} tokens but the model's embedding {rows} rows, "
                "and a model carrying adapters cannot be resized; resize before adding adapters"
            )
        return max(rows, size)

    # -------------------------------------------------------------- removing
    def remove(self, spec: str) -> None:
        """Remove one version (``"name@version"``); its number is never given out again.

        The ``.removed`` marker removes the version; moving its folder away and
        deleting it follow. A removal killed in between is finished by the next
        ``remove`` of that version or by :meth:`gc`.
        """
        name, version = parse_spec(spec)
        if version is None:
            raise RegistryError(
                f"say which version of {name!r} to remove, e.g. {name}@1 (versions: {self.versions(name)})"
            )
        if name in self._packaged():
            raise RegistryError(
                f"{name!r} is provided read-only by {self._packaged()[name].source}; uninstall it instead"
            )
        folder = self.root / name / str(version)
        if not folder.is_dir():
            raise self._no_version(name, version)
        with storage.locked(self.root):
            if not folder.is_dir():
                raise self._no_version(name, version)
            marker = self.root / name / f"{version}{_REMOVED}"
            if not marker.exists():  # else a killed removal of this version: finish it
                storage.write_file(marker, b"")
                storage.fsync_folder(marker.parent)
            doomed = self._move_away(folder)
        storage.remove(doomed)  # if this is cut short, gc() removes the rest

    def _no_version(self, name: str, version: int) -> RegistryError:
        return RegistryError(
            f"{name!r} has no version {version} in {self.root} (versions: {self.versions(name)})"
        )

    def _move_away(self, folder: Path) -> Path:
        """Rename a removed version's folder into a new temporary folder (lock held); return that."""
        doomed = storage.temporary_folder(self.root)
        try:
            os.rename(folder, doomed / "removed")
        except OSError as error:
            storage.remove(doomed)
            raise StorageError(
                error.errno,
                f"moving {folder} away failed ({error.strerror or error}); its version is removed already, "
                "and gc() or removing it again finishes the job",
            ) from error
        return doomed

    def _half_removed(self) -> list[Path]:
        """Folders of versions whose ``.removed`` marker is written: removals killed before they finished."""
        if not self.root.is_dir():
            return []
        found = []
        for marker in sorted(self.root.glob(f"*/*{_REMOVED}")):
            folder = marker.with_name(marker.name.removesuffix(_REMOVED))
            if not marker.parent.name.startswith(".") and _VERSION.fullmatch(folder.name) and folder.is_dir():
                found.append(folder)
        return found

    def verify(self) -> list[str]:
        """Check every version's files and manifest; return one line per problem (empty when all is well)."""
        problems = []
        for name in self.names():
            for version in self.versions(name):
                spec = f"{name}@{version}"
                try:
                    info = self.info(spec)
                    native.read_config(self._read_adapter(info))
                except (OSError, ValueError) as error:
                    problems.append(f"{spec}: {error}")
        for folder in self._half_removed():
            problems.append(
                f"{folder.parent.name}@{folder.name}: its removal was interrupted and it is still on disk; "
                "gc() (tt registry gc) finishes it"
            )
        return problems

    def gc(self) -> list[Path]:
        """Remove what killed publishes and removals left behind; return what was removed."""
        if not self.root.is_dir():
            return []
        with storage.locked(self.root):
            leftovers = sorted(self.root.glob(f"{storage.TEMPORARY_PREFIX}*"))
            unfinished = self._half_removed()
            doomed = [self._move_away(folder) for folder in unfinished]
            for path in leftovers + doomed:
                storage.remove(path)
        return [path for path in leftovers + unfinished if not os.path.lexists(path)]

    def list(self) -> list[Published]:
        """The newest version of every adapter; one that cannot be read is listed with its ``problem``."""
        found = []
        for name in self.names():
            try:
                found.append(self.info(name))
                continue
            except (OSError, ValueError):
                pass
            packaged = self._packaged().get(name)
            if packaged is not None:
                found.append(packaged)  # a broken package: its problem says why
                continue
            versions = self._numbers(name)
            if not versions:
                continue  # removed meanwhile
            spec = f"{name}@{versions[-1]}"
            try:  # again: the newest may have been removed meanwhile
                found.append(self.info(spec))
            except (OSError, ValueError) as error:
                problem = " ".join(str(error).split())
                path = self._version_path(name, versions[-1])
                found.append(Published(name, versions[-1], path, "?", "", "", "broken", [], problem=problem))
        return found
