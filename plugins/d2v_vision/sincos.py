"""Fixed 2-D sine-cosine patch positions (MAE; data2vec 2.0's image encoder adds them to the
patch embeddings and never trains them).

For the patch in row ``i``, column ``j`` of the grid (row-major order), the first half of the
``dim`` channels encodes the column ``j`` and the second half the row ``i`` (MAE's
``get_2d_sincos_pos_embed`` meshes ``(w, h)``: "here w goes first"), each as the 1-D code::

    code(p)[k]       = sin(p * omega_k)     k < d/4
    code(p)[k + d/4] = cos(p * omega_k)     omega_k = 10000 ** (-k / (d/4))

Computed in float64 (as MAE's numpy), returned as float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from d2v.api.errors import SpecError


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``(M,)`` positions -> ``(M, dim)`` sines then cosines (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """``(H * W, dim)`` positions of an ``H x W`` patch grid, row-major."""
    if dim % 4:
        raise SpecError(f"2-D sin-cos positions need a width divisible by 4, got {dim}.")
    height, width = int(grid[0]), int(grid[1])
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()
