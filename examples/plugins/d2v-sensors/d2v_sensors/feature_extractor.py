"""Sensor patches: multichannel time series ``(B, S, C)`` -> a sequence of patch vectors ``(B, T, dim)``.

Non-overlapping windows of ``patch_size`` samples (all channels together) are embedded by one
strided 1-D convolution -- a ViT patch embedding along time -- followed by a LayerNorm and GELU,
then a LayerNorm over the conv width, a linear projection to the encoder width and dropout
(the same tail as data2vec-audio's feature encoder). ``T = floor(S / patch_size)``: samples after
the last whole patch are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.ssl.batch_masks import ConvFrameLengths
from d2v.api.errors import SpecError
from d2v import FeatureExtractor, FeatureExtractorOutput


class SensorPatchEmbedding(FeatureExtractor):
    """``inputs`` ``(B, S, channels)``, ``padding_mask`` ``(B, S)`` -> features ``(B, S // patch_size, dim)``
    and the padding mask at patch rate (a patch is padding once any of its samples is, except that
    every recording keeps its first patch).

    ``extract_features`` is the LayerNormed conv output before the projection.
    """

    def __init__(self, *, channels: int = 3, patch_size: int = 10, conv_dim: int = 64, dim: int = 768,
                 dropout: float = 0.0, layer_norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("channels", channels), ("patch_size", patch_size), ("conv_dim", conv_dim), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"sensors.patches: {name} must be a positive integer, got {value!r}.")
        self.channels = channels
        self.patch_size = patch_size
        self.dim = dim
        self.patch = nn.Conv1d(channels, conv_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(conv_dim, eps=layer_norm_eps)
        self.activation = nn.GELU()
        self.norm = nn.LayerNorm(conv_dim, eps=layer_norm_eps)
        self.proj = nn.Linear(conv_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def frame_lengths_fn(self) -> ConvFrameLengths:
        """Recording lengths -> patch counts; read by data2vec 2.0's mask precomputation in the
        loader workers and by the runner's check that every recording yields a patch."""
        return ConvFrameLengths([self.patch_size], [self.patch_size])

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return self.frame_lengths_fn()(lengths)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FeatureExtractorOutput:
        if inputs.dim() != 3 or inputs.shape[-1] != self.channels:
            raise SpecError(f"sensors.patches expects inputs (batch, time, {self.channels} channels), got "
                            f"{tuple(inputs.shape)}; use the 'sensors' processor with channels: {self.channels}.")
        if inputs.shape[1] < self.patch_size:
            raise SpecError(f"sensors.patches: recordings of {inputs.shape[1]} samples are shorter than one "
                            f"patch ({self.patch_size}); lower patch_size or drop short recordings (min_samples).")
        x = self.patch(inputs.transpose(1, 2)).transpose(1, 2)  # (B, T, conv_dim)
        x = self.activation(self.patch_norm(x))
        patch_mask = None
        if padding_mask is not None:
            valid = self.output_lengths((~padding_mask.bool()).sum(-1)).clamp(min=1)
            patch_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= valid[:, None]
        normed = self.norm(x)
        return FeatureExtractorOutput(features=self.dropout(self.proj(normed)), padding_mask=patch_mask,
                                      extract_features=normed)
