"""Driving tests/support/workers/worker.py from a test: one process, JSON lines both ways.

Used by the crash-and-race tests of the local and the object-store registries; ``env``
adds environment variables for the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().parent / "worker.py"
TIMEOUT = 120.0  # seconds for any one answer; a hang fails the test instead of blocking the run


class Worker:
    """One worker process; its stdout is read by a thread into a queue of JSON messages."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TT_STRICT_PLUGINS": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.text: list[str] = []  # anything printed that is not a message (warnings, tracebacks)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                message = None
            if isinstance(message, dict) and "kind" in message:
                self.messages.put(message)
            else:
                self.text.append(line)
        self.messages.put({"kind": "exit"})

    def collect(self, kind: str) -> list[dict[str, Any]]:
        """Every message up to and including the next one of ``kind``."""
        found = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {kind!r} from the worker in {TIMEOUT}s; it printed {self.text}"
                ) from None
            found.append(message)
            if message["kind"] == "child_error":
                raise AssertionError(f"the saving child failed:\n{message['error']}")
            if message["kind"] == "exit":
                raise AssertionError(f"the worker exited; it printed:\n{''.join(self.text)}")
            if message["kind"] == kind:
                return found

    def send(self, op: str, **arguments: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()

    def reply(self) -> dict[str, Any]:
        answer = self.collect("reply")[-1]
        assert "error" not in answer, f"the worker failed:\n{answer['error']}"
        return answer

    def call(self, op: str, **arguments: Any) -> dict[str, Any]:
        self.send(op, **arguments)
        return self.reply()

    def quit(self) -> None:
        if self.process.poll() is None:
            self.send("quit")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.stdin is not None
        self.process.stdin.close()


@contextlib.contextmanager
def started_workers(count: int, env: dict[str, str] | None = None) -> Iterator[list[Worker]]:
    """``count`` ready workers; afterwards none printed a traceback and each exited cleanly."""
    started = [Worker(env) for _ in range(count)]
    try:
        for worker in started:
            worker.collect("ready")
        yield started
        for worker in started:
            assert not [line for line in worker.text if "Traceback" in line], "".join(worker.text)
    finally:
        for worker in started:
            worker.quit()
        for worker in started:
            worker.close()
    assert [worker.process.returncode for worker in started] == [0] * count
