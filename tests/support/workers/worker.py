"""A long-lived worker process for the crash and race tests, driven by JSON lines.

Run as ``python worker.py``. It imports torch and tt_core once, prints
``{"kind": "ready"}``, then reads one JSON command per line on stdin and
answers each with one JSON line on stdout (``{"kind": "reply", ...}``).
Unexpected exceptions are answered as ``{"kind": "reply", "error": traceback}``
so the test can show them; the worker keeps running.

Commands (``op``):

- ``save``: once every file of ``after`` exists, fill the small adapter
  ``name`` with each of ``values`` in turn and ``save_pretrained`` it into
  ``root`` after each fill.
- ``read``: load ``root`` with ``AdapterModel.from_pretrained`` in a loop until
  the file ``stop`` exists; every adapter must hold one of ``allowed[name]``.
  Creates the file ``started`` after its first good read; answers how many
  reads and how many distinct states (adapter -> value) it saw.
- ``publish``: publish the small adapter filled with each of ``values`` as a new
  version of ``name`` in the registry at ``root``; answers the versions.
- ``registry_load``: load random versions of ``name`` from the registry until
  ``stop`` exists; each must hold ``expected[version]`` or fail with "was removed".
  Creates the file ``started`` after its first good load; answers how many
  loads succeeded, failed with "was removed", and of those, how many raced
  (the version went away between two steps of one load).
- ``remove``: once every file of ``after`` exists, remove each of ``specs``
  from the registry, a few milliseconds apart.
- ``fork_saves``: fork a child that saves the big adapter into ``root`` over and
  over, alternating ``first`` and ``other`` (``count`` saves, 0 = until killed).
  The child prints ``{"kind": "begin", "value": v}`` before each save and
  ``{"kind": "end", "value": v, "seconds": s}`` after it. Answers the child's pid.
- ``fork_remove``: fork a child that removes ``spec`` from the registry at
  ``root``, killing itself with SIGKILL just before its file-system step number
  ``kill_at`` (``mkdir``, ``open``, ``fsync``, ``rename``, ``replace``,
  ``unlink``, ``rmdir`` of ``os``, or the ``open(path, "xb")`` that writes a
  file). If it gets to the end it prints ``{"kind": "removed", "steps": [...]}``
  (each step's name and path) and exits 0. Answers the child's pid.
- ``reap``: wait for child ``pid``; answers its exit code or signal.
- ``fork_publishers``: fork one child per list of ``values``; each publishes the
  small adapter filled with each of its values as a new version of ``name`` in
  the registry at ``root`` (a folder or a URL) once every file of ``after``
  exists, then prints ``{"kind": "published", "index": i, "published": [[version, value], ...]}``
  and exits. Answers the children's pids.
- ``fork_publish_loop``: fork a child that publishes an adapter of ``rows`` x
  ``width`` floats to ``root`` over and over (values 1, 2, 3, ...), printing
  ``{"kind": "begin"}`` and ``{"kind": "end", "version": v, "value": x}``
  around each publish, until it is killed. Answers the child's pid.
- ``load_listed``: until ``stop`` exists, load a random listed version of
  ``name``; its rows must all hold one value of ``allowed`` (never a mix),
  or the load fails with "was removed". Answers the counts and the errors.
- ``remove_listed``: once every file of ``after`` exists, remove ``count``
  random listed versions of ``name``, a few milliseconds apart; answers them.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

import common  # noqa: E402  (this script's folder is on sys.path)

from tt_core import AdapterModel  # noqa: E402
from tt_core.disk import storage  # noqa: E402
from tt_core.registry import Registry  # noqa: E402


def emit(message: dict[str, Any]) -> None:
    # One write per line, unbuffered: a forked child writes to the same pipe, and dies by SIGKILL.
    os.write(1, (json.dumps(message) + "\n").encode())


def wait_for(paths: list[str]) -> None:
    """Wait (a minute at most) until every file of ``paths`` exists: the other side has started."""
    deadline = time.monotonic() + 60
    while not all(os.path.exists(path) for path in paths) and time.monotonic() < deadline:
        time.sleep(0.002)


def save(root: str, name: str, values: list[float], after: list[str] = ()) -> dict[str, Any]:
    adapter_model = common.adapted(common.small_base(), name)
    wait_for(list(after))
    for value in values:
        common.fill(adapter_model, name, value)
        adapter_model.save_pretrained(root)
    return {"saved": len(values)}


def read(root: str, allowed: dict[str, list[float]], stop: str, started: str) -> dict[str, Any]:
    reads, states, errors = 0, set(), []
    while True:
        finished = os.path.exists(stop)  # checked before the read, so one read follows the last write
        try:
            adapter_model = AdapterModel.from_pretrained(common.small_base(), root)
            state = []
            for name in adapter_model.adapters:
                value = common.value_of(adapter_model, name)
                if value not in allowed.get(name, ()):
                    raise AssertionError(f"{name!r} holds {value}, which no writer saved")
                state.append((name, value))
            states.add(tuple(sorted(state)))
            reads += 1
            if reads == 1:
                Path(started).touch()  # the writers wait for this first read
        except Exception:
            errors.append(traceback.format_exc())
        if finished or len(errors) > 5:
            return {"reads": reads, "states": len(states), "errors": errors}


def publish(root: str, name: str, values: list[float]) -> dict[str, Any]:
    adapter_model = common.adapted(common.small_base(), "default")
    registry = Registry(root)
    published = []
    for value in values:
        common.fill(adapter_model, "default", value)
        published.append([registry.publish(adapter_model, name), value])
    return {"published": published}


def registry_load(
    root: str, name: str, expected: dict[str, float], stop: str, seed: int, started: str
) -> dict[str, Any]:
    registry, rng = Registry(root), random.Random(seed)
    loaded, removed, raced, errors = 0, 0, 0, []
    versions = sorted(expected, key=int)
    while not os.path.exists(stop) and len(errors) < 5:
        if loaded and not os.path.exists(started):
            Path(started).touch()  # the remover waits for one good load of each loader
        # A version that exists now: the remover may take it away in the middle of this load.
        version = str(rng.choice(registry.versions(name) or [int(v) for v in versions]))
        try:
            adapter_model = registry.load(common.small_base(), f"{name}@{version}")
        except ValueError as error:
            if "was removed" in str(error):
                removed += 1
                raced += "while it was being" in str(error)  # removed between two steps of this load
                continue
            errors.append(traceback.format_exc())
            continue
        except Exception:
            errors.append(traceback.format_exc())
            continue
        try:
            value = common.value_of(adapter_model, name)
            if value != expected[version]:
                raise AssertionError(f"{name}@{version} holds {value}, but {expected[version]} was published")
            loaded += 1
        except AssertionError:
            errors.append(traceback.format_exc())
    return {"loaded": loaded, "removed": removed, "raced": raced, "errors": errors}


def remove(root: str, specs: list[str], after: list[str]) -> dict[str, Any]:
    registry = Registry(root)
    wait_for(after)
    for spec in specs:
        registry.remove(spec)
        time.sleep(0.005)  # spread the removals over the loaders' loads
    return {"removed": len(specs)}


_big: AdapterModel | None = None


def fork_saves(root: str, first: float, other: float, count: int) -> dict[str, Any]:
    global _big
    if _big is None:
        _big = common.adapted(
            common.big_base(), "big"
        )  # built once, before forking, so a child starts at once
    pid = os.fork()
    if pid:
        return {"child": pid}
    try:  # the child: never returns into the command loop
        value, done = first, 0
        while count == 0 or done < count:
            common.fill(_big, "big", value)
            emit({"kind": "begin", "value": value})
            started = time.perf_counter()
            _big.save_pretrained(root)
            emit({"kind": "end", "value": value, "seconds": time.perf_counter() - started})
            value = other if value == first else first
            done += 1
    except BaseException:
        emit({"kind": "child_error", "error": traceback.format_exc()})
        os._exit(1)
    os._exit(0)


KILLABLE_STEPS = ("mkdir", "open", "fsync", "rename", "replace", "unlink", "rmdir")


def fork_remove(root: str, spec: str, kill_at: int) -> dict[str, Any]:
    pid = os.fork()
    if pid:
        return {"child": pid}
    try:  # the child: never returns into the command loop
        steps: list[str] = []

        def killing(name: str, real: Any) -> Any:
            def step(*args: Any, **kwargs: Any) -> Any:
                if len(steps) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                steps.append(f"{name} {args[0] if args else ''}")
                return real(*args, **kwargs)

            return step

        for name in KILLABLE_STEPS:
            setattr(os, name, killing(name, getattr(os, name)))
        storage.open = killing("open(xb)", builtins.open)  # type: ignore[attr-defined]
        Registry(root).remove(spec)
        emit({"kind": "removed", "steps": steps})
    except BaseException:
        emit({"kind": "child_error", "error": traceback.format_exc()})
        os._exit(1)
    os._exit(0)


def reap(pid: int) -> dict[str, Any]:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"code": os.WEXITSTATUS(status)}


def fork_publishers(root: str, name: str, values: list[list[float]], after: list[str] = ()) -> dict[str, Any]:
    adapter_model = common.adapted(common.small_base(), "default")  # built before forking
    children = []
    for index, own in enumerate(values):
        pid = os.fork()
        if pid:
            children.append(pid)
            continue
        try:  # the child: never returns into the command loop
            wait_for(list(after))
            registry, published = Registry(root), []
            for value in own:
                common.fill(adapter_model, "default", value)
                published.append([registry.publish(adapter_model, name), value])
            emit({"kind": "published", "index": index, "published": published})
        except BaseException:
            emit({"kind": "child_error", "error": traceback.format_exc()})
            os._exit(1)
        os._exit(0)
    return {"children": children}


def fork_publish_loop(root: str, name: str, rows: int, width: int) -> dict[str, Any]:
    adapter_model = common.adapted(common.EmbeddingModel(common.SMALL_FIRST + rows, width), "default")
    pid = os.fork()
    if pid:
        return {"child": pid}
    try:  # the child: never returns into the command loop
        registry, value = Registry(root), 0.0
        registry.versions(name)  # the client is set up (a session, credentials) before the first "begin"
        while True:
            value += 1.0
            common.fill(adapter_model, "default", value)
            emit({"kind": "begin", "value": value})
            version = registry.publish(adapter_model, name)
            emit({"kind": "end", "version": version, "value": value})
    except BaseException:
        emit({"kind": "child_error", "error": traceback.format_exc()})
        os._exit(1)


def load_listed(root: str, name: str, allowed: list[float], stop: str, seed: int) -> dict[str, Any]:
    registry, rng = Registry(root), random.Random(seed)
    loaded, removed, errors = 0, 0, []
    while not os.path.exists(stop) and len(errors) < 5:
        versions = registry.versions(name)
        if not versions:
            time.sleep(0.01)
            continue
        version = rng.choice(versions)
        try:
            adapter_model = registry.load(common.small_base(), f"{name}@{version}")
            value = common.value_of(adapter_model, name)  # AssertionError on a torn version
            if value not in allowed:
                raise AssertionError(f"{name}@{version} holds {value}, which no publisher published")
            loaded += 1
        except ValueError as error:
            if "was removed" not in str(error):
                errors.append(traceback.format_exc())
            removed += 1
        except Exception:
            errors.append(traceback.format_exc())
    return {"loaded": loaded, "removed": removed, "errors": errors}


def remove_listed(root: str, name: str, count: int, after: list[str], seed: int) -> dict[str, Any]:
    registry, rng, removed = Registry(root), random.Random(seed), []
    wait_for(after)
    while len(removed) < count:
        versions = registry.versions(name)
        if not versions:
            time.sleep(0.01)
            continue
        version = rng.choice(versions)
        registry.remove(f"{name}@{version}")
        removed.append(version)
        time.sleep(0.02)
    return {"removed": removed}


COMMANDS = {
    "fork_publishers": fork_publishers,
    "fork_publish_loop": fork_publish_loop,
    "load_listed": load_listed,
    "remove_listed": remove_listed,
    "save": save,
    "read": read,
    "publish": publish,
    "registry_load": registry_load,
    "remove": remove,
    "fork_saves": fork_saves,
    "fork_remove": fork_remove,
    "reap": reap,
}


def main() -> None:
    emit({"kind": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            os._exit(0)  # nothing to flush (every line went out with os.write), no slow interpreter teardown
        try:
            answer = COMMANDS[op](**command)
        except Exception:
            answer = {"error": traceback.format_exc()}
        emit({"kind": "reply", "op": op, **answer})


if __name__ == "__main__":
    main()
