"""data2vec 2.0's light convolutional decoders.

The student encodes only its kept tokens; the objective puts them back in place with small
Gaussian noise vectors at the masked positions, and one of these decoders predicts the
teacher's targets at every position from that sequence (the loss then reads the masked
positions only). Each layer is ``Conv (kernel k, groups g) -> same padding -> LayerNorm without
affine -> GELU``, with a residual connection between layers of equal width, followed by a
linear projection back to the encoder width (data2vec 2.0 paper §3, fairseq ``Decoder1d`` /
``Decoder2d``).

Released configurations (REFERENCE.md §2.1.4): audio base ``dim 384, kernel 7, layers 4,
groups 16``; images base ``768, 3, 6, 16``; text ``768, 9, 5, 1``, no residual and a two-layer
projection (``projection_layers 2``: Linear(dim -> 2 dim) -> GELU -> Linear(-> D)).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from d2v.api.errors import SpecError


def _check(dim: int, kernel: int, layers: int, groups: int, input_dim: int, projection_layers: int) -> None:
    if layers < 1 or kernel < 1 or dim < 1:
        raise SpecError(f"decoder: dim, kernel and layers must be >= 1, got dim={dim}, kernel={kernel}, layers={layers}.")
    for width in (input_dim, dim):
        if width % groups:
            raise SpecError(f"decoder: groups={groups} must divide both the encoder width {input_dim} and decoder dim {dim}.")
    if projection_layers < 1:
        raise SpecError(f"decoder: projection_layers must be >= 1, got {projection_layers}.")


def _projection(dim: int, out_dim: int, layers: int, ratio: float) -> nn.Module:
    """``layers`` Linear layers with GELU between them; the first widens by ``ratio``."""
    if layers == 1:
        return nn.Linear(dim, out_dim)
    modules: list[nn.Module] = []
    width = dim
    for i in range(layers - 1):
        wider = int(width * ratio) if i == 0 else width
        modules += [nn.Linear(width, wider), nn.GELU()]
        width = wider
    modules.append(nn.Linear(width, out_dim))
    return nn.Sequential(*modules)


class ChannelLayerNorm(nn.Module):
    """Parameter-less LayerNorm over dimension 1 of ``(B, C, ...)``."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x.movedim(-1, 1)


class ConvBlock1d(nn.Module):
    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, dim, kernel_size=kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0  # "same" length for even kernels
        self.norm = ChannelLayerNorm()
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T)
        x = self.conv(x)
        if self.trim:
            x = x[..., : -self.trim]
        return self.act(self.norm(x))


class ConvBlock2d(nn.Module):
    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0
        self.norm = ChannelLayerNorm()
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        x = self.conv(x)
        if self.trim:
            x = x[..., : -self.trim, : -self.trim]
        return self.act(self.norm(x))


class Decoder1d(nn.Module):
    """``(B, T, input_dim)`` -> ``(B, T, input_dim)`` with 1-D convolutions over time."""

    def __init__(
        self,
        input_dim: int,
        *,
        dim: int = 384,
        kernel: int = 7,
        layers: int = 4,
        groups: int = 16,
        residual: bool = True,
        projection_layers: int = 1,
        projection_ratio: float = 2.0,
    ):
        super().__init__()
        _check(dim, kernel, layers, groups, input_dim, projection_layers)
        self.residual = residual
        self.blocks = nn.ModuleList(
            ConvBlock1d(input_dim if i == 0 else dim, dim, kernel, groups) for i in range(layers)
        )
        self.proj = _projection(dim, input_dim, projection_layers, projection_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for block in self.blocks:
            y = block(x)
            x = y + x if self.residual and y.shape == x.shape else y
        return self.proj(x.transpose(1, 2))


class Decoder2d(nn.Module):
    """``(B, H*W, input_dim)`` (row-major patches) -> same shape, with 2-D convolutions."""

    def __init__(
        self,
        input_dim: int,
        *,
        grid: tuple[int, int],
        dim: int = 768,
        kernel: int = 3,
        layers: int = 6,
        groups: int = 16,
        residual: bool = True,
        projection_layers: int = 1,
        projection_ratio: float = 2.0,
    ):
        super().__init__()
        _check(dim, kernel, layers, groups, input_dim, projection_layers)
        self.grid = (int(grid[0]), int(grid[1]))
        self.residual = residual
        self.blocks = nn.ModuleList(
            ConvBlock2d(input_dim if i == 0 else dim, dim, kernel, groups) for i in range(layers)
        )
        self.proj = _projection(dim, input_dim, projection_layers, projection_ratio)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h, w = self.grid
        if h * w != t:
            raise ValueError(f"Decoder2d: {t} tokens do not form the {h}x{w} patch grid")
        x = x.transpose(1, 2).reshape(b, c, h, w)
        for block in self.blocks:
            y = block(x)
            x = y + x if self.residual and y.shape == x.shape else y
        x = x.reshape(b, x.shape[1], t).transpose(1, 2)
        return self.proj(x)


def make_decoder(kind: str, input_dim: int, *, grid: tuple[int, int] | None = None, **options) -> nn.Module:
    """Build ``Decoder1d`` (``kind="1d"``) or ``Decoder2d`` (``kind="2d"``, needs ``grid``)."""
    if kind == "1d":
        return Decoder1d(input_dim, **options)
    if kind == "2d":
        if grid is None:
            raise SpecError("decoder '2d' needs the patch grid (H, W); the feature extractor should expose `grid_size`.")
        return Decoder2d(input_dim, grid=grid, **options)
    raise SpecError(f"unknown decoder type {kind!r}; choose '1d' (audio, text) or '2d' (images).")
