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
    from d2v import plugins

    plugins.register_plugin(toy, "toy")
    try:
        yield toy
    finally:
        plugins.unregister_plugin("toy")
