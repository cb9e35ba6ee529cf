"""``TFData2VecVisionModel``, ``TFData2VecVisionForImageClassification`` and
``TFData2VecVisionForSemanticSegmentation``: Keras 3 models with the inputs and output names of
the TensorFlow classes ``transformers`` 4 had (it dropped TensorFlow in version 5).

Each takes channels-first ``pixel_values`` ``(B, C, H, W)`` and returns a dict:
``last_hidden_state`` and ``pooler_output`` (the bare model), ``logits`` (the task models;
segmentation: ``(B, num_labels, H/4, W/4)``), and ``hidden_states`` (embeddings + every layer)
when ``output_hidden_states=True``. Images of another size than the trained one need
``interpolate_pos_encoding=True`` (as in ``transformers``); the positional scheme is then
resized exactly as d2v's PyTorch model resizes it. Built with trained weights by
:func:`d2v_vision.tf.weights.from_torch` / :func:`d2v_vision.tf.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import tensorflow as tf

from d2v_vision.tf.layers import Encoder, PatchEmbedding, as_float32, static_grid
from d2v_vision.tf.uper_head import SegmentationHead


@dataclass(frozen=True)
class Architecture:
    """The options of a d2v data2vec-vision model that shape its TensorFlow twin."""

    dim: int
    layers: int
    heads: int
    ffn_dim: int
    activation: str
    eps: float
    window: tuple[int, int]  # the trained patch grid
    patch_size: int
    num_channels: int
    absolute_positions: bool
    shared_relative_bias: bool
    per_layer_relative_bias: bool
    layer_scale: bool
    mean_pooling: bool
    add_pooling_layer: bool
    num_labels: int = 0
    label_names: tuple[str, ...] | None = None
    segmentation: dict = field(default_factory=dict)  # SegmentationHead's options (BatchNorm's eps too)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.window[0] * self.patch_size, self.window[1] * self.patch_size


class TFData2VecVisionModel(keras.Model):
    """The backbone: patch embedding + encoder (+ pooler)."""

    def __init__(self, architecture: Architecture, **kwargs):
        super().__init__(**kwargs)
        a = self.architecture = architecture
        self.embeddings = PatchEmbedding(dim=a.dim, patch_size=a.patch_size, name="embeddings")
        self.encoder = Encoder(dim=a.dim, layers=a.layers, heads=a.heads, ffn_dim=a.ffn_dim, activation=a.activation,
                               eps=a.eps, window=a.window, absolute_positions=a.absolute_positions,
                               shared_relative_bias=a.shared_relative_bias,
                               per_layer_relative_bias=a.per_layer_relative_bias, layer_scale=a.layer_scale,
                               mean_pooling=a.mean_pooling, add_pooling_layer=a.add_pooling_layer, name="encoder")

    def grid(self, pixel_values: tf.Tensor, interpolate_pos_encoding: bool) -> tuple[int, int]:
        """The batch's patch grid; another size than the trained one only when asked for."""
        if pixel_values.shape.rank != 4 or pixel_values.shape[1] != self.architecture.num_channels:
            raise ValueError(f"pixel_values must be (batch, {self.architecture.num_channels}, height, width) "
                             f"(channels first), got {tuple(pixel_values.shape)}.")
        grid = static_grid(pixel_values, self.architecture.patch_size)
        if grid != self.architecture.window and not interpolate_pos_encoding:
            height, width = self.architecture.image_size
            raise ValueError(f"input image size {pixel_values.shape[2]}x{pixel_values.shape[3]} differs from the "
                             f"model's {height}x{width}; pass interpolate_pos_encoding=True to resize the positional "
                             f"scheme (as d2v's PyTorch model does).")
        return grid

    def call(self, pixel_values, output_hidden_states: bool = False, interpolate_pos_encoding: bool = False,
             training: bool = False) -> dict[str, tf.Tensor]:
        pixel_values = as_float32(pixel_values)
        grid = self.grid(pixel_values, interpolate_pos_encoding)
        return self.encoder(self.embeddings(pixel_values), grid=grid, output_hidden_states=output_hidden_states)


class TFData2VecVisionForImageClassification(keras.Model):
    """A Linear on the pooled output (mean of the patch tokens + LayerNorm, or CLS)."""

    def __init__(self, architecture: Architecture, **kwargs):
        super().__init__(**kwargs)
        self.architecture = architecture
        self.data2vec_vision = TFData2VecVisionModel(architecture, name="data2vec_vision")
        self.classifier = keras.layers.Dense(architecture.num_labels, name="classifier")

    def call(self, pixel_values, output_hidden_states: bool = False, interpolate_pos_encoding: bool = False,
             training: bool = False) -> dict[str, tf.Tensor]:
        outputs = self.data2vec_vision(pixel_values, output_hidden_states=output_hidden_states,
                                       interpolate_pos_encoding=interpolate_pos_encoding)
        result = {"logits": self.classifier(outputs["pooler_output"])}
        if output_hidden_states:
            result["hidden_states"] = outputs["hidden_states"]
        return result


class TFData2VecVisionForSemanticSegmentation(keras.Model):
    """UperNet (+ the FCN auxiliary head) on four hidden states of the backbone."""

    def __init__(self, architecture: Architecture, **kwargs):
        super().__init__(**kwargs)
        self.architecture = architecture
        self.data2vec_vision = TFData2VecVisionModel(architecture, name="data2vec_vision")
        self.head = SegmentationHead(dim=architecture.dim, num_labels=architecture.num_labels, name="head",
                                     **architecture.segmentation)

    def call(self, pixel_values, output_hidden_states: bool = False, interpolate_pos_encoding: bool = False,
             output_auxiliary_logits: bool = False, training: bool = False) -> dict[str, tf.Tensor]:
        """``logits`` ``(B, num_labels, H/4, W/4)``; ``auxiliary_logits`` (the FCN head's, used
        in training only) with ``output_auxiliary_logits=True``."""
        pixel_values = as_float32(pixel_values)
        grid = self.data2vec_vision.grid(pixel_values, interpolate_pos_encoding)
        outputs = self.data2vec_vision(pixel_values, output_hidden_states=True,
                                       interpolate_pos_encoding=interpolate_pos_encoding)
        head = self.head(list(outputs["hidden_states"]), grid=grid)
        result = {"logits": head["logits"]}
        if output_auxiliary_logits and "auxiliary_logits" in head:
            result["auxiliary_logits"] = head["auxiliary_logits"]
        if output_hidden_states:
            result["hidden_states"] = outputs["hidden_states"]
        return result
