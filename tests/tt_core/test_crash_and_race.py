"""Saves and the registry against real processes: killed by SIGKILL, racing each other, read meanwhile.

Three worker processes (tests/support/workers/worker.py) are started once for
the module; each imports torch and tt_core once, then runs many rounds per
command. The kill test forks its saving child from one of them, so every kill
lands on a process that was already saving, and a new one starts at once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from workers import common
from workers.driver import TIMEOUT, started_workers

from tt_core import AdapterModel
from tt_core.disk import manifest, storage
from tt_core.registry import Registry


@pytest.fixture(scope="module")
def workers():
    with started_workers(3) as started:
        yield started


def stray_files(root: Path) -> tuple[list[str], list[str]]:
    """(temporary files and folders, snapshots the manifest does not name) under ``root``."""
    temporary = sorted(path.name for path in root.glob(f"{storage.TEMPORARY_PREFIX}*"))
    named = {entry["path"] for entry in json.loads((root / "manifest.json").read_text())["adapters"].values()}
    unnamed = sorted(
        f"{folder.name}/{snapshot.name}"
        for folder in root.iterdir()
        if folder.is_dir() and not folder.name.startswith(".")
        for snapshot in folder.iterdir()
        if f"{folder.name}/{snapshot.name}" not in named
    )
    return temporary, unnamed


def assert_clean(root: Path) -> None:
    temporary, unnamed = stray_files(root)
    assert temporary == [] and unnamed == [], f"left behind: {temporary + unnamed}"
    for entry in json.loads((root / "manifest.json").read_text())["adapters"].values():
        assert not entry["path"].startswith(storage.TEMPORARY_PREFIX)
        assert storage.SNAPSHOT.fullmatch(Path(entry["path"]).name)


# ------------------------------------------------------------------------------------ kills
KILLS = 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the saving child is forked from a worker")
def test_a_save_killed_at_random_moments_leaves_one_complete_version(workers, tmp_path):
    """SIGKILL a process saving an 80 MB adapter, again and again, at random moments.

    After each kill the folder must load as exactly one complete version: the
    last save that finished, or the one that was running. The next save then
    removes whatever the killed one left.
    """
    worker, root = workers[0], tmp_path / "saved"
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    def run_saves(first: float, count: int) -> int:
        """Fork a child saving ``first``, then the other value, and so on; 0 = until killed."""
        return worker.call("fork_saves", root=str(root), first=first, other=3.0 - first, count=count)["child"]

    def reap(child: int, events: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        worker.send("reap", pid=child)
        events = events + worker.collect("reply")  # the child's lines all come before the reap's answer
        status = events.pop()
        assert "error" not in status, status["error"]
        return status, [event for event in events if event["kind"] in ("begin", "end")]

    def loaded_value() -> float:
        found, adapters = storage.read_all(root)
        assert list(found.adapters) == ["big"] and list(adapters) == ["big"]
        adapter_model = AdapterModel.from_pretrained(common.big_base(), root)
        assert adapter_model.adapters == ["big"]
        return common.value_of(adapter_model, "big")

    def until(condition: Any) -> float:
        """Poll the folder (every millisecond) until ``condition()``; return the time it became true."""
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, "the save never got there"
            time.sleep(0.001)
        return time.monotonic()

    def writing() -> bool:  # a save has begun writing its files: a temporary folder is there
        return any(root.glob(f"{storage.TEMPORARY_PREFIX}*"))

    def a_snapshot_appears() -> Any:
        """A condition: a snapshot folder is there that was not at the previous look (or before)."""
        seen = set(os.listdir(root / "big"))

        def condition() -> bool:
            nonlocal seen
            now = set(os.listdir(root / "big"))
            new, seen = now - seen, now
            return bool(new)

        return condition

    # One complete save first, so that there is a version to keep; and how long its parts take.
    child = run_saves(1.0, 1)
    events = worker.collect("begin")
    started = until(writing)
    events += worker.collect("end")
    write_seconds = time.monotonic() - started  # writing, renaming, switching the manifest, cleaning up
    status, events = reap(child, events)
    assert status["code"] == 0 and [e["kind"] for e in events] == ["begin", "end"]
    seconds = events[-1]["seconds"]
    assert loaded_value() == 1.0

    complete, following = 1.0, 2.0
    mid_save = temporary_left = snapshot_left = 0
    timings = []
    for kill in range(KILLS):
        named = root / json.loads((root / "manifest.json").read_text())["adapters"]["big"]["path"]
        appears = a_snapshot_appears()
        child = run_saves(following, 0)
        events = worker.collect("begin")  # the first save has started
        # Most of a save is serializing and hashing; it writes in the last part. So most kills land
        # in that part: as it begins, as the new snapshot appears (before the manifest names it),
        # as the old one goes (after), at a random moment of it; or at a random moment of the save.
        strategy = kill % 5
        if strategy == 1:
            until(writing)
        elif strategy == 2:
            until(appears)
        elif strategy == 3:
            until(lambda old=named: not (old / "adapter_model.safetensors").exists())
        elif strategy == 4:
            until(writing)
            time.sleep(rng.uniform(0.0, write_seconds))
        else:
            time.sleep(rng.uniform(0.0, 1.25 * seconds))
        os.kill(child, signal.SIGKILL)
        status, events = reap(child, events)
        assert status == {"kind": "reply", "op": "reap", "signal": "SIGKILL"}
        ends = [event["value"] for event in events if event["kind"] == "end"]
        if ends:
            complete = ends[-1]
        running = events[-1]["value"] if events[-1]["kind"] == "begin" else None
        mid_save += running is not None
        temporary, unnamed = stray_files(root)
        temporary_left += bool(temporary)
        snapshot_left += bool(unnamed)

        check = time.perf_counter()
        value = loaded_value()
        timings.append(time.perf_counter() - check)
        assert value in {complete, running}, (value, complete, running, seed)
        complete = value  # a killed save that switched the manifest did complete
        following = running if running is not None else 3.0 - complete

    # A last save that finishes cleans up everything the killed ones left.
    status, events = reap(run_saves(following, 1), [])
    assert status["code"] == 0 and [e["kind"] for e in events] == ["begin", "end"]
    assert loaded_value() == following
    assert_clean(root)
    assert sorted(path.name for path in root.iterdir()) == [storage.LOCK_FILE, "big", "manifest.json"]

    print(
        f"\n{KILLS} kills (seed {seed}), a save takes {seconds:.2f}s ({write_seconds:.2f}s of writing and "
        f"switching): {mid_save} landed mid-save, "
        f"{temporary_left} left temporary files, {snapshot_left} left an unnamed snapshot (which the next "
        f"save, of the same content, takes over); a check load takes {sum(timings) / len(timings):.2f}s"
    )
    # Otherwise the test proved nothing about a save being killed.
    assert mid_save >= 1 and temporary_left + snapshot_left >= 1
    shutil.rmtree(root)  # 80 MB: not worth keeping among pytest's last three temporary folders


# ---------------------------------------------------------------------------- many writers
ROUNDS = 20


def values_for(writer: int, rounds: int = ROUNDS) -> list[float]:
    """Writer ``writer``'s contents, one per round, unique across writers."""
    return [float(1000 * (writer + 1) + step) for step in range(rounds)]


