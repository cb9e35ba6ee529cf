"""The one Transformer block every built-in encoder stacks: post-LN (data2vec audio and text,
fairseq's and Hugging Face's BERT-style layers, data2vec 2.0's default ``AltBlock``) or pre-LN
(BEiT / data2vec-vision, 2.0 with ``layer_norm_first``), with layer scale, drop-path, a
per-block relative position bias, cross-attention and ALiBi (an additive ``attn_mask``) as
options rather than as copies.

Sub-module names are a parameter (:class:`BlockNames`) for the reason
:mod:`d2v.nn.attention` gives: they are the weight names checkpoints use.

Returns ``(output, ffn)``: ``ffn`` is the feed-forward output before the residual (and before
the residual dropout and layer scale), data2vec's per-layer target feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.nn.attention import AttentionNames, MultiHeadAttention
from d2v.nn.layers import FeedForward
from d2v.nn.packing import PackedBatch


@dataclass(frozen=True)
class BlockNames:
    """What a block's parts are called (defaults: fairseq/Hugging Face speech and text layers)."""

    attention: str = "attention"
    attention_norm: str = "attention_norm"
    ffn: str = "ffn"
    ffn_norm: str = "ffn_norm"
    cross_attention: str = "cross_attention"
    cross_attention_norm: str = "cross_attention_norm"
    layer_scale: tuple[str, str] = ("lambda_1", "lambda_2")
    projections: AttentionNames = field(default_factory=AttentionNames)
    #: the order the parts are registered in: the order of a checkpoint's keys and of the
    #: optimizer's parameters, so it is part of the layout too
    order: tuple[str, ...] = ("attention", "attention_norm", "cross_attention", "cross_attention_norm",
                              "ffn", "ffn_norm")


class TransformerBlock(nn.Module):
    """One Transformer block.

    Post-LN: ``x = LN(x + dp(drop(attn(x))))`` [``x = LN(x + drop(cross(x, memory)))``],
    ``y = LN(x + dp(ffn_drop(ffn(x))))``. Pre-LN: ``x = x + dp(ls1 * drop(attn(LN(x))))``,
    ``y = r + dp(ls2 * ffn_drop(ffn(LN(x))))`` with ``r = x``, or ``r = ffn(LN(x))`` when
    ``mlp_residual=False`` (what fairseq's pre-LN ``AltBlock`` computes, so checkpoints it trained
    compute what they learned).

    Dropouts: ``attention_dropout`` on the attention probabilities; ``dropout`` on the attention
    output; ``activation_dropout`` after the FFN activation; ``ffn_output_dropout`` after its
    second linear (part of the target feature, as timm's ``Mlp``); ``ffn_residual_dropout`` on
    the FFN output before the residual (default ``dropout``). ``drop_path``: stochastic depth of
    both branches. ``layer_scale_init > 0``: learned per-channel scales of both branches.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        activation: str = "gelu",
        *,
        layer_norm_first: bool = False,
        eps: float = 1e-5,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        activation_dropout: float = 0.0,
        ffn_output_dropout: float = 0.0,
        ffn_residual_dropout: float | None = None,
        drop_path: float = 0.0,
        layer_scale_init: float = 0.0,
        mlp_residual: bool = True,
        cross_attention: bool = False,
        position_bias: nn.Module | None = None,
        names: BlockNames = BlockNames(),
    ):
        super().__init__()
        if not mlp_residual and not layer_norm_first:
            raise SpecError("mlp_residual: false exists only for pre-LN blocks (layer_norm_first: true), where "
                            "fairseq's AltBlock drops that residual; its post-LN block keeps it.")
        if cross_attention and layer_norm_first:
            raise SpecError("cross-attention is built for post-LN blocks (Hugging Face's text decoder) only.")
        self.names = names
        self.layer_norm_first = bool(layer_norm_first)
        self.mlp_residual = bool(mlp_residual)
        self.has_cross_attention = bool(cross_attention)
        parts = {
            "attention_norm": nn.LayerNorm(dim, eps=eps),
            "attention": MultiHeadAttention(dim, heads, attention_dropout, names=names.projections,
                                            position_bias=position_bias),
            "ffn_norm": nn.LayerNorm(dim, eps=eps),
            "ffn": FeedForward(dim, ffn_dim, activation, activation_dropout, ffn_output_dropout),
        }
        if cross_attention:
            parts["cross_attention"] = MultiHeadAttention(dim, heads, attention_dropout, cross=True,
                                                          names=names.projections)
            parts["cross_attention_norm"] = nn.LayerNorm(dim, eps=eps)
        for role in names.order:
            if role in parts:
                self.add_module(getattr(names, role), parts.pop(role))
        if parts:
            raise ValueError(f"BlockNames.order leaves out {sorted(parts)}.")
        self.dropout = nn.Dropout(dropout)
        self.ffn_residual_dropout = nn.Dropout(dropout if ffn_residual_dropout is None else ffn_residual_dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.has_layer_scale = layer_scale_init > 0
        if self.has_layer_scale:
            for name in names.layer_scale:
                self.register_parameter(name, nn.Parameter(torch.full((dim,), float(layer_scale_init))))

    def part(self, role: str) -> nn.Module:
        """The sub-module playing ``role`` (a :class:`BlockNames` field), whatever it is called."""
        return getattr(self, getattr(self.names, role))

    def _scaled(self, branch: int, x: Tensor) -> Tensor:
        return getattr(self, self.names.layer_scale[branch]) * x if self.has_layer_scale else x

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        *,
        position: tuple = (),
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: Any = None,
        layer: int = 0,
        packed: PackedBatch | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``attn_mask``: bool (True where a key may be attended) or float logits to add (ALiBi,
        a shared relative position bias). ``position``: arguments of the position-bias module.
        ``memory``/``memory_mask``/``cache``/``layer``: cross-attention and incremental decoding.
        ``packed``: ``x`` holds a padded batch's real tokens only (:mod:`d2v.nn.packing`)."""
        attention, ffn_module = self.part("attention"), self.part("ffn")
        norm1, norm2 = self.part("attention_norm"), self.part("ffn_norm")
        if self.layer_norm_first:
            attended = attention(norm1(x), attn_mask, cache=cache, layer=layer, position=position, packed=packed)
            x = x + self.drop_path(self._scaled(0, self.dropout(attended)))
            ffn = ffn_module(norm2(x))
            residual = x if self.mlp_residual else ffn
            return residual + self.drop_path(self._scaled(1, self.ffn_residual_dropout(ffn))), ffn
        attended = attention(x, attn_mask, cache=cache, layer=layer, position=position, packed=packed)
        x = norm1(x + self.drop_path(self._scaled(0, self.dropout(attended))))
        if memory is not None:
            if not self.has_cross_attention:
                raise SpecError("memory (encoder_hidden_states) was given to a block built without cross-attention.")
            crossed = self.part("cross_attention")(x, memory_mask, memory=memory, cache=cache, layer=layer)
            x = self.part("cross_attention_norm")(x + self.dropout(crossed))
        ffn = ffn_module(x)
        return norm2(x + self.drop_path(self._scaled(1, self.ffn_residual_dropout(ffn)))), ffn
