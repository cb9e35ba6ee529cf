import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# what the demo specs use: this plugin, d2v's encoder (audio), head and targets
PLUGINS = "sensors,audio,head-audio_classification,targets"


@pytest.fixture
def sensors_plugins(monkeypatch):
    """Load only the entry points the sensor specs need (the package must be pip-installed:
    `pip install -e examples/plugins/d2v-sensors`), so other installed plugins cannot interfere."""
    from d2v.api import plugins

    monkeypatch.setenv("D2V_LOAD_PLUGINS", PLUGINS)
    plugins.reset()
    yield plugins
    plugins.reset()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread is fastest."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
