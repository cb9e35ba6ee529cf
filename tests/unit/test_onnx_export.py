"""``d2v export MODEL --onnx OUT``: tiny random models of every modality exported, checked with
onnx's checker and run in onnxruntime on padded batches of two different lengths (vision: two
batch sizes at the model's image size), matching PyTorch within 1e-4; loading MODEL from a d2v
checkpoint, a run directory and a Hugging Face directory; clear errors for bad input."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from audio_batches import padded_batch
from d2v.api import plugins
from d2v.api.errors import SpecError
from d2v.cli.export import add_parser
from d2v.spec.model import build_model
from d2v.interop.onnx_export import export_onnx, load_model, run_onnx

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = 1e-4
AUDIO_CTC = {"preset": "data2vec-audio-tiny", "head": {"name": "ctc"}}
TEXT_CLASSIFICATION = {"preset": "data2vec-text-tiny", "head": {"name": "text_classification", "label_names": ["neg", "pos"]}}


def tiny(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(spec, plugins.registry(), "finetune").eval()
    with torch.no_grad():  # relative position tables start at 0: give the bias path something to carry
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias.table"):
                param.normal_()
    return model


def text_batch(batch: int, length: int, seed: int, pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (never the pad id) right-padded to ``length``: rows get shorter down the batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1500, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        ids[row, length - 2 * row:] = pad_id
        mask[row, length - 2 * row:] = 0
    return ids, mask


def pytorch_outputs(model, inputs, mask):
    batch = {"inputs": inputs} if mask is None else {"inputs": inputs, "padding_mask": mask == 0}
    with torch.no_grad():
        out = model(batch)
    return out.logits if model.head is not None else out.last_hidden_state, out.padding_mask


def assert_matches(model, path, input_name, batches):
    """onnxruntime equals PyTorch on every batch (logits and, where exported, the output mask)."""
    for inputs, mask in batches:
        feed = {input_name: inputs} if mask is None else {input_name: inputs, "attention_mask": mask}
        got = run_onnx(path, feed)
        logits, padding_mask = pytorch_outputs(model, inputs, mask)
        assert got[0].shape == tuple(logits.shape)
        assert np.abs(got[0] - logits.numpy()).max() <= TOLERANCE
        if len(got) > 1:
            np.testing.assert_array_equal(got[1], (~padding_mask).long().numpy())


CASES = {
    "audio-ctc": (AUDIO_CTC, "input_values", lambda: [padded_batch(1, (4000, 3100, 1700)), padded_batch(2, (2500, 5200))]),
    "text-classification": (TEXT_CLASSIFICATION, "input_ids", lambda: [text_batch(3, 11, 0), text_batch(2, 6, 1)]),
    "text-masked-lm": ({"preset": "data2vec-text-tiny", "head": {"name": "masked_lm"}}, "input_ids",
                       lambda: [text_batch(2, 9, 2), text_batch(4, 20, 3)]),
    "vision-classification": ({"preset": "data2vec-vision-tiny", "head": {"name": "image_classification",
                                                                          "label_names": ["cat", "dog", "eel"]}},
                              "pixel_values", lambda: [(torch.randn(1, 3, 32, 32), None), (torch.randn(4, 3, 32, 32), None)]),
    "vision-segmentation": ({"preset": "data2vec-vision-tiny", "head": {"name": "semantic_segmentation", "num_labels": 4,
                                                                        "out_indices": [1, 2, 3, 4]}},
                            "pixel_values", lambda: [(torch.randn(2, 3, 32, 32), None), (torch.randn(3, 3, 32, 32), None)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_graph_matches_pytorch_on_padded_batches(case, tmp_path):
    spec, input_name, batches = CASES[case]
    model = tiny(spec)
    result = export_onnx(model, tmp_path / "model.onnx")
    assert result.max_abs_diff <= TOLERANCE  # the export's own check on the feature extractor's examples
    torch.manual_seed(1)
    assert_matches(model, result.path, input_name, batches())

    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]][0] == input_name
    assert sidecar["inputs"][0]["shape"][0] == "batch" and sidecar["outputs"][0]["name"] == "logits"
    assert sidecar["opset"] == 17
    if input_name != "pixel_values":  # padded modalities: attention_mask in, length axes dynamic
        assert [i["name"] for i in sidecar["inputs"]] == [input_name, "attention_mask"]
        assert isinstance(sidecar["inputs"][0]["shape"][1], str)
    else:  # images: batch only
        assert sidecar["inputs"][0]["shape"][1:] == [3, 32, 32]


@pytest.mark.parametrize("case", ["audio-ctc", "text-classification"])
def test_padding_free_model_exports_its_packed_graph(case, tmp_path):
    """A model trained with ``encoder.padding_free`` exports as it runs: the packed layers (the
    graph gathers the real tokens with NonZero) give the padded model's outputs on padded
    batches and on a batch without padding."""
    import onnx

    spec, input_name, batches = CASES[case]
    padded = tiny(spec)
    packed = tiny({**spec, "encoder": {"padding_free": True}})
    result = export_onnx(packed, tmp_path / "packed.onnx")
    assert "NonZero" in {node.op_type for node in onnx.load(str(result.path)).graph.node}
    unpadded = text_batch(1, 7, 5) if input_name == "input_ids" else padded_batch(3, (3000,))
    torch.manual_seed(1)
    for inputs, mask in batches() + [unpadded]:
        got = run_onnx(result.path, {input_name: inputs, "attention_mask": mask})
        logits, padding_mask = pytorch_outputs(padded, inputs, mask)
        real = ~padding_mask if logits.dim() == 3 else torch.ones(logits.shape[0], dtype=torch.bool)
        assert np.abs(got[0][real.numpy()] - logits[real].numpy()).max() <= TOLERANCE


def test_ctc_export_keeps_the_vocabulary_and_valid_frames(tmp_path):
    """CTC: labels are the vocabulary in id order; ``output_mask`` marks each utterance's valid
    frames, so greedy decoding of the ONNX logits equals d2v's per utterance."""
    model = tiny(AUDIO_CTC)
    export_onnx(model, tmp_path / "asr.onnx")
    sidecar = json.loads((tmp_path / "asr.json").read_text())
    assert sidecar["labels"] == model.head.vocab.tokens
    assert [o["name"] for o in sidecar["outputs"]] == ["logits", "output_mask"]
    inputs, mask = padded_batch(3)
    logits, frames = run_onnx(tmp_path / "asr.onnx", {"input_values": inputs, "attention_mask": mask})
    out = model({"inputs": inputs, "padding_mask": mask == 0})
    expected = model.head.predict(out.head_output, {})
    from d2v_heads.speech.ctc import ctc_greedy_ids

    decoded = ctc_greedy_ids(torch.from_numpy(logits), frames.sum(1).tolist(), blank=model.head.blank_id)
    assert [model.head.vocab.decode(ids) for ids in decoded] == expected


