"""Parity of the audio task heads and the adapter with Hugging Face ``transformers``.

Tiny random ``Data2VecAudioForSequenceClassification`` (with and without the weighted layer
sum), ``ForAudioFrameClassification``, ``ForXVector`` and ``add_adapter=True`` models
(``Data2VecAudioModel``, ``ForCTC``, ``ForXVector``) are saved by ``transformers``, loaded with
``d2v.from_pretrained`` and compared output by output -- logits, embeddings, losses, hidden
states -- on padded batches in eval mode; the d2v export is then loaded back by
``transformers`` (no missing or unexpected weights) and compared again.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from audio_batches import LENGTHS, padded_batch
from max_diff import MaxDiff

import d2v
from d2v.api.errors import SpecError
from d2v.interop.hf import save_pretrained
from d2v.spec.model import build_model
from d2v.api.plugins import registry

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Data2VecAudioConfig,
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForCTC,
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForXVector,
    Data2VecAudioModel,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)
# a small data2vec-shaped backbone: 3 conv layers (stride 20), 2 Transformer layers
BACKBONE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    conv_dim=(16, 16, 24), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), conv_bias=True,
    num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
    vocab_size=12,
)
# small TDNN with HF's kernel/dilation pattern (dilation makes the pooling quirk visible)
XVECTOR = dict(tdnn_dim=(24, 24, 40), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=16)


assert_close = MAX_DIFF.check


def hf_model(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = cls(Data2VecAudioConfig(**{**BACKBONE, **kwargs})).eval()
    # random biases/norms, sharp attention and non-uniform layer weights: every weight matters
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
            elif "layer_norm.weight" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.3)
            elif name == "layer_weights":
                param.normal_(0.0, 1.0)
    return model


def compare(ours, theirs, fields) -> None:
    for field in fields:
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a is None) == (b is None), f"{field}: present in only one output"
        if isinstance(b, tuple):
            assert len(a) == len(b), f"{field}: {len(a)} vs {len(b)} tensors"
            for i, (x, y) in enumerate(zip(a, b)):
                assert_close(f"{field}[{i}]", x, y)
        elif b is not None:
            assert_close(field, a, b)


def run(model, inputs, attention_mask, labels=None, *, hf: bool, hidden: bool = True):
    kwargs = {"attention_mask": attention_mask, "output_hidden_states": hidden}
    if labels is not None:
        kwargs["labels"] = labels
    with torch.no_grad():
        return model(inputs, **kwargs) if hf else model(input_values=inputs, **kwargs)


def roundtrip(cls, theirs, tmp_path, inputs, attention_mask, labels, fields):
    """HF -> d2v (compare) -> export -> HF (compare, nothing missing/unexpected) -> d2v again."""
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    expected = run(theirs, inputs, attention_mask, labels, hf=True)
    got = run(ours, inputs, attention_mask, labels, hf=False)
    compare(got, expected, fields)
    ours.save_pretrained(tmp_path / "d2v")
    config = json.loads((tmp_path / "d2v" / "config.json").read_text())
    assert config["architectures"] == [cls.__name__]
    back, info = cls.from_pretrained(tmp_path / "d2v", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    compare(run(back.eval(), inputs, attention_mask, labels, hf=True), expected, fields)
    again = d2v.from_pretrained(tmp_path / "d2v")
    compare(run(again, inputs, attention_mask, labels, hf=False), expected, fields)
    return ours, got


# --------------------------------------------------------------------------- sequence classification


@pytest.mark.parametrize("weighted", [False, True], ids=["last_layer", "weighted_layer_sum"])
def test_sequence_classification_parity(weighted, tmp_path):
    theirs = hf_model(Data2VecAudioForSequenceClassification, num_labels=5, classifier_proj_size=12,
                      use_weighted_layer_sum=weighted, id2label={i: f"word{i}" for i in range(5)})
    inputs, attention_mask = padded_batch()
    labels = torch.tensor([3, 0, 4])
    ours, got = roundtrip(Data2VecAudioForSequenceClassification, theirs, tmp_path, inputs, attention_mask, labels,
                          ("loss", "logits", "hidden_states"))
    head = ours.model.head
    assert type(head).__name__ == "AudioClassificationHead"
    assert head.label_names == [f"word{i}" for i in range(5)] and head.needs_hidden_states == weighted
    assert set(got.keys()) == {"loss", "logits", "hidden_states"}
    # no attention mask: plain mean over all frames, as HF
    with torch.no_grad():
        compare(ours(input_values=inputs, labels=labels), theirs(inputs, labels=labels), ("loss", "logits"))


# --------------------------------------------------------------------------- frame classification


def frame_labels(batch: int, frames: int, num_labels: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, frames, num_labels, generator=g) > 0.6).long()


@pytest.mark.parametrize("weighted", [False, True], ids=["last_layer", "weighted_layer_sum"])
def test_frame_classification_parity(weighted, tmp_path):
    theirs = hf_model(Data2VecAudioForAudioFrameClassification, num_labels=3, use_weighted_layer_sum=weighted)
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        frames = theirs(inputs).logits.shape[1]
    labels = frame_labels(len(LENGTHS), frames, 3)
    ours, got = roundtrip(Data2VecAudioForAudioFrameClassification, theirs, tmp_path, inputs, attention_mask, labels,
                          ("loss", "logits", "hidden_states"))
    head = ours.model.head
    assert head.loss_name == "cross_entropy" and head.num_labels == 3
    # the HF loss by hand: softmax cross-entropy against each row's argmax, every frame counted
    reference = torch.nn.functional.cross_entropy(got.logits.reshape(-1, 3), labels.reshape(-1, 3).argmax(-1))
    assert_close("frame.loss_formula", got.loss, reference)


# --------------------------------------------------------------------------- x-vector


@pytest.mark.parametrize("weighted", [False, True], ids=["last_layer", "weighted_layer_sum"])
def test_xvector_parity(weighted, tmp_path):
    theirs = hf_model(Data2VecAudioForXVector, num_labels=4, use_weighted_layer_sum=weighted, **XVECTOR)
    inputs, attention_mask = padded_batch()
    labels = torch.tensor([1, 3, 0])
    ours, got = roundtrip(Data2VecAudioForXVector, theirs, tmp_path, inputs, attention_mask, labels,
                          ("loss", "logits", "embeddings", "hidden_states"))
    assert set(got.keys()) == {"loss", "logits", "embeddings", "hidden_states"}
    head = ours.model.head
    assert head.tdnn_dilation == list(XVECTOR["tdnn_dilation"])
    # unpadded: every TDNN frame is pooled
    with torch.no_grad():
        compare(ours(input_values=inputs, labels=labels), theirs(inputs, labels=labels),
                ("loss", "logits", "embeddings"))


def test_xvector_amsoftmax_formula(tmp_path):
    theirs = hf_model(Data2VecAudioForXVector, num_labels=4, **XVECTOR)
    theirs.save_pretrained(tmp_path)
    ours = d2v.from_pretrained(tmp_path)
    inputs, attention_mask = padded_batch()
    labels = torch.tensor([2, 2, 1])
    out = run(ours, inputs, attention_mask, labels, hf=False, hidden=False)
    w = ours.model.head.objective.weight
    cos = torch.nn.functional.normalize(out.logits, dim=1) @ torch.nn.functional.normalize(w, dim=0)
    margin = torch.zeros_like(cos)
    margin[torch.arange(3), labels] = 0.4
    assert_close("xvector.amsoftmax_formula", out.loss, torch.nn.functional.cross_entropy(30.0 * (cos - margin), labels))


# --------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("output_hidden_size", [None, 24], ids=["same_width", "projected"])
def test_adapter_model_and_ctc_parity(output_hidden_size, tmp_path):
    kwargs = dict(add_adapter=True, num_adapter_layers=2, adapter_stride=2, output_hidden_size=output_hidden_size)
    theirs = hf_model(Data2VecAudioModel, **kwargs)
    inputs, attention_mask = padded_batch()
    roundtrip(Data2VecAudioModel, theirs, tmp_path / "model", inputs, attention_mask, None,
              ("last_hidden_state", "extract_features", "hidden_states"))

    theirs = hf_model(Data2VecAudioForCTC, seed=1, **kwargs)
    labels = torch.randint(1, 12, (3, 4), generator=torch.Generator().manual_seed(2))
    labels[2, 2:] = -100
    ours, _ = roundtrip(Data2VecAudioForCTC, theirs, tmp_path / "ctc", inputs, attention_mask, labels,
                        ("loss", "logits", "hidden_states"))
    encoder = ours.model.encoder
    assert encoder.adapter is not None and encoder.output_dim == (output_hidden_size or 32)
    assert ours.model.head.input_dim == encoder.output_dim


def test_adapter_xvector_parity(tmp_path):
    theirs = hf_model(Data2VecAudioForXVector, num_labels=3, add_adapter=True, num_adapter_layers=1,
                      **{**XVECTOR, "tdnn_kernel": (3, 3, 1), "tdnn_dilation": (1, 1, 1)})
    inputs, attention_mask = padded_batch()
    roundtrip(Data2VecAudioForXVector, theirs, tmp_path, inputs, attention_mask, torch.tensor([0, 2, 1]),
              ("loss", "logits", "embeddings"))


def test_adapter_is_rejected_where_transformers_rejects_it():
    from d2v_audio.hf import AudioFrameClassificationConverter, AudioSequenceClassificationConverter, AudioXVectorConverter

    config = Data2VecAudioConfig(**BACKBONE, add_adapter=True).to_dict()
    for converter in (AudioSequenceClassificationConverter(), AudioFrameClassificationConverter()):
        with pytest.raises(SpecError, match="add_adapter"):
            converter.hf_config_to_spec(config)
    config = Data2VecAudioConfig(**BACKBONE, add_adapter=True, output_hidden_size=16).to_dict()
    with pytest.raises(SpecError, match="output_hidden_size"):
        AudioXVectorConverter().hf_config_to_spec(config)


# --------------------------------------------------------------------------- config options


def test_apply_spec_augment_false_round_trips(tmp_path):
    theirs = hf_model(Data2VecAudioForSequenceClassification, num_labels=2, apply_spec_augment=False,
                      mask_time_prob=0.3, mask_feature_prob=0.2)
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    encoder = ours.model.encoder
    assert not encoder.apply_spec_augment and encoder.mask_time_prob == 0.3
    x = torch.randn(2, 40, 32)
    encoder.train()
    assert torch.equal(encoder.spec_augment(x), x)  # switched off, settings kept
    encoder.eval()
    ours.save_pretrained(tmp_path / "d2v")
    config = json.loads((tmp_path / "d2v" / "config.json").read_text())
    assert config["apply_spec_augment"] is False and config["mask_time_prob"] == 0.3
    back, info = Data2VecAudioForSequenceClassification.from_pretrained(tmp_path / "d2v", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_spec_built_heads_export_to_transformers(tmp_path):
    """Heads built from a spec (num_layers/input_dim injected) export and load in transformers."""
    model = build_model({"preset": "data2vec-audio-tiny",
                         "head": {"name": "audio_classification", "label_names": ["a", "b", "c"],
                                  "use_weighted_layer_sum": True, "classifier_proj_size": 8}},
                        registry(), "finetune").eval()
    assert model.head.layer_weights.numel() == model.encoder.num_layers + 1
    save_pretrained(model, tmp_path, "Data2VecAudioForSequenceClassification")
    theirs = Data2VecAudioForSequenceClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    inputs, attention_mask = padded_batch(lengths=(16000, 9000))
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        ours = model({"inputs": inputs, "padding_mask": attention_mask == 0, "labels": labels})
        expected = theirs(inputs, attention_mask=attention_mask, labels=labels)
    assert_close("tiny.seq.logits", ours.logits, expected.logits)
    assert_close("tiny.seq.loss", ours.loss, expected.loss)


def test_converters_are_registered_and_chosen_for_export():
    """``d2v convert`` picks the converter whose ``exports`` accepts the model: exactly one per head."""
    heads = {
        "audio_classification": ("Data2VecAudioForSequenceClassification", {"num_labels": 3}),
        "audio_frame_classification": ("Data2VecAudioForAudioFrameClassification", {"num_labels": 2}),
        "xvector": ("Data2VecAudioForXVector", {"num_labels": 3}),
    }
    converters = {c.name: c.build() for c in registry().components("hf_converter")}
    for head, (architecture, params) in heads.items():
        model = build_model({"preset": "data2vec-audio-tiny", "head": {"name": head, **params}}, registry(), "finetune")
        chosen = [name for name, conv in converters.items() if getattr(conv, "exports", lambda m: False)(model)]
        assert chosen == [architecture], (head, chosen)


def test_report_max_diff():
    MAX_DIFF.report("audio heads parity")
    assert MAX_DIFF.worst <= ATOL
