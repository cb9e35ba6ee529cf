"""data2vec 2.0's image Transformer (fairseq ``data2vec_multi`` with the IMAGE modality): the
modality's context encoder (LayerNorm, dropout, ``prenet_layers`` blocks) followed by the
shared blocks, all fairseq ``AltBlock``\\ s.

Built bottom-up::

    d2v.nn.block.TransformerBlock (fused ``qkv``, post-LN by default; fairseq ``AltBlock``'s names)
    blocks x layers (the first ``prenet_layers`` are fairseq's modality prenet) -> ViTEncoder

``embed`` = mask embedding where ``mask`` is True -> LayerNorm (post-LN models; fairseq's
``context_encoder.norm``) -> dropout (``prenet_dropout``). ``contextualize`` = the prenet blocks
-> dropout (``dropout_input``) -> the remaining blocks -> final LayerNorm (pre-LN models only)
-> ``pooler_output`` (mean of the patch tokens, or the CLS token, then the ``fc_norm``
LayerNorm of fairseq's ``mae_image_classification``).

Positions are the feature extractor's (:mod:`d2v_vision.vit_patches`), so ``position_ids``
(kept tokens) need nothing here: a kept token carries its position with it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import AttentionNames, BlockNames, Encoder, EncoderOutput, TransformerBlock, run_layer

TARGET_FEATURES = ("ffn", "end")


#: fairseq ``AltBlock``'s names (``norm1``, ``attention.qkv`` fused, ``attention.proj``, ``norm2``, ``mlp``)
BLOCK_NAMES = BlockNames(attention_norm="norm1", ffn="mlp", ffn_norm="norm2",
                         projections=AttentionNames(output="proj", fused="qkv"),
                         order=("attention_norm", "attention", "ffn_norm", "ffn"))


class ViTEncoder(Encoder):
    """data2vec 2.0's image encoder (defaults: ViT-B/16, fairseq ``base_images_only_task``).

    ``layers`` counts every block; the first ``prenet_layers`` are fairseq's modality prenet
    (``prenet_depth``), the rest its shared blocks (``depth``). Dropouts keep fairseq's names:
    ``dropout`` (attention output, ``encoder_dropout``), ``attention_dropout``,
    ``activation_dropout`` (timm Mlp, after the activation and after ``fc2``),
    ``post_mlp_dropout``, ``prenet_dropout`` (after the input LayerNorm), ``dropout_input``
    (before the shared blocks); ``prenet_layerdrop``/``layerdrop`` skip blocks in training.
    ``drop_path_rate`` grows linearly from 0 over all blocks. ``num_extra_tokens``: leading
    tokens the mean pooling skips (the feature extractor's CLS). ``use_mean_pooling`` (else the
    first token), ``use_pooler_norm`` (fairseq ``use_fc_norm``), ``add_pooling_layer``.
    ``mlp_residual``: false reproduces fairseq's pre-LN ``AltBlock`` (no residual around the MLP,
    see :class:`d2v.nn.block.TransformerBlock`); the fairseq importer sets it for ``layer_norm_first: true`` checkpoints.
    """

    #: exempt from weight decay (never trained by data2vec 2.0; fairseq has no such parameter)
    no_weight_decay_names = ("mask_embedding",)
    #: with the head for layer-wise lr decay
    top_parameters = ("norm", "pooler_norm")

    def __init__(
        self,
        *,
        dim: int = 768,
        layers: int = 12,
        prenet_layers: int = 2,
        heads: int = 12,
        ffn_dim: int = 3072,
        activation: str = "gelu",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        post_mlp_dropout: float = 0.0,
        prenet_dropout: float = 0.0,
        dropout_input: float = 0.0,
        layerdrop: float = 0.0,
        prenet_layerdrop: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        layer_norm_first: bool = False,
        mlp_residual: bool = True,
        num_extra_tokens: int = 1,
        use_mean_pooling: bool = True,
        use_pooler_norm: bool = True,
        add_pooling_layer: bool = True,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if not 0 <= prenet_layers <= layers:
            raise SpecError(f"prenet_layers must be between 0 and layers ({layers}), got {prenet_layers}.")
        self.dim = dim
        self.num_layers = layers
        self.prenet_layers = prenet_layers
        self.num_extra_tokens = int(num_extra_tokens)
        self.layerdrop = float(layerdrop)
        self.prenet_layerdrop = float(prenet_layerdrop)
        self.use_mean_pooling = bool(use_mean_pooling)
        self.add_pooling_layer = bool(add_pooling_layer)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.layer_norm = None if layer_norm_first else nn.LayerNorm(dim, eps=layer_norm_eps)
        self.prenet_dropout = nn.Dropout(prenet_dropout)
        self.dropout_input = nn.Dropout(dropout_input)
        rates = torch.linspace(0, drop_path_rate, layers).tolist() if layers else []
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, ffn_dim, activation, layer_norm_first=layer_norm_first, eps=layer_norm_eps,
                             attention_dropout=attention_dropout, dropout=dropout,
                             activation_dropout=activation_dropout, ffn_output_dropout=activation_dropout,
                             ffn_residual_dropout=post_mlp_dropout, drop_path=rates[i], mlp_residual=mlp_residual,
                             names=BLOCK_NAMES)
            for i in range(layers)
        )
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps) if layer_norm_first else None
        # fairseq's fc_norm: eps 1e-6 whatever norm_eps is
        self.pooler_norm = nn.LayerNorm(dim, eps=1e-6) if add_pooling_layer and use_pooler_norm else None
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):  # fairseq's init_bert_params
                nn.init.normal_(module.weight, std=initializer_range)
                nn.init.zeros_(module.bias)

    def embed(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = features
        if mask is not None:
            x = torch.where(mask.bool()[..., None], self.mask_embedding.to(x.dtype), x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.prenet_dropout(x)

    def contextualize(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer_targets: bool = False,
        target_feature: str = "ffn",
        position_ids: Tensor | None = None,  # positions travel with the tokens (feature extractor)
    ) -> EncoderOutput:
        if target_feature not in TARGET_FEATURES:
            raise SpecError(f"unknown target_feature '{target_feature}'; expected one of {', '.join(TARGET_FEATURES)}.")
        bias = None
        if padding_mask is not None and bool(padding_mask.any()):
            bias = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(padding_mask.bool(), float("-inf"))[:, None, None, :]
        else:
            padding_mask = None
        hidden_states = [x] if output_hidden_states else None
        layer_targets = [] if output_layer_targets else None
        may_drop = self.training and not output_layer_targets
        for i, layer in enumerate(self.layers):
            if i == self.prenet_layers:
                x = self.dropout_input(x)
            rate = self.prenet_layerdrop if i < self.prenet_layers else self.layerdrop
            if not (may_drop and rate > 0 and torch.rand(()) < rate):
                x, ffn = run_layer(self, layer, x, bias)
                if layer_targets is not None:
                    layer_targets.append(ffn if target_feature == "ffn" else x)
            if hidden_states is not None:
                hidden_states.append(x)
        if self.prenet_layers == len(self.layers):
            x = self.dropout_input(x)
        if self.norm is not None:
            x = self.norm(x)
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            layer_targets=None if layer_targets is None else tuple(layer_targets),
            padding_mask=padding_mask,
            pooler_output=self.pool(x, padding_mask) if self.add_pooling_layer else None,
        )

    def pool(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Mean over the patch tokens (fairseq's ``MEAN_POOLING``: extra tokens removed) or the
        first token (``CLS_TOKEN``), then ``pooler_norm``."""
        if self.use_mean_pooling:
            patches = x[:, self.num_extra_tokens:]
            if padding_mask is None:
                pooled = patches.mean(1)
            else:
                valid = (~padding_mask[:, self.num_extra_tokens:]).unsqueeze(-1).to(x.dtype)
                pooled = (patches * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        else:
            pooled = x[:, 0]
        return pooled if self.pooler_norm is None else self.pooler_norm(pooled)
