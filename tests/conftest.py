import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared helpers (tiny model builders). Only this folder goes on sys.path: the
# test folders are named after the packages and must not shadow them.
sys.path.insert(0, str(Path(__file__).parent / "support"))

# Tiny models: one thread beats the oversubscription of a 2-core CI machine.
torch.set_num_threads(1)

# Inductor's on-disk cache does not key its kernels on ATEN_CPU_CAPABILITY, although the C++ it
# generates follows it: kernels built for AVX-512, reused by a run with ATEN_CPU_CAPABILITY=avx2
# (tox -e other-cpu), index out of bounds or compute other numbers. One cache per capability.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(tempfile.gettempdir()) / f"torchinductor_tt_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"),
)


def pytest_collection_modifyitems(items: list) -> None:
    """Mark the tests that compare two float computations, so tox reruns them with other CPU kernels."""
    for item in items:
        if hasattr(getattr(item, "module", None), "assert_same_math"):
            item.add_marker("float_rounding")


# No test may reach AWS: dummy credentials, no config files, no instance metadata, and the default
# endpoint a closed local port. The S3 tests point AWS_ENDPOINT_URL at their own local server.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    AWS_EC2_METADATA_DISABLED="true",
    AWS_ENDPOINT_URL="http://127.0.0.1:9",
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the whole session (started only if a test asks for it)."""
    pytest.importorskip("moto.server")
    from s3server import S3Server

    server = S3Server()
    previous = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        yield server
    finally:
        os.environ["AWS_ENDPOINT_URL"] = previous
        server.stop()