def test_writers_of_different_names_into_one_folder_keep_every_name(workers, tmp_path):
    root = tmp_path / "saved"
    names = [f"writer{i}" for i in range(len(workers))]
    for i, worker in enumerate(workers):
        worker.send("save", root=str(root), name=names[i], values=values_for(i))
    for worker in workers:
        assert worker.reply()["saved"] == ROUNDS

    found, _ = storage.read_all(root)
    assert sorted(found.adapters) == names
    adapter_model = AdapterModel.from_pretrained(common.small_base(), root)
    assert sorted(adapter_model.adapters) == names
    for i, name in enumerate(names):
        assert common.value_of(adapter_model, name) == values_for(i)[-1]
        alone = AdapterModel.from_pretrained(common.small_base(), root, adapter_name=name)
        assert common.value_of(alone, name) == values_for(i)[-1]
    assert_clean(root)


def test_writers_of_one_name_leave_one_complete_version(workers, tmp_path):
    root = tmp_path / "saved"
    for i, worker in enumerate(workers):
        worker.send("save", root=str(root), name="shared", values=values_for(i))
    for worker in workers:
        assert worker.reply()["saved"] == ROUNDS

    adapter_model = AdapterModel.from_pretrained(common.small_base(), root)
    assert adapter_model.adapters == ["shared"]
    # The save that switched the manifest last is some writer's last one.
    assert common.value_of(adapter_model, "shared") in {values_for(i)[-1] for i in range(len(workers))}
    assert_clean(root)


