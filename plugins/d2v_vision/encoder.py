"""The data2vec-vision Transformer encoder (Hugging Face ``Data2VecVisionEncoder`` + the
model's final LayerNorm and pooler; BEiT's ``VisionTransformer`` blocks).

Built bottom-up::

    d2v.nn.block.TransformerBlock (pre-LN, layer scale, drop-path, BEiT's names)
    RelativePositionBias (per block or shared)                -> VisionTransformerEncoder

``embed`` = mask embedding where ``mask`` is True -> absolute position embeddings (if used,
resized to the batch's patch grid) -> dropout. ``contextualize`` = the blocks (relative bias
for the tokens' original positions) -> final LayerNorm (CLS pooling) -> ``pooler_output``
(mean of the patch tokens + LayerNorm, or the CLS token).

The patch grid of a batch comes from the feature extractor (``grid_size``, passed on by
``TaskModel``), so images of any size and aspect ratio run; called without it (e.g. by the
self-supervised objectives, at the pretraining size) it is read from the token count: the
``image_size`` grid when the counts agree, else a square grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import AttentionNames, BlockNames, Encoder, EncoderOutput, TransformerBlock, run_layer
from d2v_vision.patches import as_pair
from d2v_vision.relative_position import RelativePositionBias

TARGET_FEATURES = ("ffn", "end")


#: BEiT's names (``norm1``, ``attention.{query,key,value,proj}`` with no key bias, ``mlp``, ``lambda_1/2``)
BLOCK_NAMES = BlockNames(attention_norm="norm1", ffn="mlp", ffn_norm="norm2",
                         projections=AttentionNames(query="query", key="key", value="value", output="proj",
                                                    key_bias=False),
                         order=("attention_norm", "attention", "ffn_norm", "ffn"))


class VisionTransformerEncoder(Encoder):
    """data2vec-vision's encoder (defaults: Hugging Face ``Data2VecVisionConfig``, ViT-B/16).

    Positional schemes (any combination, as Hugging Face): ``use_absolute_position_embeddings``,
    ``use_relative_position_bias`` (a table per block), ``use_shared_relative_position_bias``
    (one table for all blocks, the data2vec pretraining setting). ``use_mean_pooling``: the
    pooler averages the patch tokens and LayerNorms them (else: no final LayerNorm skip; the
    final LayerNorm runs and the pooler takes the CLS token). ``add_pooling_layer=False``
    returns no ``pooler_output`` (Hugging Face's bare ``Data2VecVisionModel``).
    ``drop_path_rate`` grows linearly from 0 over the blocks.
    """

    #: with the head for layer-wise lr decay (BEiT's layer ids: final norms and the shared table on top)
    top_parameters = ("norm", "pooler_norm", "relative_position_bias")
    #: exempt from weight decay (BEiT: positions and relative-bias tables)
    no_weight_decay_names = ("position_embeddings", "table", "mask_embedding")

    def __init__(
        self,
        *,
        dim: int = 768,
        layers: int = 12,
        heads: int = 12,
        ffn_dim: int = 3072,
        activation: str = "gelu",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-12,
        image_size: int | list[int] = 224,
        patch_size: int = 16,
        use_absolute_position_embeddings: bool = False,
        use_relative_position_bias: bool = False,
        use_shared_relative_position_bias: bool = False,
        layer_scale_init_value: float = 0.1,
        use_mean_pooling: bool = True,
        add_pooling_layer: bool = True,
        initializer_range: float = 0.02,
    ):
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        image = as_pair(image_size, "image_size")
        self.hparams = {**hparams, "image_size": list(image)}
        self.dim = dim
        self.num_layers = layers
        self.window = (image[0] // patch_size, image[1] // patch_size)
        self.use_mean_pooling = bool(use_mean_pooling)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.position_embeddings = None
        if use_absolute_position_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, self.window[0] * self.window[1] + 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.relative_position_bias = None
        if use_shared_relative_position_bias:
            self.relative_position_bias = RelativePositionBias(window=self.window, heads=heads)
        rates = torch.linspace(0, drop_path_rate, layers).tolist() if layers else []
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, ffn_dim, activation, layer_norm_first=True, eps=layer_norm_eps,
                             attention_dropout=attention_dropout, dropout=dropout, ffn_output_dropout=dropout,
                             ffn_residual_dropout=0.0, drop_path=rates[i], layer_scale_init=layer_scale_init_value,
                             names=BLOCK_NAMES,
                             position_bias=(RelativePositionBias(window=self.window, heads=heads)
                                            if use_relative_position_bias else None))
            for i in range(layers)
        )
        self.norm = nn.Identity() if self.use_mean_pooling else nn.LayerNorm(dim, eps=layer_norm_eps)
        self.pooler_norm = None
        if add_pooling_layer and self.use_mean_pooling:
            self.pooler_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.add_pooling_layer = bool(add_pooling_layer)
        self._init_weights(initializer_range)

    def _init_weights(self, std: float) -> None:
        """BEiT's init: truncated normal linears, zero biases (tables and embeddings start at 0)."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.position_embeddings is not None:
            trunc_normal_(self.position_embeddings, std=std)
        trunc_normal_(self.mask_embedding, std=std)

    # -- the patch grid ---------------------------------------------------------------------

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """The ``(H, W)`` patch grid of a sequence of ``num_tokens`` (CLS included)."""
        patches = num_tokens - 1
        if patches == self.window[0] * self.window[1]:
            return self.window
        side = math.isqrt(max(patches, 0))
        if side * side == patches and patches > 0:
            return side, side
        raise SpecError(
            f"vision.transformer: {patches} patches form neither the {self.window[0]}x{self.window[1]} grid of "
            f"image_size nor a square grid; set model.encoder.image_size (and the feature extractor's) to the "
            f"image size you feed."
        )

    def resized_position_embeddings(self, grid: tuple[int, int]) -> Tensor:
        """Absolute position embeddings for ``grid`` (bicubic resize of the patch part, HF's
        ``interpolate_pos_encoding``; unchanged at the trained grid)."""
        table = self.position_embeddings
        if grid == self.window:
            return table
        cls, patches = table[:, :1], table[:, 1:]
        side = math.isqrt(patches.shape[1])
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    # -- Encoder interface ------------------------------------------------------------------

    def forward(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None, *,
                grid_size: tuple[int, int] | None = None, **kwargs) -> EncoderOutput:
        """:meth:`embed` then :meth:`contextualize` on the patch grid ``grid_size`` (from the
        feature extractor; any aspect ratio)."""
        x = self.embed(features, padding_mask, mask, grid_size=grid_size)
        return self.contextualize(x, padding_mask, grid_size=grid_size, **kwargs)

    def embed(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None, *,
              grid_size: tuple[int, int] | None = None) -> Tensor:
        x = features
        if mask is not None:
            x = torch.where(mask.bool()[..., None], self.mask_embedding.to(x.dtype), x)
        if self.position_embeddings is not None:
            grid = tuple(grid_size) if grid_size is not None else self.grid_for(x.shape[1])
            x = x + self.resized_position_embeddings(grid).to(x.dtype)
        return self.dropout(x)

    def contextualize(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer_targets: bool = False,
        target_feature: str = "ffn",
        position_ids: Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> EncoderOutput:
        if target_feature not in TARGET_FEATURES:
            raise SpecError(f"unknown target_feature '{target_feature}'; expected one of {', '.join(TARGET_FEATURES)}.")
        # the grid is the full image's: with position_ids, x holds only some of its tokens
        if grid_size is not None:
            grid = (int(grid_size[0]), int(grid_size[1]))
        else:
            grid = self.grid_for(x.shape[1] if position_ids is None else self._full_tokens(position_ids))
        bias = None
        if padding_mask is not None and bool(padding_mask.any()):
            bias = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(padding_mask.bool(), float("-inf"))[:, None, None, :]
        shared = None
        if self.relative_position_bias is not None:
            shared = self.relative_position_bias(grid, position_ids)
            bias = shared if bias is None else bias + shared
        hidden_states = [x] if output_hidden_states else None
        layer_targets = [] if output_layer_targets else None
        for layer in self.layers:
            x, ffn = run_layer(self, layer, x, bias, position=(grid, position_ids))
            if hidden_states is not None:
                hidden_states.append(x)
            if layer_targets is not None:
                layer_targets.append(ffn if target_feature == "ffn" else x)
        x = self.norm(x)
        pooled = None
        if self.add_pooling_layer:
            pooled = self.pooler_norm(x[:, 1:].mean(1)) if self.pooler_norm is not None else x[:, 0]
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            layer_targets=None if layer_targets is None else tuple(layer_targets),
            padding_mask=padding_mask,
            pooler_output=pooled,
        )

    def _full_tokens(self, position_ids: Tensor) -> int:
        """Tokens of the full image when only ``position_ids`` are kept: the trained grid
        (self-supervised objectives drop tokens at the pretraining size)."""
        return self.window[0] * self.window[1] + 1
