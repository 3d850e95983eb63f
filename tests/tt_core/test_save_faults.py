"""Every file-system step of a save, failed in turn.

The steps are recorded once by wrapping the ``os`` calls a save makes
(``mkdir``, ``open``, ``fsync``, ``rename``, ``replace``, ``link``, ``unlink``,
``rmdir``, and the ``open(..., "xb")`` that writes each file); then, for each
step, a fresh copy of the folder is saved into with that one step raising
``OSError`` (EIO, and EINVAL for an ``fsync``, as some network file systems
answer for a folder). After each: the folder loads as exactly the old save or
exactly the new one, no temporary is left (unless the failed step was itself a
removal, whose leftover the next save removes), and if the old save is still
there the save raised an ``OSError`` naming the problem.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import build

from tt_core import AdapterModel
from tt_core.disk import storage
from tt_plugins.trainable_tokens import TrainableTokensConfig

TOKENS = [10, 11, 12]
WRAPPED = ("mkdir", "open", "fsync", "rename", "replace", "link", "unlink", "rmdir")
REMOVALS = ("unlink", "rmdir")


def _adapter_model(names: tuple[str, ...], seed: int) -> AdapterModel:
    adapter_model = AdapterModel(build("llama"))
    torch.manual_seed(seed)
    for name in names:
        adapter_model.add_adapter(name, TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    adapter_model.set_adapter(list(names))
    return adapter_model


def _state(adapter_model: AdapterModel) -> dict[str, Any]:
    """What a load gives: the active stack, each adapter's config and rows."""
    layer = adapter_model.model.model.embed_tokens
    return {
        "active": adapter_model.active_adapters,
        "configs": {name: config.to_dict() for name, config in adapter_model.adapter_configs.items()},
        "rows": {name: s.trainable_tokens_rows.detach().clone() for name, s in layer.adapters.items()},
    }


def _same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a["active"] == b["active"]
        and a["configs"] == b["configs"]
        and a["rows"].keys() == b["rows"].keys()
        and all(torch.equal(a["rows"][name], b["rows"][name]) for name in a["rows"])
    )


def _loaded(root: Path) -> dict[str, Any] | None:
    """The folder's state as a load sees it; None when it holds no save (no manifest)."""
    if not (root / "manifest.json").exists():
        return None
    return _state(AdapterModel.from_pretrained(build("llama"), root))


