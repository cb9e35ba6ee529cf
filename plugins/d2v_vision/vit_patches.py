"""data2vec 2.0's image feature extractor (fairseq ``ImageEncoder``'s local encoder, fixed
positions and extra token): a strided Conv2d patch embedding (timm ``PatchEmbed``), fixed 2-D
sin-cos positions added to the patches, then learned extra tokens (the CLS) put in front.

The positions belong here, not to the encoder, because fairseq adds them *before* masking and
before the extra token is prepended: the encoder then only normalises and contextualises, and a
masked patch (``mask_embedding`` in the encoder) replaces patch + position, as fairseq's
``encoder_zero_mask`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import ExampleInputs, FeatureExtractor, FeatureExtractorOutput
from d2v_vision.patches import example_images, input_grid, patch_geometry
from d2v_vision.sincos import sincos_2d


class ViTPatchEmbedding(FeatureExtractor):
    """Images ``(B, C, H, W)`` -> ``(B, E + H/p * W/p, dim)``: ``E = num_extra_tokens`` learned
    tokens, then ``patch + position`` row-major.

    ``patch_dim``: width of the patch embedding when it differs from ``dim`` (fairseq's
    modality ``embed_dim``; a Linear then projects to ``dim``). ``positions`` is a saved buffer
    (fairseq saves it too) holding the sin-cos code of the ``image_size`` grid; other grids
    (any image size that is a multiple of ``patch_size``) get the same formula on the fly.
    ``init_extra_token_zero``: start the extra tokens at 0 (else N(0, 1), the image recipes).
    """

    def __init__(
        self,
        *,
        dim: int = 768,
        image_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        patch_dim: int | None = None,
        num_extra_tokens: int = 1,
        init_extra_token_zero: bool = False,
    ):
        super().__init__()
        self.image_size, self.grid_size = patch_geometry(image_size, patch_size)
        if num_extra_tokens < 0:
            raise SpecError(f"num_extra_tokens must be >= 0, got {num_extra_tokens}.")
        self.dim = dim
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.num_extra_tokens = int(num_extra_tokens)
        width = patch_dim or dim
        self.projection = nn.Conv2d(num_channels, width, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.projection.weight.data.view(width, -1))  # fairseq: as a Linear
        self.patch_projection = nn.Linear(width, dim) if width != dim else None
        self.register_buffer("positions", sincos_2d(dim, self.grid_size)[None])
        self.extra_tokens = None
        if self.num_extra_tokens:
            self.extra_tokens = nn.Parameter(torch.zeros(1, self.num_extra_tokens, dim))
            if not init_extra_token_zero:
                nn.init.normal_(self.extra_tokens)
            elif self.num_extra_tokens > 1:
                nn.init.normal_(self.extra_tokens.data[:, 1:])

    def positions_for(self, grid: tuple[int, int]) -> Tensor:
        """``(1, H*W, dim)`` positions of ``grid`` (the saved table at the trained grid)."""
        if grid == self.grid_size:
            return self.positions
        return sincos_2d(self.dim, grid)[None].to(self.positions)

    def example_inputs(self, batch_size: int = 2, length: int | None = None, *, seed: int = 0) -> ExampleInputs:
        """Random images at ``image_size`` (``length`` is ignored: images are not padded)."""
        return example_images(self.image_size, self.num_channels, batch_size, seed)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FeatureExtractorOutput:
        grid = input_grid(inputs, self.num_channels, self.patch_size, "vision.vit")
        x = self.projection(inputs.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        if self.patch_projection is not None:
            x = self.patch_projection(x)
        x = x + self.positions_for(grid).to(x.dtype)
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return FeatureExtractorOutput(features=x)
