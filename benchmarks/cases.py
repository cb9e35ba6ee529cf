"""The benchmark cases: one Hugging Face model and the same model through d2v, same weights,
same inputs.

Each case builds a ``transformers`` model from a config (random weights, seeded), saves it,
loads it back through ``d2v.from_pretrained`` (the d2v-native model behind a Hugging Face
compatible forward), and makes one padded batch with labels. ``build(name, size, device)``
returns ``(hf_model, d2v_model, inputs, labels, samples)``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: width / depth / heads / FFN per size
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


@dataclass
class Case:
    name: str
    description: str
    make: Callable[[str], Any]   # size -> (hf model, inputs dict, labels, samples)
    #: a batch people train with on one 80 GB GPU (too slow for the 2-core CPU at base size)
    realistic: bool = False
    #: the encoder can leave the padding out (``padding_free``): audio and text
    padded: bool = False


def _padded(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def _lengths(batch: int, longest: int, shortest_fraction: float) -> list[int]:
    """Lengths spread evenly from ``longest`` down to ``shortest_fraction`` of it."""
    return [int(longest * (1.0 - (1.0 - shortest_fraction) * i / max(1, batch - 1))) for i in range(batch)]


def _audio(batch: int, seconds: float):
    def make(size: str):
        import transformers

        config = transformers.Data2VecAudioConfig(**SIZES[size], vocab_size=32, mask_time_prob=0.05)
        config.architectures = ["Data2VecAudioForCTC"]
        model = transformers.Data2VecAudioForCTC(config)
        samples = int(16000 * seconds)
        lengths = _lengths(batch, samples, 0.7)
        mask = _padded(lengths, samples)
        inputs = {"input_values": torch.randn(batch, samples) * mask, "attention_mask": mask}
        label_len = max(4, samples // 320 // 6)
        labels = torch.randint(5, 32, (batch, label_len))
        labels[1:, label_len * 3 // 4:] = -100
        return model, inputs, labels, batch
    return make


def _text(batch: int, tokens: int, shortest_fraction: float = 0.6):
    def make(size: str):
        import transformers

        config = transformers.Data2VecTextConfig(**SIZES[size], vocab_size=50265, max_position_embeddings=514,
                                                 num_labels=2, type_vocab_size=1)
        config.architectures = ["Data2VecTextForSequenceClassification"]
        model = transformers.Data2VecTextForSequenceClassification(config)
        lengths = _lengths(batch, tokens, shortest_fraction)
        mask = _padded(lengths, tokens)
        ids = torch.randint(4, 50265, (batch, tokens)).masked_fill(mask == 0, 1)
        return model, {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (batch,)), batch
    return make


def _vision(batch: int, pixels: int, segmentation: bool):
    def make(size: str):
        import transformers

        extra = {"image_size": pixels, "use_relative_position_bias": True, "layer_scale_init_value": 0.1}
        if segmentation:
            layers = SIZES[size]["num_hidden_layers"]
            extra.update(num_labels=150, out_indices=[max(1, layers // 4), layers // 2, 3 * layers // 4, layers])
            config = transformers.Data2VecVisionConfig(**SIZES[size], **extra)
            config.architectures = ["Data2VecVisionForSemanticSegmentation"]
            model = transformers.Data2VecVisionForSemanticSegmentation(config)
            labels = torch.randint(0, 150, (batch, pixels, pixels))
        else:
            config = transformers.Data2VecVisionConfig(**SIZES[size], num_labels=1000, **extra)
            config.architectures = ["Data2VecVisionForImageClassification"]
            model = transformers.Data2VecVisionForImageClassification(config)
            labels = torch.randint(0, 1000, (batch,))
        return model, {"pixel_values": torch.randn(batch, 3, pixels, pixels)}, labels, batch
    return make


CASES = {
    "audio_ctc_2x5s": Case("audio_ctc_2x5s", "audio CTC, 2 x 5 s", _audio(2, 5.0), padded=True),
    "audio_ctc_4x15s": Case("audio_ctc_4x15s", "audio CTC, 4 x 15 s", _audio(4, 15.0), padded=True),
    "text_cls_8x256": Case("text_cls_8x256", "text classification, 8 x 256 tokens", _text(8, 256), padded=True),
    "vision_cls_8x224": Case("vision_cls_8x224", "image classification, 8 x 224 px", _vision(8, 224, False)),
    "vision_seg_2x512": Case("vision_seg_2x512", "semantic segmentation, 2 x 512 px", _vision(2, 512, True)),
    # what people run on one 80 GB GPU (lengths 70-100 % audio, 50-100 % text)
    "audio_ctc_8x15s": Case("audio_ctc_8x15s", "audio CTC, 8 x 15 s", _audio(8, 15.0), realistic=True, padded=True),
    "text_cls_32x512": Case("text_cls_32x512", "text classification, 32 x 512 tokens", _text(32, 512, 0.5),
                            realistic=True, padded=True),
    "vision_cls_64x224": Case("vision_cls_64x224", "image classification, 64 x 224 px", _vision(64, 224, False),
                              realistic=True),
}


def build(name: str, size: str, device: str):
    """``(hf_model, d2v_model, inputs, labels, samples)`` on ``device``, identical weights."""
    import d2v

    torch.manual_seed(0)
    hf, inputs, labels, samples = CASES[name].make(size)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = d2v.from_pretrained(tmp)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return hf.to(device), ours.to(device), inputs, labels.to(device), samples
