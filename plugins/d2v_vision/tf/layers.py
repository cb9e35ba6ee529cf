"""The data2vec-vision encoder in Keras 3 (TensorFlow backend), layer for layer as d2v's PyTorch
``vision.patches`` + ``vision.transformer`` (:mod:`d2v_vision.patches`, :mod:`d2v_vision.encoder`):

    PatchEmbedding (channels-first images -> CLS + patches)
    RelativePositionBias (per block or shared), Attention, Block (pre-LN, layer scale) -> Encoder

Inference only: no dropout, stochastic depth or mask embedding (training stays in PyTorch).
The patch grid of a batch is static (read from the image size), so a graph is traced per image
size, as the ONNX export does.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from d2v_vision.relative_position import relative_position_index
from d2v_vision.tf.resampling import resize_2d

#: PyTorch activation -> TensorFlow function, by the d2v activation names
ACTIVATIONS = {
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "relu": tf.nn.relu,
    "silu": tf.nn.silu,
    "tanh": tf.math.tanh,
}


class PatchEmbedding(keras.layers.Layer):
    """Images ``(B, C, H, W)`` (channels first, as Hugging Face's TF classes took them) ->
    ``(B, 1 + H/p * W/p, dim)``: the CLS token, then the patches row-major."""

    def __init__(self, *, dim: int, patch_size: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.projection = keras.layers.Conv2D(dim, patch_size, strides=patch_size, padding="valid", name="projection")
        self.cls_token = self.add_weight(shape=(1, 1, self.dim), initializer="zeros", name="cls_token")

    def call(self, pixel_values: tf.Tensor) -> tf.Tensor:
        patches = self.projection(tf.transpose(pixel_values, (0, 2, 3, 1)))  # Conv2D on CPU is channels-last
        batch = tf.shape(patches)[0]
        patches = tf.reshape(patches, (batch, -1, self.dim))
        return tf.concat([tf.tile(self.cls_token, (batch, 1, 1)), patches], axis=1)


class RelativePositionBias(keras.layers.Layer):
    """BEiT's table of per-head biases for every 2-D patch offset (+ 3 CLS entries), trained at
    the patch grid ``window``; at another grid the offsets are resized bilinearly exactly as
    :class:`d2v_vision.relative_position.RelativePositionBias` does (its width-major layout too)."""

    def __init__(self, *, window: tuple[int, int], heads: int, **kwargs):
        super().__init__(**kwargs)
        self.window = (int(window[0]), int(window[1]))
        self.heads = heads
        self.num_relative = (2 * self.window[0] - 1) * (2 * self.window[1] - 1) + 3
        self.table = self.add_weight(shape=(self.num_relative, self.heads), initializer="zeros", name="table")

    def resized_table(self, grid: tuple[int, int]) -> tf.Tensor:
        if grid == self.window:
            return tf.convert_to_tensor(self.table)  # a gather straight from the variable stays a variable in TFLite
        old_rows, old_cols = 2 * self.window[1] - 1, 2 * self.window[0] - 1  # d2v's (and HF's) reshape
        new_rows, new_cols = 2 * grid[0] - 1, 2 * grid[1] - 1
        offsets = tf.reshape(self.table[: self.num_relative - 3], (1, old_rows, old_cols, self.heads))
        offsets = tf.reshape(resize_2d(offsets, (new_rows, new_cols), "bilinear"), (new_rows * new_cols, self.heads))
        return tf.concat([offsets, self.table[self.num_relative - 3:]], axis=0)

    def bias(self, grid: tuple[int, int]) -> tf.Tensor:
        """``(1, heads, N + 1, N + 1)`` for the ``(H, W)`` patch grid ``grid`` (``N = H * W``)."""
        index = relative_position_index(tuple(grid)).numpy()
        bias = tf.gather(self.resized_table(tuple(grid)), tf.constant(index.reshape(-1), dtype=tf.int32))
        bias = tf.reshape(bias, (*index.shape, self.heads))
        return tf.transpose(bias, (2, 0, 1))[None]


class Attention(keras.layers.Layer):
    """Multi-head self-attention with an additive bias; the key projection has no bias (BEiT)."""

    def __init__(self, *, dim: int, heads: int, window: tuple[int, int] | None, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads = dim, heads
        self.query = keras.layers.Dense(dim, name="query")
        self.key = keras.layers.Dense(dim, use_bias=False, name="key")
        self.value = keras.layers.Dense(dim, name="value")
        self.proj = keras.layers.Dense(dim, name="proj")
        self.relative_position_bias = None if window is None else RelativePositionBias(
            window=window, heads=heads, name="relative_position_bias")

    def split_heads(self, x: tf.Tensor) -> tf.Tensor:
        batch, tokens = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, (batch, tokens, self.heads, self.dim // self.heads)), (0, 2, 1, 3))

    def call(self, x: tf.Tensor, bias: tf.Tensor | None, grid: tuple[int, int]) -> tf.Tensor:
        q, k, v = (self.split_heads(projection(x)) for projection in (self.query, self.key, self.value))
        scores = tf.matmul(q, k, transpose_b=True) / math.sqrt(self.dim // self.heads)
        if self.relative_position_bias is not None:
            scores = scores + self.relative_position_bias.bias(grid)
        if bias is not None:
            scores = scores + bias
        out = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
        batch, tokens = tf.shape(x)[0], tf.shape(x)[1]
        return self.proj(tf.reshape(tf.transpose(out, (0, 2, 1, 3)), (batch, tokens, self.dim)))


class Block(keras.layers.Layer):
    """``x + lambda_1 * attn(LN(x))``, then ``x + lambda_2 * mlp(LN(x))`` (no layer scale when
    ``layer_scale`` is False)."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, activation: str, eps: float, layer_scale: bool,
                 window: tuple[int, int] | None, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.layer_scale = layer_scale
        self.activation = ACTIVATIONS[activation]
        self.norm1 = keras.layers.LayerNormalization(epsilon=eps, name="norm1")
        self.attention = Attention(dim=dim, heads=heads, window=window, name="attention")
        self.norm2 = keras.layers.LayerNormalization(epsilon=eps, name="norm2")
        self.fc1 = keras.layers.Dense(ffn_dim, name="fc1")
        self.fc2 = keras.layers.Dense(dim, name="fc2")
        if self.layer_scale:
            self.lambda_1 = self.add_weight(shape=(self.dim,), initializer="ones", name="lambda_1")
            self.lambda_2 = self.add_weight(shape=(self.dim,), initializer="ones", name="lambda_2")

    def call(self, x: tf.Tensor, bias: tf.Tensor | None, grid: tuple[int, int]) -> tf.Tensor:
        attn = self.attention(self.norm1(x), bias=bias, grid=grid)
        x = x + (self.lambda_1 * attn if self.layer_scale else attn)
        ffn = self.fc2(self.activation(self.fc1(self.norm2(x))))
        return x + (self.lambda_2 * ffn if self.layer_scale else ffn)


class Encoder(keras.layers.Layer):
    """Absolute positions (bicubically resized to the grid) and/or a shared relative position
    bias, the blocks, the final LayerNorm (CLS pooling) and the pooler (mean of the patch tokens
    + LayerNorm, or the CLS token); see :class:`d2v_vision.encoder.VisionTransformerEncoder`."""

    def __init__(self, *, dim: int, layers: int, heads: int, ffn_dim: int, activation: str, eps: float,
                 window: tuple[int, int], absolute_positions: bool, shared_relative_bias: bool,
                 per_layer_relative_bias: bool, layer_scale: bool, mean_pooling: bool, add_pooling_layer: bool,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.window = window
        self.absolute_positions = absolute_positions
        self.shared_bias = None
        if shared_relative_bias:
            self.shared_bias = RelativePositionBias(window=window, heads=heads, name="relative_position_bias")
        per_layer = window if per_layer_relative_bias else None
        self.blocks = [Block(dim=dim, heads=heads, ffn_dim=ffn_dim, activation=activation, eps=eps,
                             layer_scale=layer_scale, window=per_layer, name=f"layers.{i}") for i in range(layers)]
        self.mean_pooling = mean_pooling
        self.norm = None if mean_pooling else keras.layers.LayerNormalization(epsilon=eps, name="norm")
        self.pooler_norm = None
        if add_pooling_layer and mean_pooling:
            self.pooler_norm = keras.layers.LayerNormalization(epsilon=eps, name="pooler_norm")
        self.add_pooling_layer = add_pooling_layer
        if self.absolute_positions:
            tokens = self.window[0] * self.window[1] + 1
            self.position_embeddings = self.add_weight(shape=(1, tokens, self.dim), initializer="zeros",
                                                       name="position_embeddings")

    def resized_positions(self, grid: tuple[int, int]) -> tf.Tensor:
        if grid == self.window:
            return self.position_embeddings
        side = math.isqrt(self.window[0] * self.window[1])
        if self.window != (side, side):
            raise ValueError(f"interpolate_pos_encoding: absolute positions resize from a square trained grid (as in "
                             f"d2v's PyTorch model); this model was trained at {self.window[0]}x{self.window[1]}.")
        patches = tf.reshape(self.position_embeddings[:, 1:], (1, side, side, self.dim))
        patches = tf.reshape(resize_2d(patches, grid, "bicubic"), (1, grid[0] * grid[1], self.dim))
        return tf.concat([self.position_embeddings[:, :1], patches], axis=1)

    def call(self, x: tf.Tensor, grid: tuple[int, int], output_hidden_states: bool = False) -> dict[str, tf.Tensor]:
        if self.absolute_positions:
            x = x + self.resized_positions(grid)
        bias = None if self.shared_bias is None else self.shared_bias.bias(grid)
        hidden_states = [x]
        for block in self.blocks:
            x = block(x, bias=bias, grid=grid)
            hidden_states.append(x)
        if self.norm is not None:
            x = self.norm(x)
        out = {"last_hidden_state": x}
        if self.add_pooling_layer:
            out["pooler_output"] = (self.pooler_norm(tf.reduce_mean(x[:, 1:], axis=1)) if self.pooler_norm is not None
                                    else x[:, 0])
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        return out


def static_grid(pixel_values: tf.Tensor, patch_size: int) -> tuple[int, int]:
    """The patch grid of ``(B, C, H, W)`` images; ``H`` and ``W`` must be known when tracing."""
    height, width = pixel_values.shape[2], pixel_values.shape[3]
    if height is None or width is None:
        raise ValueError("pixel_values needs a static height and width (B, C, H, W): the positional scheme is "
                         "resized per image size; trace one graph per image size.")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {patch_size}.")
    return int(height) // patch_size, int(width) // patch_size


def as_float32(pixel_values) -> tf.Tensor:
    """Images given as a tf.Tensor, a numpy array or a (CPU) torch tensor, as float32."""
    tensor = pixel_values if tf.is_tensor(pixel_values) else tf.convert_to_tensor(np.asarray(pixel_values))
    return tf.cast(tensor, tf.float32)
