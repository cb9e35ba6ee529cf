"""The convolution module's normalisation over valid frames only.

torchaudio's Conformer normalises the depthwise-conv output with ``BatchNorm1d`` (statistics
over batch and time) or ``GroupNorm(1, C)`` (statistics over channels and time of each
example). Both pool over time, so padded frames -- and, under data2vec 2.0, the holes left by
dropped tokens -- would shift every valid frame's value. These functions compute the same
normalisation with the module's own parameters and running buffers, counting valid frames only;
with nothing padded they equal the module's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_norm(norm: nn.Module, x: Tensor, valid: Tensor | None) -> Tensor:
    """Apply ``norm`` (``BatchNorm1d`` or ``GroupNorm`` with one group) to ``x`` ``(B, C, T)``
    using the frames where ``valid`` ``(B, T)`` is True; other frames come out as zeros."""
    if valid is None:
        return norm(x)
    if isinstance(norm, nn.BatchNorm1d):
        return _masked_batch_norm(norm, x, valid)
    if isinstance(norm, nn.GroupNorm) and norm.num_groups == 1:
        return _masked_single_group_norm(norm, x, valid)
    raise TypeError(f"masked_norm supports BatchNorm1d and GroupNorm(1, C), not {type(norm).__name__}.")


def _masked_batch_norm(norm: nn.BatchNorm1d, x: Tensor, valid: Tensor) -> Tensor:
    """BatchNorm over the valid frames of the whole batch (running statistics updated from them
    alone in training); in eval mode the running statistics make every frame independent."""
    if not (norm.training or norm.running_mean is None):
        return norm(x)
    frames = x.transpose(1, 2)[valid]  # (N, C): the valid frames only
    momentum = norm.momentum
    if norm.training and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as BatchNorm does
            momentum = 1.0 / float(norm.num_batches_tracked)
    normed = F.batch_norm(frames, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                          training=True, momentum=0.0 if momentum is None else momentum, eps=norm.eps)
    out = x.new_zeros(x.shape[0], x.shape[2], x.shape[1])
    out[valid] = normed.to(out.dtype)
    return out.transpose(1, 2)


def _masked_single_group_norm(norm: nn.GroupNorm, x: Tensor, valid: Tensor) -> Tensor:
    """GroupNorm(1, C): each example's mean and variance over its valid frames and all channels."""
    weight = valid[:, None, :].to(torch.float32)  # (B, 1, T)
    xf = x.float() * weight
    count = weight.sum((1, 2)).clamp(min=1.0) * x.shape[1]
    mean = xf.sum((1, 2)) / count
    centred = (x.float() - mean[:, None, None]) * weight
    var = centred.pow(2).sum((1, 2)) / count
    y = centred * torch.rsqrt(var + norm.eps)[:, None, None]
    if norm.affine:
        y = y * norm.weight[None, :, None] + norm.bias[None, :, None] * weight
    return y.to(x.dtype)
