"""Where the benchmarks run: ``--device`` and ``--dtype``, synchronised timing, peak memory.

Every command of ``ttbench`` takes the same two options (:func:`add_device_arguments`):
``--device cpu|cuda`` and ``--dtype float32|bfloat16|float16``. On ``cuda`` a
timed call is bracketed by ``torch.cuda.synchronize`` (:func:`synchronize`) and
memory is ``torch.cuda.max_memory_allocated`` over the call
(:func:`cuda_peak_bytes`); on the CPU nothing waits and memory is measured as
each command did before (allocator events, RSS).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default cpu) and ``--dtype`` (default float32: the base model as built)."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the model runs (default cpu); cuda times with torch.cuda.synchronize and "
        "measures memory with torch.cuda.max_memory_allocated",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="the base model's dtype (default float32); adapters keep the dtype their plugin gives them",
    )


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run here, in one line; None when it can."""
    if device == "cuda" and not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return (
            f"--device cuda: no CUDA device is available to torch {torch.__version__} ({built}); "
            "run on a machine with a GPU, or use --device cpu"
        )
    return None


def check_device(device: str) -> None:
    """Exit with the one-line error of :func:`device_problem` (status 2, as argparse does)."""
    problem = device_problem(device)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_peak_bytes(function: Callable[[], Any]) -> int:
    """Peak of ``torch.cuda.memory_allocated`` over the call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def device_name(device: str) -> str:
    """The accelerator's name (``cpu`` on the CPU)."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