def write_checkpoint(model, directory, spec, processor=None):
    directory.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    full = {"task": "finetune", "model": spec, **({"data": {"processor": processor}} if processor else {})}
    (directory / "spec.yaml").write_text(yaml.safe_dump(full))


def cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_exports_a_d2v_checkpoint_with_its_processor(tmp_path, capsys):
    model = tiny(TEXT_CLASSIFICATION)
    final = tmp_path / "runs" / "x" / "final"
    write_checkpoint(model, final, TEXT_CLASSIFICATION,
                     processor={"name": "text", "max_length": 128, "tokenizer": "experiments/data/text_demo/tokenizer"})
    (final / "tokenizer.json").write_text('{"model": "demo"}')
    out = tmp_path / "export" / "cls.onnx"
    assert cli(["export", str(final.parent), "--onnx", str(out), "--opset", "18"]) == 0  # a run dir: its final/
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["source"] == str(final) and sidecar["opset"] == 18
    # the tokenizer is the copy beside the model, not a path inside the training checkout
    assert sidecar["processor"] == {"name": "text", "max_length": 128, "tokenizer": "."}
    assert sidecar["labels"] == ["neg", "pos"] and sidecar["processor_files"] == ["tokenizer.json"]
    assert (out.parent / "tokenizer.json").read_text() == '{"model": "demo"}'
    assert_matches(model, out, "input_ids", [text_batch(3, 8, 4)])


