"""A Conformer encoder for d2v: torchaudio's ``Conformer`` layers, driven so that they honour
d2v's :class:`~d2v.api.interfaces.Encoder` contract.

The layers, their parameters and their state-dict names are torchaudio's
(``torchaudio.models.Conformer``, Gulati et al. 2020, arXiv 2005.08100): half-step FFN ->
self-attention -> convolution module -> half-step FFN -> LayerNorm. Its ``forward`` alone cannot
serve data2vec, so :meth:`ConformerEncoder.contextualize` runs each layer's own sub-modules in
the same order, adding what the objectives need:

* **padding**: padded frames are zeroed before the depthwise convolution and left out of its
  normalisation's statistics (:mod:`d2v_conformer.masked_norm`); torchaudio lets both leak into
  valid frames, so an utterance's output would depend on what it was batched with;
* **kept tokens** (data2vec 2.0 students): the convolution runs on the original time grid given
  by ``position_ids`` (:mod:`d2v_conformer.time_grid`), so dropping masked tokens is the same as
  treating them as padding;
* **per-layer targets**: ``"ffn"`` is the second half-step FFN's output before its residual and
  the final LayerNorm (data2vec's "FFN output before the last residual"); ``"end"`` the layer
  output; plus every layer's output for ``hidden_states``.

With no padding and no ``position_ids`` the output equals torchaudio's ``Conformer.forward``.
``embed`` has no positional scheme to apply: the convolutions are the Conformer's positions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torchaudio.models import Conformer
from torchaudio.models.conformer import ConformerLayer

from d2v.api.errors import SpecError
from d2v import Encoder, EncoderOutput
from d2v.ssl.masking import compute_span_mask

from d2v_conformer.masked_norm import masked_norm
from d2v_conformer.time_grid import TimeGrid

TARGET_FEATURES = ("ffn", "end")


def convolution_module(layer: ConformerLayer, x: Tensor, padding_mask: Tensor | None, grid: TimeGrid) -> Tensor:
    """torchaudio's ``_ConvolutionModule`` on ``x`` ``(B, T, D)`` (without its residual), with
    padded frames zeroed before the depthwise conv, the conv on ``grid``, and the norm's
    statistics over valid frames."""
    module = layer.conv_module
    pointwise_in, glu, depthwise, norm, activation, pointwise_out, dropout = module.sequential
    y = glu(pointwise_in(module.layer_norm(x).transpose(1, 2)))  # (B, C, T)
    if padding_mask is not None:
        y = y.masked_fill(padding_mask[:, None, :], 0.0)
    y = grid.collect(depthwise(grid.spread(y)))
    y = masked_norm(norm, y, None if padding_mask is None else ~padding_mask)
    return dropout(pointwise_out(activation(y))).transpose(1, 2)


def self_attention(layer: ConformerLayer, x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """The layer's pre-LN multi-head self-attention (without its residual); padded keys ignored."""
    h = layer.self_attn_layer_norm(x).transpose(0, 1)  # torchaudio's attention is (T, B, D)
    h, _ = layer.self_attn(query=h, key=h, value=h, key_padding_mask=padding_mask, need_weights=False)
    return layer.self_attn_dropout(h.transpose(0, 1))


def conformer_layer(layer: ConformerLayer, x: Tensor, padding_mask: Tensor | None, grid: TimeGrid) -> tuple[Tensor, Tensor]:
    """One Conformer layer in torchaudio's order; returns the output and the second FFN's output."""
    x = x + 0.5 * layer.ffn1(x)
    if layer.convolution_first:
        x = x + convolution_module(layer, x, padding_mask, grid)
    x = x + self_attention(layer, x, padding_mask)
    if not layer.convolution_first:
        x = x + convolution_module(layer, x, padding_mask, grid)
    ffn_out = layer.ffn2(x)
    return layer.final_layer_norm(x + 0.5 * ffn_out), ffn_out


