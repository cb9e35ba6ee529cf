"""Where the tokens handed to ``contextualize`` sit on the time axis.

data2vec 2.0 runs the student on the kept tokens only and says where each one was
(``position_ids``). A Transformer's attention does not care that the kept tokens are not
contiguous, but a Conformer's depthwise convolution does: it is the Conformer's positional
scheme. So each convolution spreads the kept tokens back onto the original time grid, with
zeros in the holes (as at padded frames), convolves there, and collects the kept positions
again -- the convolution sees every kept token at its true distance from its neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from d2v.api.errors import SpecError


class TimeGrid:
    """Spread ``(B, C, T')`` token features onto a ``(B, C, L)`` grid and collect them back.

    ``position_ids`` ``(B, T')`` or ``(T',)``: each token's position, distinct within a row
    (data2vec 2.0's ``ids_keep``); ``None``: the tokens already are positions ``0..T'-1`` and
    nothing moves. ``L = max(position_ids) + 1``: holes after the last token would only hold
    zeros, which the convolution's own zero padding supplies anyway.
    """

    def __init__(self, position_ids: Tensor | None, num_tokens: int, batch_size: int, device: torch.device):
        self.index = None
        self.length = num_tokens
        if position_ids is None:
            return
        positions = position_ids.to(device=device, dtype=torch.long)
        if positions.dim() == 1:
            positions = positions[None, :].expand(batch_size, -1)
        if positions.shape[-1] != num_tokens:
            raise SpecError(f"position_ids cover {positions.shape[-1]} tokens but the encoder got {num_tokens}.")
        self.index = positions
        self.length = int(positions.max()) + 1 if positions.numel() else num_tokens

    def spread(self, x: Tensor) -> Tensor:
        """``(B, C, T')`` tokens -> ``(B, C, L)`` grid with zeros where no token sits."""
        if self.index is None:
            return x
        grid = x.new_zeros(x.shape[0], x.shape[1], self.length)
        return grid.scatter(2, self.index[:, None, :].expand(-1, x.shape[1], -1), x)

    def collect(self, grid: Tensor) -> Tensor:
        """``(B, C, L)`` grid -> ``(B, C, T')`` values at the tokens' positions."""
        if self.index is None:
            return grid
        return grid.gather(2, self.index[:, None, :].expand(-1, grid.shape[1], -1))
