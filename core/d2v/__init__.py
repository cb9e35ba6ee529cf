"""d2v: data2vec (1.0 and 2.0) for speech, text and images, built from plugins.

The plugin API is importable from here (``from d2v import Encoder, Head, hookimpl``), so plugins
do not depend on where things live inside core; the interfaces load on first use, so importing
``d2v`` (and building its command line) does not import torch.
"""

from d2v.api.errors import BadFile, SpecError
from d2v.api.hookspecs import hookimpl
from d2v.use.pipeline import pipeline  # d2v.pipeline(task, model=...): predictions on your own files

__version__ = "0.1.0"
#: the component interfaces and their outputs (d2v.api.interfaces)
PLUGIN_API = ("Encoder", "EncoderOutput", "ExampleInputs", "FeatureExtractor", "FeatureExtractorOutput", "Head",
              "HeadOutput", "ResultFile", "Target")
#: the building blocks an encoder plugin may stack (d2v.nn), by where they live
BUILDING_BLOCKS = {"TransformerBlock": "d2v.nn.block", "BlockNames": "d2v.nn.block",
                   "AttentionNames": "d2v.nn.attention", "run_layer": "d2v.nn.layers"}
__all__ = ["BadFile", "SpecError", "hookimpl", "from_pretrained", "pipeline", "__version__", *PLUGIN_API,
           *BUILDING_BLOCKS]


def __getattr__(name: str):
    import importlib

    if name in PLUGIN_API:
        return getattr(importlib.import_module("d2v.api.interfaces"), name)
    if name in BUILDING_BLOCKS:
        return getattr(importlib.import_module(BUILDING_BLOCKS[name]), name)
    raise AttributeError(f"module 'd2v' has no attribute '{name}'")


def from_pretrained(path, **kwargs):
    """Load a Hugging Face ``Data2Vec*`` checkpoint directory (or a d2v run checkpoint)."""
    from d2v.interop.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