class ConformerEncoder(Encoder):
    """A Conformer stack as a d2v encoder (defaults: Conformer (S) of the paper, 16 layers,
    144 wide, 4 heads, FFN 576, conv kernel 31 -- torchaudio needs an odd kernel).

    * ``use_group_norm``: ``GroupNorm(1, C)`` instead of ``BatchNorm1d`` after the depthwise
      conv (torchaudio's switch). Both are computed over valid frames only.
    * ``convolution_first``: the convolution module before self-attention (torchaudio's switch).
    * ``dropout``: torchaudio's one dropout (FFNs, attention weights and output, conv module);
      ``input_dropout``: on the encoder input after :meth:`embed`'s masking.
    * ``mask_time_prob``, ``mask_time_length``, ``mask_time_min_masks``: SpecAugment time masking
      with the mask embedding while fine-tuning (training mode, no explicit ``mask``), as
      ``audio.transformer`` does; ``0`` switches it off.
    """

    def __init__(
        self,
        *,
        dim: int = 144,
        layers: int = 16,
        heads: int = 4,
        ffn_dim: int = 576,
        conv_kernel: int = 31,
        dropout: float = 0.1,
        input_dropout: float = 0.1,
        use_group_norm: bool = False,
        convolution_first: bool = False,
        mask_time_prob: float = 0.05,
        mask_time_length: int = 10,
        mask_time_min_masks: int = 2,
    ):
        super().__init__()
        if dim % heads:
            raise SpecError(f"conformer: dim {dim} is not divisible by heads {heads}.")
        if conv_kernel % 2 == 0:
            raise SpecError(f"conformer: conv_kernel must be odd (torchaudio pads it to keep the length), got {conv_kernel}.")
        self.dim = dim
        self.num_layers = layers
        self.mask_time_prob = float(mask_time_prob)
        self.mask_time_length = int(mask_time_length)
        self.mask_time_min_masks = int(mask_time_min_masks)
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        self.input_dropout = nn.Dropout(input_dropout)
        self.conformer = Conformer(input_dim=dim, num_heads=heads, ffn_dim=ffn_dim, num_layers=layers,
                                   depthwise_conv_kernel_size=conv_kernel, dropout=dropout,
                                   use_group_norm=use_group_norm, convolution_first=convolution_first)

    @property
    def layers(self) -> nn.ModuleList:
        return self.conformer.conformer_layers

    def time_mask(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """SpecAugment time spans -> mask embedding (numpy draws seeded from torch's RNG)."""
        rng = np.random.default_rng(int(torch.randint(2**31, ()).item()))
        spans = compute_span_mask(x.shape[:2], self.mask_time_prob, self.mask_time_length, rng=rng,
                                  padding_mask=None if padding_mask is None else padding_mask.cpu().numpy(),
                                  min_masks=self.mask_time_min_masks, require_same_masks=False)
        spans = torch.as_tensor(spans, dtype=torch.bool, device=x.device)
        return torch.where(spans[..., None], self.mask_embedding.to(x.dtype), x)

    # -- Encoder interface ----------------------------------------------------------------

    def embed(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Mask embedding where ``mask`` is True (or SpecAugment while fine-tuning), padded
        frames zeroed, input dropout. Every frame independent of the others, so dropping
        tokens after this is exact."""
        x = features
        if mask is not None:
            x = torch.where(mask.bool()[..., None], self.mask_embedding.to(x.dtype), x)
        elif self.training and self.mask_time_prob > 0:
            x = self.time_mask(x, padding_mask)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.bool()[..., None], 0.0)
        return self.input_dropout(x)

    def contextualize(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer_targets: bool = False,
        target_feature: str = "ffn",
        position_ids: Tensor | None = None,
    ) -> EncoderOutput:
        """The Conformer layers on ``x`` ``(B, T', D)``; ``position_ids`` place the tokens on
        the time grid the convolutions run on (``None``: ``0..T'-1``)."""
        if target_feature not in TARGET_FEATURES:
            raise SpecError(f"unknown target_feature '{target_feature}'; expected one of {', '.join(TARGET_FEATURES)}.")
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            if not bool(padding_mask.any()):
                padding_mask = None
        grid = TimeGrid(position_ids, x.shape[1], x.shape[0], x.device)
        hidden_states = [x] if output_hidden_states else None
        layer_targets = [] if output_layer_targets else None
        for layer in self.layers:
            x, ffn_out = conformer_layer(layer, x, padding_mask, grid)
            if layer_targets is not None:
                layer_targets.append(ffn_out if target_feature == "ffn" else x)
            if hidden_states is not None:
                hidden_states.append(x)
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            layer_targets=None if layer_targets is None else tuple(layer_targets),
            padding_mask=padding_mask,
        )
