import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_plugin():
    """Register the toy modality for one test and always unregister it."""
    import toy
    from d2v.api import plugins

    plugins.register_plugin(toy, "toy")
    try:
        yield toy
    finally:
        plugins.unregister_plugin("toy")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is fastest, and it avoids OpenMP spin-waiting when
    other processes share the cores (observed: 20x slower with 2 threads on a busy 2-core box).
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
