"""The data2vec-text Transformer encoder (Hugging Face ``Data2VecTextEncoder`` + ``Data2VecTextPooler``,
fairseq's RoBERTa ``TransformerEncoder``): post-LN layers over the embeddings of
:mod:`d2v_text.feature_extractor`.

Built bottom-up::

    d2v.nn.block.TransformerBlock (post-LN, optional cross-attention) x N, Pooler -> TextTransformerEncoder

(the block is core's, shared with every encoder; here its attention is called ``self_attention``).

Decoder mode (``is_decoder``, as ``Data2VecTextForCausalLM`` runs it) adds the causal mask,
optional cross-attention to ``encoder_hidden_states`` (``add_cross_attention``) and a
:class:`~d2v_text.cache.KeyValueCache` for token-by-token generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import BlockNames, Encoder, EncoderOutput, TransformerBlock, run_layer
from d2v.nn.packing import PackedBatch
from d2v_text.cache import KeyValueCache

TARGET_FEATURES = ("ffn", "end")


#: Hugging Face's/fairseq's RoBERTa layer names (``self_attention``, ``attention_norm``, ...)
LAYER_NAMES = BlockNames(attention="self_attention")


class Pooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the first token's (``<s>``) summary (HF's ``pooler_output``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class TextTransformerEncoder(Encoder):
    """data2vec-text's contextualising encoder (defaults: data2vec-text Base).

    Positions are added by the embeddings, so :meth:`embed` only checks the mask (text is masked
    at the token level by the processor: an all-False or ``None`` mask is accepted, True entries
    are an error) and :meth:`contextualize` runs on any subset of positions (data2vec 2.0 feeds
    it the kept tokens only).

    ``padding_mask`` (True = padding) stops padded keys from being attended; while decoding with a
    cache it covers the past tokens and the new ones (HF's ``attention_mask``). Decoder options,
    passed per call through :attr:`batch_keys`: ``encoder_hidden_states`` ``(B, T_enc, D)`` and
    ``encoder_attention_mask`` ``(B, T_enc)`` (1 = real, HF's convention) for cross-attention,
    ``past_key_values`` (a :class:`KeyValueCache`) and ``use_cache`` (default: the ``use_cache``
    setting; only a decoder caches). The returned cache is updated in place.

    ``padding_free`` (encoders only): the layers run on the real tokens only
    (:mod:`d2v.nn.packing`); outputs at real tokens are the padded path's, padded ones are zero.
    """

    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "past_key_values", "use_cache")

    def __init__(
        self,
        *,
        dim: int = 768,
        layers: int = 12,
        heads: int = 12,
        ffn_dim: int = 3072,
        activation: str = "gelu",
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        is_decoder: bool = False,
        add_cross_attention: bool = False,
        add_pooling_layer: bool = False,
        use_cache: bool = True,
        initializer_range: float = 0.02,
        padding_free: bool = False,
    ):
        #: the constructor arguments (what the Hugging Face exporter reads back)
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if add_cross_attention and not is_decoder:
            raise SpecError("text.transformer: add_cross_attention needs is_decoder: true (cross-attention "
                            "belongs to a decoder, as in Hugging Face).")
        if padding_free and is_decoder:
            raise SpecError("text.transformer: padding_free is for encoders; a decoder's causal mask, key/value "
                            "cache and cross-attention run on the padded batch. Set padding_free: false.")
        self.hparams = hparams
        self.padding_free = bool(padding_free)
        self.dim = int(dim)
        self.num_layers = int(layers)
        self.is_decoder = bool(is_decoder)
        self.add_cross_attention = bool(add_cross_attention)
        self.use_cache = bool(use_cache)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, ffn_dim, activation, eps=layer_norm_eps, attention_dropout=attention_dropout,
                             dropout=dropout, cross_attention=add_cross_attention, names=LAYER_NAMES)
            for _ in range(layers)
        )
        self.pooler = Pooler(dim) if add_pooling_layer else None
        for module in self.modules():
            if isinstance(module, nn.Linear):  # as HF initialises it; LayerNorms start at 1 / 0
                nn.init.normal_(module.weight, std=initializer_range)
                nn.init.zeros_(module.bias)

    # -- masks ----------------------------------------------------------------------------

    def _self_attention_mask(self, x: Tensor, padding_mask: Tensor | None, past_length: int) -> Tensor | None:
        """Bool ``(B, 1, T, past + T)`` (or broadcastable), True where a key may be attended."""
        length = x.shape[1]
        keys = past_length + length
        mask = None
        if padding_mask is not None:
            if padding_mask.shape[1] != keys:
                raise SpecError(
                    f"text.transformer: padding_mask covers {padding_mask.shape[1]} tokens but attention sees "
                    f"{keys} ({past_length} cached + {length} new); while decoding with a cache pass the mask "
                    f"of all tokens so far (HF's attention_mask)."
                )
            mask = ~padding_mask.bool()[:, None, None, :]
        if self.is_decoder:
            query_positions = torch.arange(length, device=x.device) + past_length
            causal = torch.arange(keys, device=x.device)[None, :] <= query_positions[:, None]
            mask = causal[None, None] if mask is None else mask & causal[None, None]
        return mask

    # -- Encoder interface ----------------------------------------------------------------

    def embed(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if mask is not None and bool(mask.any()):
            raise SpecError(
                "text.transformer has no mask embedding: text is masked at the token level by the text "
                "processor (masking: {name: bert, ...} replaces tokens with <mask> and sets corrupted_mask), "
                "or by dropping tokens (data2vec2). Remove the encoder-level mask."
            )
        return features

    def contextualize(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer_targets: bool = False,
        target_feature: str = "ffn",
        position_ids: Tensor | None = None,  # positions were added by the embeddings
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
    ) -> EncoderOutput:
        if target_feature not in TARGET_FEATURES:
            raise SpecError(f"unknown target_feature '{target_feature}'; expected one of {', '.join(TARGET_FEATURES)}.")
        if encoder_hidden_states is not None and not self.add_cross_attention:
            raise SpecError("text.transformer: encoder_hidden_states were given but the encoder has no "
                            "cross-attention; build it with is_decoder: true and add_cross_attention: true.")
        if past_key_values is not None and not isinstance(past_key_values, KeyValueCache):
            raise SpecError(f"text.transformer: past_key_values must be the KeyValueCache this encoder returned, "
                            f"got {type(past_key_values).__name__}.")
        use_cache = self.is_decoder and (self.use_cache if use_cache is None else bool(use_cache))
        cache = past_key_values if past_key_values is not None else (KeyValueCache() if use_cache else None)
        past_length = 0 if cache is None else cache.get_seq_length()

        attn_mask = self._self_attention_mask(x, padding_mask, past_length)
        memory_mask = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            memory_mask = encoder_attention_mask.bool()[:, None, None, :]

        hidden_states = [x] if output_hidden_states else None
        layer_targets = [] if output_layer_targets else None
        packed = PackedBatch.of(padding_mask) if self.padding_free else None
        if packed is not None:  # the padding is left out, and with it the key mask
            x, attn_mask = packed.pack(x), None
        for index, layer in enumerate(self.layers):
            x, ffn_out = run_layer(self, layer, x, attn_mask, memory=encoder_hidden_states, memory_mask=memory_mask,
                                   cache=cache, layer=index, packed=packed)
            if layer_targets is not None:
                layer_targets.append(ffn_out if target_feature == "ffn" else x)
            if hidden_states is not None:
                hidden_states.append(x)
        if packed is not None:
            x, hidden_states, layer_targets = packed.unpack_all(x, hidden_states, layer_targets)

        if padding_mask is not None:
            padding_mask = padding_mask.bool()[:, -x.shape[1]:]
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            layer_targets=None if layer_targets is None else tuple(layer_targets),
            padding_mask=padding_mask,
            pooler_output=None if self.pooler is None else self.pooler(x),
            past_key_values=cache if use_cache else None,
        )
