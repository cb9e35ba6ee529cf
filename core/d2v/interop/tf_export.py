"""``d2v export MODEL --tf-savedmodel OUT_DIR`` / ``--tflite OUT.tflite``: TensorFlow export,
through the Hugging Face architecture the model exports to.

``transformers`` 4 had TensorFlow twins of some architectures (``TFData2VecVision*``). A plugin
that gives one back defines ``export_tensorflow(loaded, out, *, format)`` on that architecture's
``hf_converter``: ``loaded`` is a :class:`d2v.interop.onnx_export.LoadedModel`, ``format`` is
``"savedmodel"`` or ``"tflite"``; it checks what it wrote against PyTorch (as the ONNX export
does) and returns an object with ``summary()``. This module knows no modality: it only finds
the converter.
"""

from __future__ import annotations

import os
from typing import Any

from d2v.api.errors import SpecError

#: format -> the ``d2v export`` flag that asks for it
FORMATS = {"savedmodel": "--tf-savedmodel", "tflite": "--tflite"}


def export_tensorflow(model_path: str | os.PathLike, out: str | os.PathLike, *, format: str) -> Any:
    """Export the model behind ``model_path`` (what ``d2v export`` accepts) to ``out``."""
    from d2v.api import plugins
    from d2v.interop.onnx_export import load_model

    if format not in FORMATS:
        raise SpecError(f"d2v export: unknown TensorFlow format {format!r}; expected one of {', '.join(FORMATS)}.")
    loaded = load_model(model_path)
    capable = []
    for component in plugins.registry().components("hf_converter"):
        converter = component.build()
        if not hasattr(converter, "export_tensorflow"):
            continue
        capable.append(component.name)
        if getattr(converter, "exports", lambda m: False)(loaded.model):
            return converter.export_tensorflow(loaded, out, format=format)
    raise SpecError(f"d2v export {FORMATS[format]}: no TensorFlow model for '{model_path}'; the architectures that "
                    f"have one: {', '.join(capable) or 'none installed'} (use --onnx for the others).")
