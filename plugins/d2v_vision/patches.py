"""The data2vec-vision feature extractor: an image cut into non-overlapping patches, each
linearly embedded (a strided Conv2d, Hugging Face's ``Data2VecVisionPatchEmbeddings``), with a
learned CLS token in front.

Positions (absolute embeddings or relative position bias) and the mask token belong to the
encoder (:mod:`d2v_vision.encoder`), so a self-supervised objective can mask the patch
embeddings before the positional scheme, exactly where Hugging Face's ``bool_masked_pos`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import ExampleInputs, FeatureExtractor, FeatureExtractorOutput


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``224`` or ``[224, 224]`` -> ``(224, 224)``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise SpecError(f"{name} must be a positive integer or a pair of them, got {value!r}.")
    return int(pair[0]), int(pair[1])


def patch_geometry(image_size: int | Sequence[int], patch_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(image size, patch grid)`` as ``(height, width)`` pairs, checked: a positive patch size
    that divides both sides."""
    size = as_pair(image_size, "image_size")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise SpecError(f"patch_size must be a positive integer, got {patch_size!r}.")
    if size[0] % patch_size or size[1] % patch_size:
        raise SpecError(f"image_size {size} is not a multiple of patch_size {patch_size}.")
    return size, (size[0] // patch_size, size[1] // patch_size)


def input_grid(inputs: Tensor, num_channels: int, patch_size: int, component: str) -> tuple[int, int]:
    """The patch grid of a batch of images ``(B, C, H, W)``, or a SpecError saying what is wrong."""
    if inputs.ndim != 4 or inputs.shape[1] != num_channels:
        raise SpecError(f"{component} expects images (batch, {num_channels}, height, width), "
                        f"got shape {tuple(inputs.shape)}.")
    height, width = inputs.shape[-2:]
    if height % patch_size or width % patch_size:
        raise SpecError(f"image size {height}x{width} is not a multiple of patch_size {patch_size}; "
                        "resize or crop the images (processor 'image': size/crop_size).")
    return height // patch_size, width // patch_size


def example_images(image_size: tuple[int, int], num_channels: int, batch_size: int, seed: int) -> ExampleInputs:
    """Random ``pixel_values`` at ``image_size``: only the batch axis is dynamic, since the
    positional schemes are resized per image size in Python, which a traced graph cannot
    follow (export one graph per image size)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, num_channels, *image_size, generator=generator)
    return ExampleInputs({"pixel_values": pixels}, {"pixel_values": {0: "batch"}})


class PatchEmbedding(FeatureExtractor):
    """Images ``(B, C, H, W)`` -> ``(B, 1 + H/p * W/p, dim)``: CLS, then the patches row-major.

    ``grid_size`` is the patch grid at ``image_size`` (the pretraining size; the data2vec
    objectives read it for 2-D masks and decoders) and ``num_extra_tokens`` = 1 (the CLS
    token, never masked). Other image sizes work when both sides are multiples of
    ``patch_size``; the encoder then resizes its positional scheme.
    """

    num_extra_tokens = 1
    #: exempt from weight decay (BEiT's no_weight_decay)
    no_weight_decay_names = ("cls_token",)

    def __init__(
        self,
        *,
        dim: int = 768,
        image_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        initializer_range: float = 0.02,
    ):
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.image_size, self.grid_size = patch_geometry(image_size, patch_size)
        self.hparams = {**hparams, "image_size": list(self.image_size)}
        self.dim = dim
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.projection = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.cls_token, std=initializer_range)

    def example_inputs(self, batch_size: int = 2, length: int | None = None, *, seed: int = 0) -> ExampleInputs:
        """Random images at ``image_size`` (``length`` is ignored: images are not padded)."""
        return example_images(self.image_size, self.num_channels, batch_size, seed)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FeatureExtractorOutput:
        grid = input_grid(inputs, self.num_channels, self.patch_size, "vision.patches")
        patches = self.projection(inputs.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return FeatureExtractorOutput(features=torch.cat([cls, patches], dim=1), encoder_context={"grid_size": grid})