def test_readers_during_writers_always_see_a_complete_version(workers, tmp_path):
    root, stop, started = tmp_path / "saved", tmp_path / "stop", tmp_path / "started"
    (reader, *writers) = workers
    rounds = 30
    seed_model = common.adapted(common.small_base(), "shared")
    common.fill(seed_model, "shared", 1.0)
    seed_model.save_pretrained(root)
    # Writer 0 alternates two contents of "shared", so a manifest's bytes come back (A, B, A);
    # writer 1 replaces "other", a second adapter of the same folder, with new contents.
    shared, other = [7.0, 8.0] * rounds, values_for(1, rounds)
    allowed = {"shared": [1.0, 7.0, 8.0], "other": other}
    reader.send("read", root=str(root), allowed=allowed, stop=str(stop), started=str(started))
    writers[0].send("save", root=str(root), name="shared", values=shared, after=[str(started)])
    writers[1].send("save", root=str(root), name="other", values=other, after=[str(started)])
    for writer in writers:
        writer.reply()
    stop.touch()
    answer = reader.reply()
    assert answer["errors"] == [], "\n".join(answer["errors"])
    # The reader saw the folder before, after, and while the writers wrote.
    assert answer["states"] >= 3, answer
    final = AdapterModel.from_pretrained(common.small_base(), root)
    assert common.value_of(final, "shared") == shared[-1] and common.value_of(final, "other") == other[-1]
    assert_clean(root)
    print(f"\n{2 * rounds} + {rounds} saves: {answer['reads']} reads, {answer['states']} states seen")


def _saver(root: Path, name: str = "shared"):
    """An in-process writer: ``save(value)`` saves adapter ``name`` filled with ``value`` into ``root``."""
    adapter_model = common.adapted(common.small_base(), name)

    def save(value: float) -> None:
        common.fill(adapter_model, name, value)
        adapter_model.save_pretrained(root)

    return save


