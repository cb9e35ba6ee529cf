"""ONNX export of a model's inference graph: inputs -> head logits (or, for a bare backbone,
the last hidden state), with dynamic batch and length axes.

The modality says what its inputs look like through the feature extractor's
``example_inputs(batch_size, length)`` (Hugging Face input names, an ``attention_mask`` where it
pads, which axes may vary); this module knows no modality. The graph is traced with PyTorch's
TorchScript-based exporter (``dynamo=False``): the ``torch.export`` path stops at the Python
checks our models make on tensor values (text position range, image grid) and takes ten times
longer or more on a tiny model. Every export is checked with ``onnx.checker`` and run in
``onnxruntime`` on two padded batches of different sizes against PyTorch.

Next to ``OUT.onnx`` goes ``OUT.json``: input and output names, dtypes and axes, the processor
settings that prepare inputs, and label names where the head has them, so the file runs
without d2v; the checkpoint's tokenizer / preprocessor files are copied beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.interop.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from d2v.api.interfaces import ExampleInputs

TOLERANCE = 1e-4  # max abs difference to PyTorch accepted by the export's own check
#: Hugging Face's names for the files that turn raw inputs into model inputs
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spm.model", "sentencepiece.bpe.model")
MASK_NOTE = "1 = real, 0 = padding"


@dataclass
class LoadedModel:
    """A model to export and what the sidecar says about where it came from."""

    model: nn.Module
    source: str
    processor: dict[str, Any] | None = None
    files_dir: Path | None = None  # where the processor files (tokenizer, ...) live


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    max_abs_diff: float
    checked_shapes: list[list[int]] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shapes = " and ".join("x".join(map(str, s)) for s in self.checked_shapes)
        copied = f"; copied {', '.join(self.copied)}" if self.copied else ""
        return (f"wrote {self.path} and {self.sidecar.name}{copied}; onnxruntime matches PyTorch within "
                f"{self.max_abs_diff:.2g} (max abs) on inputs {shapes}")


# --------------------------------------------------------------------------- loading MODEL


def load_model(path: str | os.PathLike) -> LoadedModel:
    """The model behind ``path`` (:func:`d2v.interop.locate.locate_model`: a d2v checkpoint, a run
    directory or a Hugging Face checkpoint directory) and the processor settings it needs."""
    from d2v.interop.locate import locate_model

    found = locate_model(path, command="d2v export")
    return LoadedModel(found.model, str(found.source), found.processor_node(), found.directory)


# --------------------------------------------------------------------------- the traced graph


class InferenceGraph(nn.Module):
    """What is traced: the model input (+ ``attention_mask``) -> logits (the head's, else the
    last hidden state) and, when the output runs along the input's padded axis, ``output_mask``
    (1 at real positions of the output, e.g. the valid CTC frames of each utterance)."""

    def __init__(self, model: nn.Module, *, output_mask: bool):
        super().__init__()
        self.model = model
        self.output_mask = output_mask

    @property
    def output_names(self) -> list[str]:
        main = "logits" if getattr(self.model, "head", None) is not None else "last_hidden_state"
        return [main, "output_mask"] if self.output_mask else [main]

    def run_model(self, inputs: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The main output and the padding mask (True at padding) at its rate."""
        batch: dict[str, Any] = {"inputs": inputs}
        if attention_mask is not None:
            batch["padding_mask"] = attention_mask == 0
        out = self.model(batch)
        return (out.logits if getattr(self.model, "head", None) is not None else out.last_hidden_state), out.padding_mask

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        main, padding_mask = self.run_model(inputs, attention_mask)
        return (main, (~padding_mask).long()) if self.output_mask else main

    @classmethod
    def for_model(cls, model: nn.Module, example: ExampleInputs) -> InferenceGraph:
        """The graph for ``model``, with ``output_mask`` when its output has the padding mask's
        leading ``(batch, length)`` axes on ``example``."""
        try:
            with torch.no_grad():
                main, padding_mask = cls(model, output_mask=False).run_model(*_args(example))
        except SpecError as exc:
            shape = tuple(next(iter(example.tensors.values())).shape)
            raise SpecError(f"d2v export: the model does not run on a plain batch of inputs {shape}, so it cannot be "
                            f"exported: {exc}") from None
        aligned = padding_mask is not None and main.dim() >= 3 and tuple(main.shape[:2]) == tuple(padding_mask.shape)
        return cls(model, output_mask=aligned).eval()


