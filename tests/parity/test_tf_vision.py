"""TensorFlow data2vec-vision (:mod:`d2v_vision.tf`) against d2v's PyTorch model: tiny random
models of each class and option, eval mode, logits / pooled output / every hidden state within
1e-4 (max abs), at the trained image size and, with ``interpolate_pos_encoding``, another one;
built from a Hugging Face directory and a d2v run directory; ``d2v export --tf-savedmodel`` and
``--tflite`` reloaded and compared; a tampered export refused. Skipped only without TensorFlow."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from d2v.api import plugins
from d2v.api.errors import SpecError
from d2v.spec.model import build_model
from d2v_vision.tf import require_tensorflow
from safetensors.torch import save_file

try:
    tf = require_tensorflow()
except SpecError:
    pytest.skip("TensorFlow is not installed (pip install 'd2v[tf]')", allow_module_level=True)

from d2v.cli.export import add_parser
from d2v_vision.tf import from_pretrained
from d2v_vision.tf.export import export, run_savedmodel, run_tflite
from d2v_vision.tf.weights import architecture_of, from_torch

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4
CLASSIFICATION = {"name": "image_classification", "label_names": ["circle", "cross", "square"]}
SEGMENTATION = {"name": "semantic_segmentation", "num_labels": 4, "out_indices": [1, 2, 3, 4], "pool_scales": [1, 2, 3],
                "auxiliary_channels": 8, "auxiliary_num_convs": 2, "auxiliary_concat_input": True}
#: case -> (head, encoder options): every positional scheme, layer scale on/off, mean vs CLS pooling
CASES = {
    "model-shared_bias-mean_pool": (None, {"use_shared_relative_position_bias": True}),
    "classification-per_layer_bias-cls_pool": (CLASSIFICATION, {"use_relative_position_bias": True,
                                                                "use_mean_pooling": False}),
    "classification-all_positions-no_layer_scale": (CLASSIFICATION, {"use_absolute_position_embeddings": True,
                                                                     "use_relative_position_bias": True,
                                                                     "use_shared_relative_position_bias": True,
                                                                     "layer_scale_init_value": 0.0}),
    "segmentation-aux_head-abs_positions": (SEGMENTATION, {"use_absolute_position_embeddings": True}),
    "segmentation-no_aux-shared_bias-cls_pool": ({**SEGMENTATION, "use_auxiliary_head": False},
                                                 {"use_shared_relative_position_bias": True, "use_mean_pooling": False}),
}


#: what each class returns by default (the old transformers TF classes' names)
DEFAULT_OUTPUTS = {None: ("last_hidden_state", "pooler_output"), "image_classification": ("logits",),
                   "semantic_segmentation": ("logits",)}


def spec(head: dict | None, **encoder) -> dict:
    """A tiny data2vec-vision: 16 px images in 4 px patches (a 4x4 grid), 3 layers, 32 wide."""
    model = {"feature_extractor": {"name": "vision.patches", "dim": 32, "image_size": 16, "patch_size": 4},
             "encoder": {"name": "vision.transformer", "dim": 32, "layers": 3, "heads": 4, "ffn_dim": 48,
                         "image_size": 16, "patch_size": 4, "drop_path_rate": 0.0, **encoder}}
    return {**model, "head": head} if head else model


def tiny(model_spec: dict) -> torch.nn.Module:
    """Built from the spec, with non-trivial values where the init puts constants (tables, CLS,
    positions, layer scale, BatchNorm weights and statistics)."""
    torch.manual_seed(0)
    model = build_model(model_spec, plugins.registry(), "finetune").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("table", "cls_token", "position_embeddings", "lambda_")):
                param.normal_(0, 0.5)
            elif "normalization" in name or "fpn1.1" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model


def images(batch: int, height: int = 16, width: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def pytorch_outputs(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model({"inputs": pixels}, output_hidden_states=True)
    if model.head is None:
        result = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    else:
        result = {"logits": out.logits}
        if out.head_output.extras:
            result["auxiliary_logits"] = out.head_output.extras["auxiliary_logits"]
    result.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    return {name: value.numpy() for name, value in result.items()}


def tensorflow_outputs(keras_model, pixels: torch.Tensor, **options) -> dict[str, np.ndarray]:
    if isinstance(keras_model.architecture.segmentation, dict) and keras_model.architecture.segmentation:
        options["output_auxiliary_logits"] = True
    out = keras_model(pixels.numpy(), output_hidden_states=True, **options)
    result = {name: value.numpy() for name, value in out.items() if name != "hidden_states"}
    result.update({f"hidden_states.{i}": h.numpy() for i, h in enumerate(out["hidden_states"])})
    return result


def max_differences(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
    return {name: float(np.abs(value - got[name]).max()) for name, value in expected.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_tensorflow_equals_pytorch(case):
    head, encoder = CASES[case]
    model = tiny(spec(head, **encoder))
    keras_model = from_torch(model)
    assert type(keras_model).__name__ == {None: "TFData2VecVisionModel",
                                          "image_classification": "TFData2VecVisionForImageClassification",
                                          "semantic_segmentation": "TFData2VecVisionForSemanticSegmentation"}[
        head and head["name"]]
    pixels = images(2)
    expected = pytorch_outputs(model, pixels)  # segmentation logits channels first: (B, labels, 4 x the patch grid)
    outputs = keras_model(pixels.numpy())
    assert {name: tuple(value.shape) for name, value in outputs.items()} == {
        name: expected[name].shape for name in DEFAULT_OUTPUTS[head and head["name"]]}
    differences = max_differences(expected, tensorflow_outputs(keras_model, pixels))
    assert max(differences.values()) <= ATOL, differences
    # another image size (a 6x5 grid): positions resized exactly as the PyTorch model resizes them
    other = images(1, 24, 20, seed=1)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        keras_model(other.numpy())
    differences = max_differences(pytorch_outputs(model, other),
                                  tensorflow_outputs(keras_model, other, interpolate_pos_encoding=True))
    assert max(differences.values()) <= ATOL, differences


def test_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16, patch_size=4,
        use_relative_position_bias=True, use_mean_pooling=True, num_labels=3, drop_path_rate=0.0)
    torch.manual_seed(0)
    hf_model = transformers.Data2VecVisionForImageClassification(config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "relative_position_bias_table" in name or "lambda" in name:
                param.normal_(0, 0.5)
    hf_model.save_pretrained(tmp_path / "hf")
    keras_model = from_pretrained(tmp_path / "hf")
    assert type(keras_model).__name__ == "TFData2VecVisionForImageClassification"
    pixels = images(2)
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels).logits.numpy()
    assert np.abs(keras_model(pixels.numpy())["logits"].numpy() - expected).max() <= ATOL


def write_run(model: torch.nn.Module, model_spec: dict, run) -> None:
    """A finished d2v run directory: ``run/final`` with weights and the spec."""
    final = run / "final"
    final.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(final / "model.safetensors"))
    full = {"task": "finetune", "model": model_spec, "data": {"processor": {"name": "image", "size": 16, "crop_size": 16}}}
    (final / "spec.yaml").write_text(yaml.safe_dump(full))


def cli(argv) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_savedmodel_from_a_run_directory(tmp_path, capsys):
    model_spec = spec(CLASSIFICATION, use_absolute_position_embeddings=True)
    model = tiny(model_spec)
    write_run(model, model_spec, tmp_path / "runs" / "demo")
    out = tmp_path / "export" / "savedmodel"
    assert cli(["export", str(tmp_path / "runs" / "demo"), "--tf-savedmodel", str(out)]) == 0
    assert "reloaded, it matches PyTorch" in capsys.readouterr().out
    sidecar = json.loads((out / "assets.extra" / "d2v.json").read_text())
    assert sidecar["labels"] == ["circle", "cross", "square"] and sidecar["processor"]["name"] == "image"
    assert sidecar["inputs"][0]["shape"] == ["batch", 3, 16, 16] and sidecar["outputs"][0]["name"] == "logits"
    for batch in (1, 4):  # what a TF Serving client sees: the serving_default signature
        pixels = images(batch, seed=batch)
        got = run_savedmodel(out, pixels.numpy())
        with torch.no_grad():
            expected = model({"inputs": pixels}).logits.numpy()
        assert set(got) == {"logits"} and np.abs(got["logits"] - expected).max() <= ATOL


def test_tflite_segmentation(tmp_path):
    model = tiny(spec(SEGMENTATION, use_relative_position_bias=True))
    result = export(model, tmp_path / "seg.tflite", format="tflite")
    assert result.path.is_file() and json.loads(result.sidecar.read_text())["format"] == "d2v-tflite"
    for batch in (1, 3):
        pixels = images(batch, seed=batch)
        got = run_tflite(result.path, pixels.numpy())
        with torch.no_grad():
            expected = model({"inputs": pixels}).logits.numpy()
        assert set(got) == {"logits"} and np.abs(got["logits"] - expected).max() <= ATOL


def test_a_tampered_export_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    import d2v_vision.tf.export as tf_export

    def tampered(model):
        keras_model = from_torch(model)
        offset = keras_model.encoder.pooler_norm.beta
        offset.assign(offset.numpy() + 0.01)  # pooler_output off by 0.01
        return keras_model

    monkeypatch.setattr(tf_export, "from_torch", tampered)
    model = tiny(spec(None, use_shared_relative_position_bias=True))
    with pytest.raises(SpecError, match="differs from PyTorch.*nothing was written"):
        export(model, tmp_path / "out", format="savedmodel")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_unsupported_models_and_missing_tensorflow_are_clear_errors(tmp_path, monkeypatch):
    vit = build_model({"preset": "data2vec2-vision-tiny"}, plugins.registry(), "finetune")
    with pytest.raises(SpecError, match="vision.patches \\+ vision.transformer.*ViTEncoder"):
        architecture_of(vit)
    with pytest.raises(SpecError, match="must be a file name ending in .tflite"):
        export(tiny(spec(None, use_shared_relative_position_bias=True)), tmp_path / "x.onnx", format="tflite")
    text_spec = {"preset": "data2vec-text-tiny", "head": {"name": "text_classification", "num_labels": 2}}
    write_run(build_model(text_spec, plugins.registry(), "finetune"), text_spec, tmp_path / "text")
    with pytest.raises(SpecError, match="no TensorFlow model.*Data2VecVisionModel"):
        cli(["export", str(tmp_path / "text"), "--tflite", str(tmp_path / "text.tflite")])
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(SpecError, match=r"pip install 'd2v\[tf\]'"):
        require_tensorflow()
