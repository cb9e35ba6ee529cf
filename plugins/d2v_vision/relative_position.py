"""BEiT's relative position bias: one learned bias per head for every 2-D offset between two
patches, plus three for CLS->patch, patch->CLS and CLS->CLS (Hugging Face's
``Data2VecVisionRelativePositionBias``).

At another patch grid the table of offsets is resized bilinearly, as Hugging Face's
``interpolate_pos_encoding`` does (including its width-major reshape of the table, which
only matters for non-square grids). ``position_ids`` picks the rows and columns of the kept
tokens when a self-supervised student drops masked patches (data2vec 2.0): each kept token
keeps the bias of its original position.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@lru_cache(maxsize=16)
def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """``(N + 1, N + 1)`` indices into the bias table for an ``H x W`` grid (``N = H * W``),
    position 0 being the CLS token."""
    height, width = grid
    num_relative = (2 * height - 1) * (2 * width - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[:, :, 0] += height - 1
    relative[:, :, 1] += width - 1
    relative[:, :, 0] *= 2 * width - 1
    index = torch.zeros((height * width + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = relative.sum(-1)
    index[0, :] = num_relative - 3
    index[:, 0] = num_relative - 2
    index[0, 0] = num_relative - 1
    return index


class RelativePositionBias(nn.Module):
    """A ``((2H-1)(2W-1) + 3, heads)`` table for the grid ``window`` it was trained at."""

    def __init__(self, *, window: tuple[int, int], heads: int):
        super().__init__()
        self.window = (int(window[0]), int(window[1]))
        self.num_relative = (2 * self.window[0] - 1) * (2 * self.window[1] - 1) + 3
        self.table = nn.Parameter(torch.zeros(self.num_relative, heads))

    def resized_table(self, grid: tuple[int, int]) -> Tensor:
        """The offset table brought to ``grid`` (bilinear; the identity at the trained grid)."""
        if grid == self.window:
            return self.table
        old_h, old_w = 2 * self.window[0] - 1, 2 * self.window[1] - 1
        new_h, new_w = 2 * grid[0] - 1, 2 * grid[1] - 1
        offsets = self.table[: self.num_relative - 3]
        offsets = offsets.reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)  # HF's layout
        offsets = F.interpolate(offsets, size=(new_h, new_w), mode="bilinear")
        offsets = offsets.permute(0, 2, 3, 1).reshape(new_h * new_w, -1)
        return torch.cat([offsets, self.table[self.num_relative - 3:]])

    def forward(self, grid: tuple[int, int], position_ids: Tensor | None = None) -> Tensor:
        """``(1, heads, N+1, N+1)``, or ``(B, heads, T', T')`` for the tokens at ``position_ids`` ``(B, T')``."""
        index = relative_position_index(grid).to(self.table.device)
        bias = self.resized_table(grid)[index]  # (N+1, N+1, heads)
        if position_ids is None:
            return bias.permute(2, 0, 1).unsqueeze(0)
        picked = bias[position_ids[:, :, None], position_ids[:, None, :]]  # (B, T', T', heads)
        return picked.permute(0, 3, 1, 2)
