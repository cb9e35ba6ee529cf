"""PyTorch's resampling (``F.interpolate`` bilinear/bicubic with ``align_corners=False``, and
``AdaptiveAvgPool2d``) as constant matrices applied along height and width.

TensorFlow's ``tf.image.resize`` uses another bicubic kernel (a = -0.5, PyTorch's is -0.75) and
TFLite has no adaptive pooling, so we resample the way d2v's PyTorch model does, exactly: both
operations are separable and linear, so each side is a ``(new, old)`` matrix, read off PyTorch
itself by resampling the identity. The sizes are the graph's static image sizes, so the
matrices are constants of the exported graph.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import tensorflow as tf
import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def resize_matrix(old: int, new: int, mode: str) -> np.ndarray:
    """``(new, old)``: row ``i`` holds the weights of output ``i`` (``mode``: bilinear or bicubic)."""
    identity = torch.eye(old, dtype=torch.float64).reshape(old, 1, old, 1)  # one unit impulse per batch entry
    resized = F.interpolate(identity, size=(new, 1), mode=mode, align_corners=False)
    return resized.reshape(old, new).T.numpy().astype(np.float32)


@lru_cache(maxsize=64)
def adaptive_pool_matrix(old: int, new: int) -> np.ndarray:
    """``(new, old)`` averaging weights of ``AdaptiveAvgPool1d(new)`` (PyTorch's cell bounds)."""
    identity = torch.eye(old, dtype=torch.float64)[:, None, :]
    return F.adaptive_avg_pool1d(identity, new)[:, 0, :].T.numpy().astype(np.float32)


def apply_2d(x: tf.Tensor, rows: np.ndarray, cols: np.ndarray) -> tf.Tensor:
    """``(B, H, W, C)`` -> ``(B, H', W', C)`` with ``rows`` ``(H', H)`` and ``cols`` ``(W', W)``."""
    # broadcast matmuls over (B, W) then (B, H'): TFLite's einsum lowering loses the dynamic batch
    x = tf.transpose(tf.matmul(tf.constant(rows), tf.transpose(x, (0, 2, 1, 3))), (0, 2, 1, 3))
    return tf.matmul(tf.constant(cols), x)


def resize_2d(x: tf.Tensor, size: tuple[int, int], mode: str = "bilinear") -> tf.Tensor:
    """``F.interpolate(x, size, mode, align_corners=False)`` for channels-last ``x`` of static size."""
    height, width = int(x.shape[1]), int(x.shape[2])
    if (height, width) == tuple(size):
        return x
    return apply_2d(x, resize_matrix(height, size[0], mode), resize_matrix(width, size[1], mode))


def adaptive_avg_pool_2d(x: tf.Tensor, size: int) -> tf.Tensor:
    """``AdaptiveAvgPool2d(size)`` for channels-last ``x`` of static size."""
    height, width = int(x.shape[1]), int(x.shape[2])
    return apply_2d(x, adaptive_pool_matrix(height, size), adaptive_pool_matrix(width, size))
