"""The registry on S3 beside the local registry, on the same adapter: load times and HTTP requests.

Starts a local S3 server (moto, from the test extra), publishes one adapter
(trainable tokens, ``--rows`` x ``--width`` float32 rows) to a local registry
and to ``s3://``, then measures:

* a load from the local registry (the reference);
* a warm load from S3 (every object in the local cache: only the listing of
  the name's records goes to the server);
* a cold load from S3 (an empty cache), and the HTTP requests it sends;
* ``list()`` and ``versions()`` over 1,000 versions of one name, and the
  listing requests they send.

    python benchmarks/bench_registry_store.py            # about half a minute
    python benchmarks/bench_registry_store.py --rows 20000 --width 1024

docs/registry.md reports the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

os.environ.update(  # nothing reaches AWS: dummy credentials, the local server's endpoint (set below)
    AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
)


def requests_of(registry: Any) -> list[tuple[str, str]]:
    """A list that collects every HTTP request ``registry``'s S3 client sends from now on."""
    from fsspec.asyn import sync

    fs = registry.store.fs
    client = sync(fs.loop, fs.set_session)
    seen: list[tuple[str, str]] = []
    client.meta.events.register(
        "before-send.s3", lambda request, **_: seen.append((request.method, request.url))
    )
    return seen


def median_seconds(action: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from s3server import S3Server
    from workers import common

    from tt_core.registry import Registry

    server = S3Server()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    results: dict[str, Any] = {"rows": args.rows, "width": args.width}
    results["mb"] = args.rows * args.width * 4 / 2**20
    try:
        work = Path(tempfile.mkdtemp(prefix="tt-bench-registry-"))
        base = common.EmbeddingModel(common.SMALL_FIRST + args.rows, args.width)
        adapter_model = common.adapted(base, "default")
        common.fill(adapter_model, "default", 1.0)
        local = Registry(work / "local")
        local.publish(adapter_model, "terms")
        url = f"s3://{server.bucket()}/registry"
        remote = Registry(url, cache_dir=work / "cache")
        remote.publish(adapter_model, "terms")
        adapter_model._unload()

        def load(registry: Any) -> None:
            registry.load(base, "terms")._unload()

        load(local), load(remote)  # first calls: imports, sessions
        local_s, warm_s = [], []
        for _ in range(args.rounds):  # alternated, so machine noise hits both alike
            local_s.append(median_seconds(lambda: load(local), 1))
            warm_s.append(median_seconds(lambda: load(remote), 1))
        results["local_load_s"] = statistics.median(local_s)
        results["warm_load_s"] = statistics.median(warm_s)
        seen = requests_of(remote)
        load(remote)
        results["warm_requests"] = len(seen)

        cold_s, cold_requests = [], []
        for round_ in range(5):
            cold = Registry(url, cache_dir=work / f"cold-{round_}")
            seen = requests_of(cold)
            started = time.perf_counter()
            load(cold)
            cold_s.append(time.perf_counter() - started)
            cold_requests.append(seen[:])
        results["cold_load_s"] = statistics.median(cold_s)
        results["cold_requests"] = len(cold_requests[-1])
        results["cold_request_kinds"] = [
            f"{m} {u.split('?')[0].rsplit('/', 2)[-2]}" for m, u in cold_requests[-1]
        ]

        # 1,000 versions of one name: the first record, copied under the next numbers.
        record = json.loads(remote.store.get("records/terms/1.json"))
        for version in range(2, args.versions + 1):
            copy = json.dumps({**record, "version": version}).encode()
            remote.store.put(f"records/terms/{version}.json", copy)
        lister = Registry(url, cache_dir=work / "cache")
        seen = requests_of(lister)
        started = time.perf_counter()
        versions = lister.versions("terms")
        results["versions_s"] = time.perf_counter() - started
        results["versions_requests"] = len(seen)
        assert len(versions) == args.versions
        seen.clear()
        started = time.perf_counter()
        listed = lister.list()
        results["list_s"] = time.perf_counter() - started
        results["list_requests"] = len(seen)
        results["list_listing_requests"] = sum("list-type=2" in u for _, u in seen)
        assert [p.spec for p in listed] == [f"terms@{args.versions}"]
    finally:
        server.stop()
    results["warm_over_local"] = results["warm_load_s"] / results["local_load_s"]
    for key, value in results.items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