class Steps:
    """Wraps the ``os`` calls of a save: records them, or makes the ``fail``-th one raise ``error``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: int | None = None, error: int = 0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail, self.error, self.failed = fail, error, None
        for name in WRAPPED:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        # storage writes each file with the built-in open(path, "xb"): a step of its own.
        real_open = builtins.open
        monkeypatch.setattr(storage, "open", self._wrap("open(xb)", real_open), raising=False)

    def _wrap(self, name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            target = args[0] if args else ""
            where = os.fspath(target) if isinstance(target, (str, os.PathLike)) else f"fd {target}"
            if self.fail == len(self.calls):
                self.failed = (name, where)
                self.calls.append((name, where))
                filename = None if where.startswith("fd ") else where
                raise OSError(self.error, os.strerror(self.error), filename)
            self.calls.append((name, where))
            return real(*args, **kwargs)

        return call


SCENARIOS = {
    # old folder content -> the new save's adapters
    "replace a save": (("tokens",), ("tokens", "other")),
    "first save": (None, ("tokens", "other")),
    "keep one, replace one": (("tokens", "other"), ("tokens",)),
}


def _setup(tmp_path: Path, scenario: str) -> tuple[Path, dict[str, Any] | None, AdapterModel, dict[str, Any]]:
    old_names, new_names = SCENARIOS[scenario]
    template = tmp_path / "template"
    template.mkdir()
    old = None
    if old_names:
        _adapter_model(old_names, seed=0).save_pretrained(template)
        old = _loaded(template)
    newer = _adapter_model(new_names, seed=1)
    expected = tmp_path / "expected"
    shutil.copytree(template, expected)
    newer.save_pretrained(expected)
    return template, old, newer, _loaded(expected)  # type: ignore[return-value]


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"{storage.TEMPORARY_PREFIX}*"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_step_of_a_save_failing_leaves_the_old_save_or_the_new_one(tmp_path, monkeypatch, scenario):
    template, old, newer, new = _setup(tmp_path, scenario)
    recording = tmp_path / "recording"
    shutil.copytree(template, recording)
    with monkeypatch.context() as patch:
        steps = Steps(patch)
        newer.save_pretrained(recording)
    assert _same(_loaded(recording), new)
    kinds = {name for name, _ in steps.calls}
    assert {"mkdir", "fsync", "rename", "replace", "open(xb)"} <= kinds, steps.calls

    faults = [(i, errno.EIO) for i in range(len(steps.calls))]
    faults += [(i, errno.EINVAL) for i, (name, _) in enumerate(steps.calls) if name == "fsync"]
    outcomes: dict[str, int] = {}
    for number, (step, error) in enumerate(faults):
        root = tmp_path / f"run{number}"
        shutil.copytree(template, root)
        raised: BaseException | None = None
        with warnings.catch_warnings(record=True) as warned, monkeypatch.context() as patch:
            warnings.simplefilter("always")
            injected = Steps(patch, fail=step, error=error)
            try:
                newer.save_pretrained(root)
            except OSError as caught:
                raised = caught
        where = f"step {step} {steps.calls[step]} failing with {errno.errorcode[error]}"
        assert injected.failed is not None, f"{where}: the save made fewer calls than when recorded"
        state = _loaded(root)
        if _same(state, old):
            outcome = "old"
            assert raised is not None, f"{where}: the old save is still there, yet the save reported success"
            assert str(root) in str(raised) or (raised.filename and str(root) in str(raised.filename)), (
                f"{where}: the error does not name the folder: {raised!r}"
            )
        else:
            assert _same(state, new), f"{where}: the folder loads as neither the old save nor the new one"
            outcome = "new"
            if raised is not None:
                assert "in place" in str(raised), f"{where}: {raised!r} does not say the new save is in place"
            for warning in warned:
                assert str(root) in str(warning.message), f"{where}: {warning.message}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        left = _temporaries(root)
        if injected.failed[0] in REMOVALS:
            # The one removal that failed may leave its file; the next save removes it.
            newer.save_pretrained(root)
            assert _same(_loaded(root), new) and _temporaries(root) == [], where
        else:
            assert left == [], f"{where}: left {left}"
        shutil.rmtree(root)
    print(f"\n{scenario}: {len(steps.calls)} steps, {len(faults)} faults, outcomes {outcomes}")
    assert outcomes.get("old", 0) >= 1 and outcomes.get("new", 0) >= 1


def _fsync_failing_after_the_switch(patch: pytest.MonkeyPatch, error: int) -> None:
    """Every fsync after ``manifest.json`` is replaced raises ``error``."""
    real_replace, real_fsync, switched = os.replace, os.fsync, []

    def replace(source: Any, destination: Any) -> None:
        real_replace(source, destination)
        switched.append(Path(destination).name == "manifest.json")

    def fsync(descriptor: int) -> None:
        if any(switched):
            raise OSError(error, os.strerror(error))
        real_fsync(descriptor)

    patch.setattr(os, "replace", replace)
    patch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("error", [errno.EINVAL, errno.EIO], ids=["EINVAL", "EIO"])
def test_a_failing_folder_fsync_after_the_switch_keeps_the_new_save_loadable(tmp_path, monkeypatch, error):
    """The reported case: fsync of the folder after the manifest switch fails."""
    template, _, newer, new = _setup(tmp_path, "replace a save")
    root = tmp_path / "saved"
    shutil.copytree(template, root)
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _fsync_failing_after_the_switch(patch, error)
        newer.save_pretrained(root)  # the switch happened: the save succeeded
    assert _same(_loaded(root), new)
    for entry in json.loads((root / "manifest.json").read_text())["adapters"].values():
        assert (root / entry["path"]).is_dir(), f"{entry['path']} is listed but was removed"
    messages = [str(warning.message) for warning in warned]
    if error == errno.EINVAL:  # a file system that cannot flush folders: nothing to say
        assert messages == []
    else:
        (message,) = messages
        assert str(root) in message and "the new manifest is in place and loads" in message
        assert "may hold the previous save" in message
