"""The registry on a real S3 server against real processes: racing publishers, killed publishers.

The server is moto in server mode on localhost (tests/conftest.py, one per
session). Worker processes (tests/support/workers/worker.py) import torch and
tt_core once; publishers are forked from them, so many start at once and a
killed one is replaced at once.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from workers import common
from workers.driver import started_workers

from tt_core.registry import Registry

NAME = "shared"


@pytest.fixture(scope="module")
def workers(s3_server, tmp_path_factory):
    cache = tmp_path_factory.mktemp("worker-cache")
    with started_workers(3, {"TT_REGISTRY_CACHE": str(cache)}) as started:
        yield started


@pytest.fixture
def url(s3_server):
    return f"s3://{s3_server.bucket()}/team/registry"


def test_eight_publishers_get_versions_1_to_30_once_while_loads_and_removes_never_see_a_torn_version(
    workers, url, tmp_path
):
    publisher, loader, remover = workers
    values = [[float(100 * i + k + 1) for k in range(4 if i < 6 else 3)] for i in range(8)]  # 30 in all
    allowed = [value for own in values for value in own]
    go, stop = tmp_path / "go", tmp_path / "stop"
    children = publisher.call("fork_publishers", root=url, name=NAME, values=values, after=[str(go)])
    loader.send("load_listed", root=url, name=NAME, allowed=allowed, stop=str(stop), seed=1)
    remover.send("remove_listed", root=url, name=NAME, count=5, after=[str(go)], seed=2)
    go.touch()
    published: dict[int, float] = {}
    for _ in values:
        message = publisher.collect("published")[-1]
        for version, value in message["published"]:
            assert version not in published, f"version {version} handed out twice"
            published[version] = value
    for pid in children["children"]:
        assert publisher.call("reap", pid=pid) == {"kind": "reply", "op": "reap", "code": 0}
    removed = remover.reply()["removed"]
    stop.touch()
    loads = loader.reply()
    assert not loads["errors"], "\n".join(loads["errors"])
    assert loads["loaded"] > 0

    assert sorted(published) == list(range(1, 31))  # none lost, none twice
    registry = Registry(url, cache_dir=tmp_path / "cache")
    assert len(set(removed)) == 5
    assert registry.versions(NAME) == sorted(set(published) - set(removed))
    for version in registry.versions(NAME):
        loaded = registry.load(common.small_base(), f"{NAME}@{version}")
        assert common.value_of(loaded, NAME) == published[version]
    assert registry.verify() == []


def test_a_publisher_killed_at_random_moments_leaves_no_partial_version_and_gc_removes_its_objects(
    workers, url, tmp_path
):
    publisher = workers[0]
    rng = random.Random(7)
    begun: set[float] = set()
    ended: dict[int, float] = {}

    def note(messages: list[dict]) -> None:
        for message in messages:
            if message["kind"] == "begin":
                begun.add(message["value"])
            elif message["kind"] == "end":
                ended[message["version"]] = message["value"]

    def start() -> int:
        return publisher.call("fork_publish_loop", root=url, name="big", rows=2048, width=1024)["child"]

    def kill(child: int) -> None:
        os.kill(child, signal.SIGKILL)
        publisher.send("reap", pid=child)
        messages = publisher.collect("reply")  # and what the child printed before it died
        note(messages)
        assert messages[-1]["signal"] == "SIGKILL"

    # Whole publishes of the 8 MB adapter first: how long one takes.
    child = start()
    note(publisher.collect("end"))
    began = time.monotonic()
    note(publisher.collect("end"))
    duration = time.monotonic() - began
    kills = 0
    while kills < 12:
        note(publisher.collect("begin"))
        time.sleep(rng.uniform(0, 1.2 * duration))  # sometimes after the record, before "end"
        kill(child)
        kills += 1
        child = start()
    kill(child)

    registry = Registry(url, cache_dir=tmp_path / "cache")
    versions = registry.versions("big")
    assert set(ended) <= set(versions)
    base = common.EmbeddingModel(common.SMALL_FIRST + 2048, 1024)
    for version in versions:  # every listed version is whole: one value, one that was published
        loaded = registry.load(base, f"big@{version}")
        value = common.value_of(loaded, "big")
        assert value == ended.get(version, value) and value in begun
        loaded._unload()
    assert registry.verify() == []

    # Killed uploads left objects no record names; gc removes them once they are older than the grace.
    live = {d for v in versions for d in registry._record("big", v)["files"].values()}
    objects = set(registry.store.list("objects"))
    orphans = objects - live
    assert registry.gc() == []  # all younger than the (default, one hour) grace period
    registry.grace_seconds = 0
    removed = registry.gc()
    assert sorted(removed) == sorted(registry.store.name(f"objects/{d}") for d in orphans)
    assert set(registry.store.list("objects")) == live
    for version in versions:
        registry.load(base, f"big@{version}")._unload()
    print(f"{kills} kills, publishes of {duration:.2f}s: {len(versions)} versions, {len(orphans)} orphans")
