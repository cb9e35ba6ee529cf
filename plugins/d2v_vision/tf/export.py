"""``d2v export MODEL --tf-savedmodel OUT_DIR`` / ``--tflite OUT.tflite`` for data2vec-vision:
the Keras twin of the PyTorch model (:mod:`d2v_vision.tf.weights`) written as a SavedModel (TF
Serving: signature ``serving_default``) or a TFLite / LiteRT flatbuffer (builtin ops only).

Like the ONNX export (:mod:`d2v.interop.onnx_export`), nothing is written before the written file itself
is loaded back (``tf.saved_model.load`` / the TFLite interpreter) and run on two batches of
different sizes, its outputs within 1e-4 (relative to the largest output, at least 1) of
PyTorch's. The graph takes ``pixel_values`` ``(batch, C, H, W)`` at the model's image size (the
batch may vary) and returns ``logits`` (task models) or ``last_hidden_state`` and
``pooler_output`` (the bare backbone).

The JSON sidecar (inputs, outputs, processor settings, label names, the measured difference)
goes to ``OUT_DIR/assets.extra/d2v.json`` (SavedModel's place for extra files) or ``OUT.json``
beside the ``.tflite`` file, with the checkpoint's ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import torch
from d2v.api.errors import SpecError
from d2v.interop.onnx_export import (
    TOLERANCE,
    LoadedModel,
    _label_names,
    example_batches,
)
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from d2v_vision.tf.weights import from_torch

FORMATS = ("savedmodel", "tflite")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class TFExportResult:
    path: Path
    sidecar: Path
    format: str
    max_abs_diff: float
    checked_shapes: list[list[int]]

    def summary(self) -> str:
        what = "SavedModel" if self.format == "savedmodel" else "TFLite model"
        shapes = " and ".join("x".join(map(str, s)) for s in self.checked_shapes)
        return (f"wrote the {what} {self.path} and {self.sidecar}; reloaded, it matches PyTorch within "
                f"{self.max_abs_diff:.2g} (max abs) on inputs {shapes}")


# --------------------------------------------------------------------------- outputs on both sides


def output_names(model: torch.nn.Module) -> list[str]:
    if model.head is not None:
        return ["logits"]
    return ["last_hidden_state", "pooler_output"] if model.encoder.add_pooling_layer else ["last_hidden_state"]


def torch_outputs(model: torch.nn.Module, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model({"inputs": pixel_values})
    return {name: getattr(out, name).float().numpy() for name in output_names(model)}


class ServingModule(tf.Module):
    """What is saved: the Keras model and one ``serve(pixel_values)`` function -> the outputs."""

    def __init__(self, keras_model: Any, names: list[str], input_shape: tuple[int, int, int]):
        super().__init__()
        self.keras_model = keras_model
        self.names = names
        spec = tf.TensorSpec((None, *input_shape), tf.float32, name="pixel_values")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, pixel_values: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = self.keras_model(pixel_values)
        return {name: outputs[name] for name in self.names}


def write_savedmodel(module: ServingModule, path: Path) -> None:
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def savedmodel_runner(path: str | os.PathLike) -> Runner:
    """A SavedModel's ``serving_default`` signature, loaded once: ``pixel_values`` -> outputs."""
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda pixel_values: {name: value.numpy() for name, value in serve(pixel_values=tf.constant(pixel_values)).items()}


def run_savedmodel(path: str | os.PathLike, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of a SavedModel's ``serving_default`` signature on ``pixel_values``."""
    return savedmodel_runner(path)(pixel_values)


def write_tflite(module: ServingModule, path: Path, workdir: Path) -> None:
    """Freeze the weights into the graph first: converted from the SavedModel, Keras 3's variables
    stay TFLite resource variables that the interpreter never initialises. The frozen function is
    saved (in ``workdir``) behind a signature that keeps the output names."""
    frozen = convert_variables_to_constants_v2(module.serve.get_concrete_function())

    @tf.function(input_signature=module.serve.input_signature)
    def serve(pixel_values):
        return dict(zip(module.names, frozen(pixel_values)))

    tf.saved_model.save(tf.Module(), str(workdir), signatures={"serving_default": serve})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(workdir))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path.write_bytes(converter.convert())