def example_batches(model: nn.Module) -> tuple[ExampleInputs, ExampleInputs]:
    """Two padded example batches that differ in every dynamic axis the modality has: 2 examples
    at the default length, then 3 examples about three quarters as long."""
    first = model.feature_extractor.example_inputs(2)
    name, tensor = next(iter(first.tensors.items()))
    length = int(tensor.shape[1]) if 1 in first.dynamic_axes.get(name, {}) else None
    second = model.feature_extractor.example_inputs(3, None if length is None else max(2, length * 3 // 4), seed=1)
    return first, second


def _args(example: ExampleInputs) -> tuple[Tensor, ...]:
    return tuple(example.tensors.values())


def _output_axes(names: list[str], example: ExampleInputs, outputs: tuple[Tensor, ...],
                 other: ExampleInputs, other_outputs: tuple[Tensor, ...]) -> dict[str, dict[int, str]]:
    """Name the output axes that change with the inputs: the batch, an input axis of the same
    size (text: ``sequence``), else ``output_length`` (audio frames)."""
    input_sizes = {}
    for tensor_name, axes in example.dynamic_axes.items():
        for axis, axis_name in axes.items():
            input_sizes[axis_name] = (example.tensors[tensor_name].shape[axis], other.tensors[tensor_name].shape[axis])
    result: dict[str, dict[int, str]] = {}
    for name, out, out2 in zip(names, outputs, other_outputs):
        axes = {0: "batch"}
        for axis in range(1, out.dim()):
            sizes = (out.shape[axis], out2.shape[axis])
            if sizes[0] != sizes[1]:
                same = [axis_name for axis_name, pair in input_sizes.items() if pair == sizes]
                axes[axis] = same[0] if same else ("output_length" if axis == 1 else f"output_axis{axis}")
        result[name] = axes
    return result


def _run(graph: nn.Module, example: ExampleInputs) -> tuple[Tensor, ...]:
    with torch.no_grad():
        out = graph(*_args(example))
    return out if isinstance(out, tuple) else (out,)


# --------------------------------------------------------------------------- export


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise SpecError(f"ONNX export needs the onnx and onnxruntime packages ({exc.name} is missing): "
                        f"pip install 'd2v[onnx]' (or: pip install onnx onnxruntime).") from None
    return onnx, onnxruntime


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise SpecError(f"d2v export: --opset must be {MIN_OPSET}..{MAX_OPSET} (PyTorch's TorchScript exporter "
                        f"writes up to {MAX_OPSET}), got {opset!r}.")
    return opset


def run_onnx(path: str | os.PathLike, inputs: dict[str, Any]) -> list[np.ndarray]:
    """Run an exported graph in onnxruntime (CPU) on numpy or torch inputs, by input name."""
    _, onnxruntime = _onnx_modules()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {k: (v.numpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in inputs.items()}
    return session.run(None, feed)


def _processor_files(files_dir: Path | None, destination: Path) -> list[Path]:
    """The tokenizer / preprocessor files to copy beside the ONNX file; an existing different
    file of the same name there is an error (nothing is overwritten)."""
    if files_dir is None or not files_dir.is_dir():
        return []
    found = [files_dir / name for name in PROCESSOR_FILES if (files_dir / name).is_file()]
    for source in found:
        target = destination / source.name
        if target.exists() and target.read_bytes() != source.read_bytes():
            raise SpecError(f"d2v export: '{target}' exists and differs from the model's {source.name}; export into "
                            f"another directory (the processor files are copied beside the ONNX file).")
    return found


def _beside_the_model(processor: dict[str, Any] | None, copied: list[Path]) -> dict[str, Any] | None:
    """The processor settings with the tokenizer pointing at the files copied beside the ONNX
    file (``"."``: the sidecar's folder), not at a path in the training checkout."""
    if not processor or not copied or not isinstance(processor.get("tokenizer"), str):
        return processor
    return {**processor, "tokenizer": "."}


def _label_names(head: nn.Module | None) -> list[str] | None:
    """Class names in id order: the head's ``label_names``, or a token vocabulary (CTC)."""
    names = getattr(head, "label_names", None)
    if names is None:
        names = getattr(getattr(head, "vocab", None), "tokens", None)
    return None if names is None else [str(n) for n in names]


def _tensor_info(name: str, tensor: Tensor, axes: dict[int, str]) -> dict[str, Any]:
    """Name, dtype and shape (an axis name where the size may change) for the sidecar."""
    info: dict[str, Any] = {"name": name, "dtype": str(tensor.dtype).removeprefix("torch."),
                            "shape": [axes.get(axis, int(size)) for axis, size in enumerate(tensor.shape)]}
    if name in ("attention_mask", "output_mask"):
        info["note"] = MASK_NOTE
    return info


def _write_graph(graph: InferenceGraph, example: ExampleInputs, path: Path, *, dynamic_axes: dict[str, dict[int, str]],
                 opset: int) -> None:
    """Trace and write the graph. Constant folding is left to the runtime (onnxruntime folds when it
    loads a graph): folded, a tied LM head's transposed word embeddings would be stored twice."""
    with warnings.catch_warnings():
        # the tracer notes every Python-side check on tensor values (constant in the graph, by design)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(graph, _args(example), str(path), dynamo=False, input_names=list(example.tensors),
                          output_names=graph.output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=False)


def _max_difference(path: Path, names: list[str], checks: list[tuple[ExampleInputs, tuple[Tensor, ...]]]) -> float:
    """Max abs difference of onnxruntime to PyTorch's outputs over ``checks``; a SpecError when
    the graph does not follow the input sizes or the difference is too large to be rounding."""
    diff, scale = 0.0, 1.0
    for example, reference in checks:
        got = run_onnx(path, example.tensors)
        for name, ref, value in zip(names, reference, got):
            if tuple(ref.shape) != tuple(value.shape):  # a size the trace kept fixed although it varies
                shape = tuple(next(iter(example.tensors.values())).shape)
                raise SpecError(f"d2v export: on inputs of shape {shape} the exported graph gives {name} of shape "
                                f"{tuple(value.shape)}, PyTorch {tuple(ref.shape)}: the model has a step a traced "
                                f"graph cannot follow (e.g. a Python loop over the batch); nothing was written.")
            diff = max(diff, float(np.abs(ref.numpy().astype(np.float64) - value).max()))
            scale = max(scale, float(ref.abs().max()))
    if diff > TOLERANCE * scale:
        raise SpecError(f"d2v export: the exported graph differs from PyTorch by {diff:.3g} (max abs) on the "
                        f"example batches; nothing was written. Please report this with the model's spec.")
    return diff


def export_onnx(loaded: LoadedModel | nn.Module, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export ``loaded.model`` (a ``TaskModel``) to ``out`` with its JSON sidecar, check the graph
    and compare onnxruntime with PyTorch on two padded batches of different sizes."""
    onnx, _ = _onnx_modules()
    check_opset(opset)
    if not isinstance(loaded, LoadedModel):
        loaded = LoadedModel(loaded, type(loaded).__name__)
    model = loaded.model.eval()
    out = Path(out)
    if out.suffix != ".onnx" or out.is_dir():
        raise SpecError(f"d2v export: --onnx '{out}' must be a file name ending in .onnx (e.g. model.onnx); "
                        f"the JSON sidecar is written beside it with .json.")
    out.parent.mkdir(parents=True, exist_ok=True)
    processor_files = _processor_files(loaded.files_dir, out.parent)

    first, second = example_batches(model)
    graph = InferenceGraph.for_model(model, first)
    expected, expected2 = _run(graph, first), _run(graph, second)
    dynamic_axes = {**first.dynamic_axes, **_output_axes(graph.output_names, first, expected, second, expected2)}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write_graph(graph, first, tmp, dynamic_axes=dynamic_axes, opset=opset)
        onnx.checker.check_model(str(tmp))
        diff = _max_difference(tmp, graph.output_names, [(first, expected), (second, expected2)])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for source in processor_files:
        if source.resolve() != (out.parent / source.name).resolve():
            shutil.copyfile(source, out.parent / source.name)

    sidecar = {
        "format": "d2v-onnx",
        "version": 1,
        "source": loaded.source,
        "model": {part: type(getattr(model, part)).__name__ for part in ("feature_extractor", "encoder", "head")
                  if getattr(model, part, None) is not None},
        "opset": opset,
        "inputs": [_tensor_info(name, tensor, dynamic_axes[name]) for name, tensor in first.tensors.items()],
        "outputs": [_tensor_info(name, tensor, dynamic_axes[name]) for name, tensor in zip(graph.output_names, expected)],
        "dynamic_axes": {name: {str(k): v for k, v in axes.items()} for name, axes in dynamic_axes.items()},
        "processor": _beside_the_model(loaded.processor, processor_files),
        "processor_files": [source.name for source in processor_files],
        "labels": _label_names(getattr(model, "head", None)),
        "max_abs_diff": diff,
    }
    sidecar_path = out.with_suffix(".json")
    sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    shapes = [list(next(iter(e.tensors.values())).shape) for e in (first, second)]
    return ExportResult(out, sidecar_path, diff, shapes, sidecar["processor_files"])
