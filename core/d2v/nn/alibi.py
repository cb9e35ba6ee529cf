"""ALiBi attention biases (Press et al. 2022, "Train Short, Test Long"), as data2vec 2.0 uses them.

Why a shared module: data2vec 2.0 adds ``slope_h * -distance(i, j)`` to the attention logits
of head ``h`` -- 1-D distances for audio (on top of the conv positional encoder), 2-D
Manhattan distances over the patch grid in some vision configs -- and the slopes follow one
rule whatever the modality. Encoders call these pure functions with the *positions* of their
tokens, so a student that runs on kept tokens only gets the bias of the full sequence gathered
at the kept positions (fairseq's ``masked_alibi``) without building the full ``T x T`` bias.

Slopes (fairseq ``get_alibi``, the paper's rule): for ``n`` a power of two, the geometric
sequence ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``; otherwise the slopes of the largest power of two
``p < n`` followed by every other slope of ``2p`` (the first ``n - p`` of them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from d2v.api.errors import SpecError

__all__ = ["alibi_slopes", "alibi_bias_1d", "alibi_bias_2d"]


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(heads: int) -> Tensor:
    """The ``(heads,)`` slopes (float32): 8 heads give 1/2, 1/4, ..., 1/256."""
    if heads < 1:
        raise SpecError(f"ALiBi needs at least one attention head, got {heads}.")
    if math.log2(heads).is_integer():
        values = _power_of_two_slopes(heads)
    else:
        below = 2 ** math.floor(math.log2(heads))
        values = _power_of_two_slopes(below) + _power_of_two_slopes(2 * below)[0::2][: heads - below]
    return torch.tensor(values, dtype=torch.float32)


def _distance_bias(distance: Tensor, slopes: Tensor) -> Tensor:
    """``(..., T, T)`` distances and ``(H,)`` slopes -> ``(..., H, T, T)`` biases ``-slope * distance``."""
    slopes = slopes.to(device=distance.device, dtype=torch.float32)
    return -distance.unsqueeze(-3) * slopes.view(-1, 1, 1)


def alibi_bias_1d(positions: Tensor, slopes: Tensor) -> Tensor:
    """Biases ``slope_h * -|p_i - p_j|`` for token positions ``positions`` ``(T,)`` or ``(B, T)``
    (integers; e.g. ``arange(T)``, or the kept positions of a masked student).

    Returns float32 ``(H, T, T)`` or ``(B, H, T, T)``.
    """
    p = positions.to(torch.float32)
    distance = (p.unsqueeze(-1) - p.unsqueeze(-2)).abs()
    return _distance_bias(distance, slopes)


def alibi_bias_2d(positions: Tensor, slopes: Tensor, width: int) -> Tensor:
    """2-D ALiBi over a row-major patch grid ``width`` patches wide: biases
    ``slope_h * -(|row_i - row_j| + |col_i - col_j|)`` (fairseq's ``dims=2, distance="manhattan"``).

    ``positions`` ``(T,)`` or ``(B, T)`` are flat patch indices; returns float32 ``(H, T, T)`` or ``(B, H, T, T)``.
    """
    if width < 1:
        raise SpecError(f"2-D ALiBi needs a positive grid width, got {width}.")
    p = positions.long()
    rows, cols = (p // width).to(torch.float32), (p % width).to(torch.float32)
    distance = (rows.unsqueeze(-1) - rows.unsqueeze(-2)).abs() + (cols.unsqueeze(-1) - cols.unsqueeze(-2)).abs()
    return _distance_bias(distance, slopes)
