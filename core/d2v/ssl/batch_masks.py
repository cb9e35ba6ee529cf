"""Masks drawn in the data-loader workers, before the model sees a batch.

data2vec 2.0 (and d2v's 1.0) draw each batch's masks from a masking component in the loader
workers, seeded from the batch's example ids, so a batch gets the same mask whichever process,
worker or position in the run it lands at. What that needs lives here, shared by both
objectives: the feature lengths a raw input will have (picklable, for the workers), the draw
itself, and the batch transform that adds ``precomputed_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["ConvFrameLengths", "Data2Vec2Masks", "SameLength", "frame_lengths_fn", "mask_seed", "sample_masks"]


def sample_masks(
    masking: Any,
    rows: int,
    length: int,
    padding_mask: Tensor | None = None,
    *,
    rng: Any = None,
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """``(rows, length)`` bool masks (True = masked) from a masking component.

    ``grid=(H, W)`` asks 2-D generators for ``(rows, H, W)`` masks (images) and flattens them
    row-major. ``padding_mask`` ``(rows, length)`` marks positions the generator must not mask.
    """
    pad = None if padding_mask is None else padding_mask.detach().cpu().bool()
    if pad is not None and not bool(pad.any()):
        pad = None
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != length:
            raise ValueError(f"patch grid {h}x{w} does not have {length} positions")
        mask = masking((rows, h, w), padding_mask=None if pad is None else pad.view(rows, h, w), rng=rng)
    else:
        mask = masking((rows, length), padding_mask=pad, rng=rng)
    return torch.as_tensor(mask, dtype=torch.bool).reshape(rows, length)


def mask_seed() -> int:
    """A numpy seed drawn from torch's RNG, so ``torch.manual_seed`` (and the data loader's
    per-worker seeding) makes the masks reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class ConvFrameLengths:
    """Input lengths -> output lengths of a stack of unpadded strided convs
    (``floor((L - kernel) / stride) + 1`` per layer). Plain and small, so it pickles into
    data-loader workers."""

    def __init__(self, kernels: Sequence[int], strides: Sequence[int]):
        self.kernels = tuple(int(k) for k in kernels)
        self.strides = tuple(int(s) for s in strides)

    def __call__(self, lengths: Tensor) -> Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        for kernel, stride in zip(self.kernels, self.strides):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def __repr__(self) -> str:
        return f"ConvFrameLengths(kernels={self.kernels}, strides={self.strides})"


class SameLength:
    """One feature per input position (e.g. text tokens)."""

    def __call__(self, lengths: Tensor) -> Tensor:
        return torch.as_tensor(lengths, dtype=torch.long)


def frame_lengths_fn(feature_extractor: nn.Module) -> Callable[[Tensor], Tensor]:
    """A picklable ``lengths -> feature lengths`` function for ``feature_extractor``."""
    custom = getattr(feature_extractor, "frame_lengths_fn", None)
    if callable(custom):
        return custom()
    kernels, strides = getattr(feature_extractor, "conv_kernel", None), getattr(feature_extractor, "conv_stride", None)
    if kernels is not None and strides is not None:
        return ConvFrameLengths(kernels, strides)
    return SameLength()


# --------------------------------------------------------------------------- batch transform


class Data2Vec2Masks:
    """Batch transform run in the data-loader workers: adds ``precomputed_mask`` ``(B, M, T)``
    (bool, True = masked) -- ``M`` masks per example over its feature-rate grid, each with the
    same number of masked positions (padding never masked), ready for :func:`keep_indices`.

    Random draws come from torch's RNG (seeded per worker by the data loader).
    """

    def __init__(
        self,
        masking: Any,
        clone_batch: int,
        lengths_fn: Callable[[Tensor], Tensor],
        grid: tuple[int, int] | None = None,
    ):
        self.masking = masking
        self.clone_batch = int(clone_batch)
        self.lengths_fn = lengths_fn
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    def frame_padding(self, inputs: Tensor, padding_mask: Tensor | None) -> tuple[int, Tensor | None]:
        """Number of feature positions ``T`` of the batch and the ``(B, T)`` padding mask there."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1], None
        length = int(self.lengths_fn(torch.tensor([inputs.shape[1]]))[0])
        if padding_mask is None or not bool(padding_mask.any()):
            return length, None
        valid = self.lengths_fn((~padding_mask.bool()).sum(-1)).clamp(min=1)
        return length, torch.arange(length)[None, :] >= valid[:, None]

    def __call__(self, batch: dict[str, Any], rng: Any = None) -> dict[str, Any]:
        """``rng``: a numpy generator for the masks (the loader's ``Collate`` passes one seeded
        by seed, epoch and the batch's ids, so a resumed run draws the same masks); without it,
        a seed drawn from torch's RNG."""
        inputs = batch["inputs"]
        length, pad = self.frame_padding(inputs, batch.get("padding_mask"))
        B, M = inputs.shape[0], self.clone_batch
        rows_pad = None if pad is None else pad.repeat_interleave(M, 0)
        mask = sample_masks(self.masking, B * M, length, rows_pad, rng=mask_seed() if rng is None else rng,
                            grid=self.grid)
        out = dict(batch)
        out["precomputed_mask"] = mask.view(B, M, length)
        return out

    def __repr__(self) -> str:
        return f"Data2Vec2Masks({self.masking!r}, clone_batch={self.clone_batch}, lengths_fn={self.lengths_fn!r})"


# --------------------------------------------------------------------------- decoder input