def tflite_runner(path: str | os.PathLike) -> Runner:
    """A TFLite model's ``serving_default`` signature, loaded once: ``pixel_values`` (any batch
    size) -> outputs."""
    with warnings.catch_warnings():  # tf.lite.Interpreter points to ai_edge_litert, which runs the same file
        warnings.filterwarnings("ignore", message=r".*tf.lite.Interpreter is deprecated", category=UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        outputs = runner(pixel_values=pixel_values.astype(np.float32))
        return {name: np.array(value, copy=True) for name, value in outputs.items()}  # views into the interpreter's memory

    return run


def run_tflite(path: str | os.PathLike, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of a TFLite model's ``serving_default`` signature on ``pixel_values`` (any batch size)."""
    return tflite_runner(path)(pixel_values)


def max_difference(checks: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]], what: str) -> float:
    """Max abs difference of the exported outputs to PyTorch's; a SpecError when a shape differs or
    the difference is larger than rounding."""
    diff, scale = 0.0, 1.0
    for expected, got in checks:
        for name, reference in expected.items():
            value = got.get(name)
            if value is None or value.shape != reference.shape:
                raise SpecError(f"d2v export: the {what} gives {name} of shape "
                                f"{None if value is None else value.shape}, PyTorch {reference.shape}; nothing was written.")
            if not np.isfinite(value).all():
                raise SpecError(f"d2v export: the {what} gives non-finite values in {name}; nothing was written.")
            diff = max(diff, float(np.abs(reference.astype(np.float64) - value).max()))
            scale = max(scale, float(np.abs(reference).max()))
    if diff > TOLERANCE * scale:
        raise SpecError(f"d2v export: the {what} differs from PyTorch by {diff:.3g} (max abs) on the example "
                        f"batches; nothing was written. Please report this with the model's spec.")
    return diff


# --------------------------------------------------------------------------- export


def _check_destination(out: Path, format: str) -> None:
    if format == "tflite":
        if out.suffix != ".tflite" or out.is_dir():
            raise SpecError(f"d2v export: --tflite '{out}' must be a file name ending in .tflite (e.g. model.tflite); "
                            f"the JSON sidecar is written beside it with .json.")
    elif out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "saved_model.pb").is_file()):
        raise SpecError(f"d2v export: --tf-savedmodel '{out}' must be a new or empty directory (or a SavedModel "
                        f"to replace); it holds other files.")


def _sidecar(loaded: LoadedModel, format: str, names: list[str], example: np.ndarray,
             expected: dict[str, np.ndarray], diff: float) -> dict[str, Any]:
    model = loaded.model

    def tensor(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"name": name, "dtype": "float32", "shape": ["batch", *map(int, shape[1:])]}

    return {
        "format": f"d2v-{format}",
        "version": 1,
        "source": loaded.source,
        "model": {part: type(getattr(model, part)).__name__ for part in ("feature_extractor", "encoder", "head")
                  if getattr(model, part, None) is not None},
        "signature": "serving_default",
        "inputs": [{**tensor("pixel_values", example.shape), "layout": "channels first (batch, C, H, W)"}],
        "outputs": [tensor(name, expected[name].shape) for name in names],
        "processor": loaded.processor,
        "labels": _label_names(getattr(model, "head", None)),
        "max_abs_diff": diff,
    }


def export(loaded: LoadedModel | torch.nn.Module, out: str | os.PathLike, *, format: str = "savedmodel") -> TFExportResult:
    """Convert, write to a temporary place, reload and compare with PyTorch on two batches, then
    move into ``out`` with the sidecar."""
    if format not in FORMATS:
        raise SpecError(f"d2v export: unknown TensorFlow format {format!r}; expected one of {', '.join(FORMATS)}.")
    if not isinstance(loaded, LoadedModel):
        loaded = LoadedModel(loaded, type(loaded).__name__)
    model = loaded.model.eval()
    out = Path(out)
    _check_destination(out, format)
    keras_model = from_torch(model)
    names = output_names(model)
    batches = [next(iter(example.tensors.values())) for example in example_batches(model)]
    expected = [torch_outputs(model, pixels) for pixels in batches]
    inputs = [pixels.numpy() for pixels in batches]

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        module = ServingModule(keras_model, names, tuple(inputs[0].shape[1:]))
        if format == "savedmodel":
            written, what = Path(tmp) / "savedmodel", "SavedModel"
            write_savedmodel(module, written)
            run = savedmodel_runner(written)
        else:
            written, what = Path(tmp) / out.name, "TFLite model"
            write_tflite(module, written, Path(tmp) / "frozen")
            run = tflite_runner(written)
        diff = max_difference([(reference, run(x)) for reference, x in zip(expected, inputs)], what)
        if format == "savedmodel" and out.is_dir():
            shutil.rmtree(out)  # empty, or the SavedModel this export replaces (checked above)
        os.replace(written, out)

    extra_dir = out / "assets.extra" if format == "savedmodel" else out.parent
    sidecar_path = extra_dir / "d2v.json" if format == "savedmodel" else out.with_suffix(".json")
    extra_dir.mkdir(parents=True, exist_ok=True)
    processor_file = loaded.files_dir / PROCESSOR_FILE if loaded.files_dir is not None else None
    if processor_file is not None and processor_file.is_file() and processor_file.parent.resolve() != extra_dir.resolve():
        shutil.copyfile(processor_file, extra_dir / PROCESSOR_FILE)
    sidecar = _sidecar(loaded, format, names, inputs[0], expected[0], diff)
    sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return TFExportResult(out, sidecar_path, format, diff, [list(x.shape) for x in inputs])