def _during_first_read(monkeypatch, action):
    """Run ``action(read)`` in place of the first snapshot read of a load; ``read`` is the real one."""
    original, calls = manifest.read_files, []

    def read_files(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            return action(lambda: original(*args))
        return original(*args)

    monkeypatch.setattr(manifest, "read_files", read_files)
    return calls


def test_a_reader_reads_again_when_a_writer_removes_its_snapshot_meanwhile(tmp_path, monkeypatch):
    save = _saver(tmp_path)
    save(1.0)

    def writer_wins(read):
        save(2.0)  # switches the manifest, then removes the snapshot of 1.0 this read was about to take
        return read()

    calls = _during_first_read(monkeypatch, writer_wins)
    assert common.value_of(AdapterModel.from_pretrained(common.small_base(), tmp_path), "shared") == 2.0
    assert len(calls) == 2


def test_a_reader_reads_again_when_it_sees_a_snapshot_half_removed(tmp_path, monkeypatch):
    save = _saver(tmp_path)
    save(1.0)
    old = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["adapters"]["shared"]["path"]

    def half_removed(read):
        save(2.0)
        old.mkdir()  # what shutil.rmtree of the old snapshot leaves halfway: some of its files
        (old / "adapter_config.json").write_text("{}")
        return read()

    calls = _during_first_read(monkeypatch, half_removed)
    assert common.value_of(AdapterModel.from_pretrained(common.small_base(), tmp_path), "shared") == 2.0
    assert len(calls) == 2


def test_a_reader_reads_again_when_the_manifest_comes_back_to_the_same_bytes(tmp_path, monkeypatch):
    save = _saver(tmp_path)
    save(1.0)
    first = (tmp_path / "manifest.json").read_bytes()

    def a_b_a(read):
        save(2.0)  # the snapshot this read wanted is removed...
        try:
            return read()
        finally:
            save(1.0)  # ...and made again: the manifest holds the bytes the reader read first
            assert (tmp_path / "manifest.json").read_bytes() == first

    calls = _during_first_read(monkeypatch, a_b_a)
    assert common.value_of(AdapterModel.from_pretrained(common.small_base(), tmp_path), "shared") == 1.0
    assert len(calls) == 2


def test_a_snapshot_really_gone_is_still_reported_at_once(tmp_path, monkeypatch):
    save = _saver(tmp_path)
    save(1.0)
    (snapshot,) = (tmp_path / "shared").iterdir()
    (snapshot / "adapter_model.safetensors").unlink()
    original, readings = manifest.parse, []
    monkeypatch.setattr(manifest, "parse", lambda *args: readings.append(args) or original(*args))
    with pytest.raises(
        ValueError, match=r"does not hold the files.*missing: \['adapter_model.safetensors'\]"
    ):
        AdapterModel.from_pretrained(common.small_base(), tmp_path)
    assert len(readings) == 2  # one more reading to be sure nobody is writing, not twenty


# ------------------------------------------------------------------------------- registry
def test_concurrent_publishes_get_unique_consecutive_versions(workers, tmp_path):
    root, rounds = tmp_path / "registry", 10
    for i, worker in enumerate(workers):
        worker.send("publish", root=str(root), name="shared", values=values_for(i, rounds))
    published = {}
    for worker in workers:
        for version, value in worker.reply()["published"]:
            assert version not in published, f"version {version} handed out twice"
            published[version] = value
    registry = Registry(root)
    assert sorted(published) == list(range(1, len(workers) * rounds + 1))
    assert registry.versions("shared") == sorted(published)
    for version, value in published.items():
        adapter_model = registry.load(common.small_base(), f"shared@{version}")
        assert common.value_of(adapter_model, "shared") == value
    assert registry.verify() == []
    assert list(root.glob(f"{storage.TEMPORARY_PREFIX}*")) == []


def test_loads_during_removals_return_the_adapter_or_say_it_was_removed(workers, tmp_path):
    root, stop, count = tmp_path / "registry", tmp_path / "stop", 40
    registry = Registry(root)
    adapter_model = common.adapted(common.small_base(), "default")
    expected = {}
    for step in range(count):
        common.fill(adapter_model, "default", float(step + 1))
        expected[str(registry.publish(adapter_model, "shared"))] = float(step + 1)
    loaders, remover = workers[:2], workers[2]
    started = [tmp_path / f"started{i}" for i in range(len(loaders))]
    for i, loader in enumerate(loaders):
        loader.send(
            "registry_load",
            root=str(root),
            name="shared",
            expected=expected,
            stop=str(stop),
            seed=i,
            started=str(started[i]),
        )
    order = random.sample(sorted(expected, key=int), count)
    remover.call(
        "remove", root=str(root), specs=[f"shared@{v}" for v in order], after=[str(s) for s in started]
    )
    stop.touch()
    totals = {"loaded": 0, "removed": 0, "raced": 0}
    for loader in loaders:
        answer = loader.reply()
        assert answer["errors"] == [], "\n".join(answer["errors"])
        for key in totals:
            totals[key] += answer[key]
    assert totals["loaded"] >= len(loaders) and totals["removed"] >= 1, totals
    print(f"\n{count} removals: {totals}")
    assert registry.versions("shared") == []
    with pytest.raises(ValueError, match="was removed"):
        registry.load(common.small_base(), "shared@1")
    assert registry.gc() == []  # every removal cleaned up after itself


def _count_readings(monkeypatch) -> list[Any]:
    """Every parse of a manifest.json from now on (a reader's retry reads the manifest again)."""
    original, readings = manifest.parse, []
    monkeypatch.setattr(manifest, "parse", lambda *args: readings.append(args) or original(*args))
    return readings


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"x"), "does not match the hash"),
        (lambda folder: (folder / "notes.txt").write_text("hi"), "not listed: ['notes.txt']"),
    ],
    ids=["bad hash", "stray file"],
)
def test_damage_no_writer_causes_is_reported_at_the_first_reading(tmp_path, monkeypatch, damage, fragment):
    """Only files gone (MissingFiles) can be a writer's clean-up; anything else is reported at once."""
    _saver(tmp_path)(1.0)
    (snapshot,) = (tmp_path / "shared").iterdir()
    damage(snapshot)
    readings = _count_readings(monkeypatch)
    with pytest.raises(ValueError) as raised:
        AdapterModel.from_pretrained(common.small_base(), tmp_path)
    assert fragment in str(raised.value) and not isinstance(raised.value, storage.MissingFiles)
    assert len(readings) == 1


