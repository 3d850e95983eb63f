"""moto's S3 server (``python s3server_main.py HOST PORT``), one request at a time.

moto answers a PUT with ``If-None-Match: *`` by looking for the key, then
writing it: two steps that two concurrent requests in its threaded server can
interleave, so both would succeed. S3 does both at once, atomically; serving one
request at a time does too, so the race tests test tt-adapters, not moto.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def one_at_a_time(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    run_simple(host, port, one_at_a_time, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
