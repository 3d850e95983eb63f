import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared helpers (tiny model builders). Only this folder goes on sys.path: the
# test folders are named after the packages and must not shadow them.
sys.path.insert(0, str(Path(__file__).parent / "support"))

# Tiny models: one thread beats the oversubscription of a 2-core CI machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list) -> None:
    """Mark the tests that compare two float computations, so tox reruns them with other CPU kernels."""
    for item in items:
        if hasattr(getattr(item, "module", None), "assert_same_math"):
            item.add_marker("float_rounding")