def test_a_registry_version_with_a_corrupt_manifest_or_file_is_reported_at_once(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry")
    adapter_model = common.adapted(common.small_base(), "default")
    for value in (1.0, 2.0):
        common.fill(adapter_model, "default", value)
        registry.publish(adapter_model, "shared")
    (tmp_path / "registry" / "shared" / "1" / "manifest.json").write_text('{"format_version": 2,')
    (snapshot,) = (tmp_path / "registry" / "shared" / "2" / "shared").iterdir()
    (snapshot / "adapter_model.safetensors").write_bytes(b"x")
    readings = _count_readings(monkeypatch)
    with pytest.raises(ValueError, match=r"shared/1/manifest.json: is not valid JSON"):
        registry.load(common.small_base(), "shared@1")
    assert len(readings) == 1
    readings.clear()
    with pytest.raises(ValueError, match="does not match the hash"):
        registry.load(common.small_base(), "shared@2")
    assert len(readings) == 2  # info() reads the manifest, then the load reads it once
    readings.clear()
    problems = registry.verify()
    assert len(problems) == 2, problems
    assert "is not valid JSON" in problems[0] and "does not match the hash" in problems[1]
    assert len(readings) <= 4, readings  # each version: info() once, and its files' reading once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the removing child is forked from a worker")
def test_a_remove_killed_at_each_step_is_finished_by_remove_or_gc(workers, tmp_path):
    """SIGKILL a process removing a version just before each of its file-system steps, twice each.

    Afterwards the version is listed whole or not at all; removing it again
    (first round) or gc() (second round) finishes the job, verify() is clean,
    nothing is left behind, and its number is never given out again.
    """
    worker, root = workers[0], tmp_path / "registry"
    registry = Registry(root)
    adapter_model = common.adapted(common.small_base(), "default")

    def publish(value: float) -> int:
        common.fill(adapter_model, "default", value)
        return registry.publish(adapter_model, "shared")

    def remove_killed(version: int, kill_at: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        child = worker.call("fork_remove", root=str(root), spec=f"shared@{version}", kill_at=kill_at)["child"]
        worker.send("reap", pid=child)
        messages = worker.collect("reply")
        return messages[-1], messages[:-1]

    kept = publish(0.5)  # a version nobody removes: it must stay intact throughout
    status, messages = remove_killed(publish(1.0), -1)  # never killed: records the steps
    assert status["code"] == 0, status
    steps = messages[-1]["steps"]
    assert any(step.startswith("open(xb)") for step in steps) and any(s.startswith("rename") for s in steps)

    given = [kept, 2]
    outcomes = {"still listed": 0, "half removed": 0, "moved away": 0}
    for kill_at in range(len(steps)):
        for finish in ("remove", "gc"):
            version = publish(float(10 * kill_at + (finish == "gc")))
            assert version not in given, f"version {version} given out twice"
            given.append(version)
            status, _ = remove_killed(version, kill_at)
            assert status.get("signal") == "SIGKILL", (kill_at, status)
            folder = root / "shared" / str(version)
            listed = version in registry.versions("shared")
            where = f"killed before step {kill_at} ({steps[kill_at]}), finished by {finish}"
            if listed:
                outcomes["still listed"] += 1
                loaded = registry.load(common.small_base(), f"shared@{version}")
                assert common.value_of(loaded, "shared") == float(10 * kill_at + (finish == "gc")), where
            else:
                outcomes["half removed" if folder.exists() else "moved away"] += 1
                if folder.exists():
                    (problem,) = registry.verify()
                    assert problem.startswith(f"shared@{version}: its removal was interrupted"), problem
                with pytest.raises(ValueError, match="was removed"):
                    registry.load(common.small_base(), f"shared@{version}")
            if finish == "gc":
                registry.gc()
                # A removal that had not begun (no marker yet) is not gc's to finish: the version stays.
                assert (version in registry.versions("shared")) == listed, where
            if listed or folder.exists():
                registry.remove(f"shared@{version}")
            else:
                with pytest.raises(ValueError, match=f"'shared' has no version {version}"):
                    registry.remove(f"shared@{version}")
            registry.gc()
            assert registry.gc() == [], where
            assert version not in registry.versions("shared") and not folder.exists(), where
            assert registry.verify() == [], where
            assert sorted(root.glob(f"{storage.TEMPORARY_PREFIX}*")) == [], where
            assert registry.versions("shared") == [kept], where
    assert publish(9.0) == max(given) + 1
    print(f"\n{len(steps)} steps of a remove, {2 * len(steps)} kills: {outcomes}")
    assert outcomes["still listed"] and outcomes["moved away"], outcomes