def test_run_directory_without_final_uses_its_newest_checkpoint(tmp_path):
    model = tiny(TEXT_CLASSIFICATION)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000010"
    write_checkpoint(model, step, TEXT_CLASSIFICATION)
    (step / "spec.yaml").rename(run / "spec.yaml")
    (step / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step-00000010")
    loaded = load_model(run)
    assert loaded.source == str(step)
    ids, mask = text_batch(2, 7, 5)
    torch.testing.assert_close(pytorch_outputs(loaded.model, ids, mask)[0], pytorch_outputs(model, ids, mask)[0])


def test_hugging_face_directory_exports_with_its_vocabulary(tmp_path):
    from d2v.interop.convert import d2v_to_hf

    model = tiny(AUDIO_CTC)
    write_checkpoint(model, tmp_path / "d2v", AUDIO_CTC)
    d2v_to_hf(tmp_path / "d2v", tmp_path / "hf")
    result = export_onnx(load_model(tmp_path / "hf"), tmp_path / "out" / "asr.onnx")
    assert "vocab.json" in result.copied
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["labels"] == model.head.vocab.tokens and sidecar["source"] == str(tmp_path / "hf")
    # the processor in d2v's form, as for a d2v checkpoint (the preprocessor_config.json's rate and normalisation)
    assert sidecar["processor"]["name"] == "audio" and sidecar["processor"]["sample_rate"] == 16000
    assert_matches(model, result.path, "input_values", [padded_batch(4, (3000, 1200))])


def test_bad_model_and_output_paths_are_clear_errors(tmp_path, toy_plugin):
    with pytest.raises(SpecError, match="does not exist.*run directory"):
        cli(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "m.onnx")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="holds no model"):
        load_model(tmp_path / "empty")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(SpecError, match="is a file.*d2v convert"):
        load_model(tmp_path / "model.pt")
    model = tiny(TEXT_CLASSIFICATION)
    with pytest.raises(SpecError, match="--opset must be 17..20"):
        export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(SpecError, match="ending in .onnx"):
        export_onnx(model, tmp_path / "m.json")
    toy = build_model({"feature_extractor": {"name": "toy.features"}, "encoder": {"name": "toy.encoder"}},
                      plugins.registry(), "finetune")
    with pytest.raises(SpecError, match="ToyFeatures does not provide example_inputs"):
        export_onnx(toy, tmp_path / "toy.onnx")
    assert not list(tmp_path.glob("*.onnx"))


def test_models_a_trace_cannot_follow_are_refused(tmp_path):
    """The export's own check on a second batch size catches a graph that kept the traced batch
    (x-vector pools each utterance in a Python loop); multiple choice needs (batch, choices, length)."""
    xvector = tiny({"preset": "data2vec-audio-tiny", "head": {"name": "xvector", "num_labels": 3}})
    with pytest.raises(SpecError, match=r"gives logits of shape \(2, .*PyTorch \(3, .*nothing was written"):
        export_onnx(xvector, tmp_path / "xvector.onnx")
    choice = tiny({"preset": "data2vec-text-tiny", "encoder": {"add_pooling_layer": True}, "head": {"name": "multiple_choice"}})
    with pytest.raises(SpecError, match="does not run on a plain batch.*multiple_choice"):
        export_onnx(choice, tmp_path / "choice.onnx")
    assert not list(tmp_path.iterdir())
