"""data2vec-vision for TensorFlow (Keras 3): ``TFData2VecVisionModel``,
``TFData2VecVisionForImageClassification`` and ``TFData2VecVisionForSemanticSegmentation``, built
from d2v weights, and their SavedModel / TFLite export (``d2v export --tf-savedmodel/--tflite``).

    from d2v_vision import tf as d2v_tf
    model = d2v_tf.from_pretrained("runs/vision_cls_demo")   # or a HF Data2VecVision* directory
    logits = model(pixel_values)["logits"]                  # pixel_values: (B, 3, H, W)

Modules: ``layers`` (patch embedding, relative position bias, attention, layer-scaled block,
encoder), ``uper_head`` (UperNet + FCN auxiliary head), ``models`` (the three Keras models),
``resampling`` (PyTorch's interpolation and adaptive pooling, exactly), ``weights`` (PyTorch
model -> Keras variables), ``export`` (SavedModel / TFLite writing and checking).

Importing this package does not import TensorFlow (``pip install 'd2v[tf]'``); the names below
do, on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from d2v.api.errors import SpecError

#: public name -> the module that defines it
_LAZY = {
    "TFData2VecVisionModel": "models",
    "TFData2VecVisionForImageClassification": "models",
    "TFData2VecVisionForSemanticSegmentation": "models",
    "from_torch": "weights",
}


def require_tensorflow() -> Any:
    """Import TensorFlow, or a SpecError saying how to install it.

    Triton (which PyTorch's compiler imports lazily) crashes the process when its library is
    loaded after TensorFlow's runtime, so it is loaded first where it is installed.
    """
    try:
        importlib.import_module("triton")
    except ImportError:
        pass
    try:
        import tensorflow
    except ImportError as exc:
        raise SpecError(f"TensorFlow data2vec-vision needs TensorFlow 2 with Keras 3 ({exc.name} is missing): "
                        f"pip install 'd2v[tf]' (or: pip install tensorflow-cpu).") from None
    return tensorflow


def from_pretrained(path: str | os.PathLike) -> Any:
    """The Keras model (one of the three ``TFData2VecVision*`` classes, by the checkpoint's head)
    behind a d2v run directory (``runs/<name>``: its ``final/`` or newest checkpoint), a d2v
    checkpoint (``runs/<name>/final``) or a Hugging Face ``Data2VecVision*`` checkpoint directory,
    with the PyTorch weights converted."""
    require_tensorflow()
    from d2v_vision.tf.weights import from_pretrained as load

    return load(path)


def export_model(loaded: Any, out: str | os.PathLike, *, format: str = "savedmodel") -> Any:
    """``d2v export --tf-savedmodel/--tflite`` for data2vec-vision: write ``loaded.model`` (a
    ``d2v.interop.onnx_export.LoadedModel``) as a SavedModel directory (``format="savedmodel"``) or a
    ``.tflite`` file (``"tflite"``), checked against PyTorch first (:mod:`d2v_vision.tf.export`)."""
    require_tensorflow()
    from d2v_vision.tf.export import export

    return export(loaded, out, format=format)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_tensorflow()
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
