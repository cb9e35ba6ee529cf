"""The segmentation head in Keras 3, as d2v's PyTorch ``semantic_segmentation`` head
(:mod:`d2v_heads.vision.semantic_segmentation`, Hugging Face's ``Data2VecVisionForSemanticSegmentation``):
four encoder hidden states as 2-D maps at four scales (``fpn1``..``fpn4``), UperNet (PSP pooling +
FPN) for the logits and the FCN auxiliary head.

Channels-last inside (TensorFlow's CPU convolutions need it); the logits leave channels-first,
``(B, num_labels, H/4, W/4)``, as the old ``TFData2VecVisionForSemanticSegmentation`` gave them.
Pooling and bilinear resizing are PyTorch's exactly (:mod:`d2v_vision.tf.resampling`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from d2v_vision.tf.resampling import adaptive_avg_pool_2d, resize_2d


class ConvLayer(keras.layers.Layer):
    """Conv2D (no bias, "same" padding) -> BatchNorm (inference statistics) -> ReLU."""

    def __init__(self, channels: int, kernel_size: int = 1, *, eps: float, **kwargs):
        super().__init__(**kwargs)
        self.convolution = keras.layers.Conv2D(channels, kernel_size, padding="same", use_bias=False, name="convolution")
        self.normalization = keras.layers.BatchNormalization(epsilon=eps, name="normalization")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(self.normalization(self.convolution(x), training=False))


def spatial_size(x: tf.Tensor) -> tuple[int, int]:
    return int(x.shape[1]), int(x.shape[2])


class UperHead(keras.layers.Layer):
    """UperNet over four ``channels``-wide maps, finest first."""

    def __init__(self, *, channels: int, num_labels: int, pool_scales: Sequence[int], eps: float, **kwargs):
        super().__init__(**kwargs)
        self.pool_scales = list(pool_scales)
        self.psp_convs = [ConvLayer(channels, eps=eps, name=f"psp_modules.blocks.{i}.conv")
                          for i in range(len(self.pool_scales))]
        self.psp_bottleneck = ConvLayer(channels, 3, eps=eps, name="psp_bottleneck")
        self.lateral_convs = [ConvLayer(channels, eps=eps, name=f"lateral_convs.{i}") for i in range(3)]
        self.fpn_convs = [ConvLayer(channels, 3, eps=eps, name=f"fpn_convs.{i}") for i in range(3)]
        self.fpn_bottleneck = ConvLayer(channels, 3, eps=eps, name="fpn_bottleneck")
        self.classifier = keras.layers.Conv2D(num_labels, 1, name="classifier")

    def call(self, maps: list[tf.Tensor]) -> tf.Tensor:
        top = maps[-1]
        pooled = [resize_2d(conv(adaptive_avg_pool_2d(top, scale)), spatial_size(top))
                  for scale, conv in zip(self.pool_scales, self.psp_convs)]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.psp_bottleneck(tf.concat([top, *pooled], axis=-1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_2d(laterals[i], spatial_size(laterals[i - 1]))
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [resize_2d(x, spatial_size(outs[0])) for x in outs[1:]]
        return self.classifier(self.fpn_bottleneck(tf.concat(outs, axis=-1)))


class FCNHead(keras.layers.Layer):
    """``num_convs`` 3x3 ConvLayers (+ a concat with the input) -> 1x1 classifier, on map ``in_index``."""

    def __init__(self, *, channels: int, num_labels: int, num_convs: int, concat_input: bool, eps: float,
                 in_index: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.in_index = in_index
        self.convs = [ConvLayer(channels, 3, eps=eps, name=f"convs.{i}") for i in range(num_convs)]
        self.conv_cat = ConvLayer(channels, 3, eps=eps, name="conv_cat") if concat_input else None
        self.classifier = keras.layers.Conv2D(num_labels, 1, name="classifier")

    def call(self, maps: list[tf.Tensor]) -> tf.Tensor:
        residual = x = maps[self.in_index]
        for conv in self.convs:
            x = conv(x)
        if self.conv_cat is not None:
            x = self.conv_cat(tf.concat([residual, x], axis=-1))
        return self.classifier(x)


class SegmentationHead(keras.layers.Layer):
    """Hidden states ``out_indices`` (1-based: hidden state ``i - 1``, Hugging Face's rule) ->
    ``fpn1`` (x4 up: ConvTranspose, BatchNorm, GELU, ConvTranspose), ``fpn2`` (x2 up), ``fpn3``
    (as is), ``fpn4`` (max-pool /2) -> UperNet logits and, with an auxiliary head, its logits."""

    def __init__(self, *, dim: int, num_labels: int, out_indices: Sequence[int], pool_scales: Sequence[int],
                 auxiliary: dict | None, eps: float, **kwargs):
        super().__init__(**kwargs)
        self.out_indices = [int(i) for i in out_indices]
        self.fpn1_up = keras.layers.Conv2DTranspose(dim, 2, strides=2, name="fpn1.0")
        self.fpn1_norm = keras.layers.BatchNormalization(epsilon=eps, name="fpn1.1")
        self.fpn1_up2 = keras.layers.Conv2DTranspose(dim, 2, strides=2, name="fpn1.3")
        self.fpn2_up = keras.layers.Conv2DTranspose(dim, 2, strides=2, name="fpn2.0")
        self.decode_head = UperHead(channels=dim, num_labels=num_labels, pool_scales=pool_scales, eps=eps,
                                    name="decode_head")
        self.auxiliary_head = None if auxiliary is None else FCNHead(num_labels=num_labels, eps=eps,
                                                                     name="auxiliary_head", **auxiliary)

    def feature_maps(self, hidden_states: Sequence[tf.Tensor], grid: tuple[int, int]) -> list[tf.Tensor]:
        chosen = [x for index, x in enumerate(hidden_states) if index + 1 in self.out_indices]
        maps = [tf.reshape(x[:, 1:], (tf.shape(x)[0], grid[0], grid[1], x.shape[-1])) for x in chosen]
        fpn1 = self.fpn1_up2(tf.nn.gelu(self.fpn1_norm(self.fpn1_up(maps[0]), training=False), approximate=False))
        fpn4 = tf.nn.max_pool2d(maps[3], ksize=2, strides=2, padding="VALID")
        return [fpn1, self.fpn2_up(maps[1]), maps[2], fpn4]

    def call(self, hidden_states: Sequence[tf.Tensor], grid: tuple[int, int]) -> dict[str, tf.Tensor]:
        """``logits`` (and ``auxiliary_logits``), channels-first."""
        maps = self.feature_maps(hidden_states, grid)
        out = {"logits": tf.transpose(self.decode_head(maps), (0, 3, 1, 2))}
        if self.auxiliary_head is not None:
            out["auxiliary_logits"] = tf.transpose(self.auxiliary_head(maps), (0, 3, 1, 2))
        return out
