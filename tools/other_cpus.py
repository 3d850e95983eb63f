"""Rerun the float-comparing tests with the kernels other x86-64 CPUs use: AVX2 and SSE4.2 at once.

``tox -e other-cpu`` runs this. The two passes are independent single-threaded
pytest runs (the suite sets one torch thread), so on a 2-core machine they take
the time of one. Each gets its own ``--basetemp``; each pass's output is printed
whole once both are done; the exit status is the first failing pass's.
Arguments are passed to both pytest runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# ATEN_CPU_CAPABILITY picks ATen's kernels (and inductor's code); MKL_ENABLE_INSTRUCTIONS MKL's.
PASSES = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "sse4.2": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
# The distributed tests launch torchrun workers: two launches at once on 2 cores only measure
# contention. Their numbers are checked in the main run.
PYTEST = ["-q", "-m", "float_rounding", "--ignore=tests/test_distributed.py", "-p", "no:cacheprovider"]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="other-cpus-") as scratch:
        running = {}
        for name, env in PASSES.items():
            log = open(Path(scratch) / f"{name}.log", "w+")  # noqa: SIM115 - closed below
            command = [sys.executable, "-m", "pytest", *PYTEST, f"--basetemp={Path(scratch) / name}", *argv]
            process = subprocess.Popen(
                command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
            running[name] = (process, log)
        status = 0
        for name, (process, log) in running.items():
            code = process.wait()
            log.seek(0)
            print(f"===== {name} ({' '.join(f'{k}={v}' for k, v in PASSES[name].items())}): exit {code}")
            print(log.read(), end="", flush=True)
            log.close()
            status = status or code
        return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
