"""Import fairseq's own data2vec code under Python 3.11 and NumPy 2 (run in the oracle venv only).

fairseq-fixed 0.12.3.1 installs ``examples/`` inside the ``fairseq`` package, but the data2vec
modules import it as the top-level package ``examples``; a few of their config dataclasses use
another dataclass instance as a field default, which Python 3.11 rejects ("mutable default ... use
default_factory"); and current torch will not deep-copy the computed weight of an old-style
``weight_norm`` (fairseq's EMA deep-copies such a module). All three are patched here, before anything from ``examples`` is imported; nothing
in fairseq's arithmetic is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import numpy as np

_dataclass = dataclasses.dataclass
DATA2VEC_MODULES = (
    "examples.data2vec.models.data2vec_audio",
    "examples.data2vec.models.data2vec_text",
    "examples.data2vec.models.data2vec_text_classification",
    "examples.data2vec.models.data2vec2",
    "examples.data2vec.models.data2vec_image_classification",
    "examples.data2vec.models.mae_image_classification",
    "examples.data2vec.tasks",
    "examples.data2vec.tasks.mae_image_classification",  # not imported by tasks/__init__.py
)


def _tolerant_dataclass(cls=None, /, **kwargs):
    """``dataclasses.dataclass`` that turns a dataclass-instance default into a default_factory."""

    def wrap(cls):
        for name, value in list(vars(cls).items()):
            if dataclasses.is_dataclass(value) and not isinstance(value, type) and value.__hash__ is None:
                setattr(cls, name, dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v)))
        return _dataclass(cls, **kwargs)

    return wrap if cls is None else wrap(cls)


def _deepcopy_computed_weights() -> None:
    """Let ``copy.deepcopy`` copy a non-leaf tensor attribute (a detached clone).

    fairseq's EMA teachers deep-copy a module whose positional convolution uses
    ``torch.nn.utils.weight_norm``; after a forward its ``weight`` is a computed, non-leaf tensor,
    which current torch refuses to deep-copy. The weight-norm hook recomputes ``weight`` from
    ``weight_g``/``weight_v`` before every forward, so the copied value is never used.
    """
    import torch

    leaf_only = torch.Tensor.__deepcopy__

    def deepcopy(self, memo):
        if self.is_leaf or self.grad_fn is None:
            return leaf_only(self, memo)
        return self.detach().clone()

    torch.Tensor.__deepcopy__ = deepcopy


def load_fairseq():
    """Import fairseq and make its data2vec examples importable as ``examples.data2vec``."""
    # TensorFlow, when the borrowed site-packages hold it, is pulled in by fairseq's optional
    # imports and segfaults beside torch's triton import; fairseq's data2vec code never uses it
    sys.modules.setdefault("tensorflow", None)
    dataclasses.dataclass = _tolerant_dataclass
    _deepcopy_computed_weights()
    for alias, real in (("float", float), ("int", int), ("bool", bool)):  # NumPy 2 removed these
        if alias not in np.__dict__:
            setattr(np, alias, real)
    import fairseq

    root = os.path.dirname(fairseq.__file__)
    if root not in sys.path:
        sys.path.insert(0, root)
    import importlib

    for module in DATA2VEC_MODULES:  # each registers its models or tasks with fairseq
        importlib.import_module(module)

    return fairseq
