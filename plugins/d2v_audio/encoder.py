"""The data2vec-audio Transformer encoder (Hugging Face ``Data2VecAudioEncoder``, fairseq's
``TransformerEncoder`` with ``layer_norm_first=False`` and ``pos_conv_depth=5``).

Built bottom-up from small parts::

    d2v.nn.block.TransformerBlock (post-LN; ``attention.{q,k,v,out}_proj``, ``ffn.fc1/fc2``)
    PositionalConvBlock        -> PositionalConv (a stack of grouped convs)
    everything                 -> AudioTransformerEncoder

``embed`` = mask embedding (or SpecAugment while fine-tuning) -> zero the padding ->
``x + pos_conv(x)`` -> LayerNorm -> dropout. ``contextualize`` = the post-LN layers, then
(``add_adapter``) Hugging Face's ``Data2VecAudioAdapter``: strided GLU convs that shorten the
output for CTC with a smaller label rate.

data2vec 2.0 audio (fairseq ``data2vec_multi``) is the same stack plus learned-scale ALiBi
attention biases (``alibi``) and no zeroing of padded frames before the positional conv
(``zero_padded_frames=False``); both are off by default, which keeps Hugging Face parity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.nn.alibi import alibi_bias_1d, alibi_slopes
from d2v.api.errors import SpecError
from d2v import Encoder, EncoderOutput, TransformerBlock, run_layer
from d2v.nn.packing import PackedBatch
from d2v.ssl.masking import compute_span_mask

TARGET_FEATURES = ("ffn", "end")


class PositionalConvBlock(nn.Module):
    """Grouped Conv1d ('same' length) -> LayerNorm without affine -> GELU, on ``(B, D, T)``."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=groups)
        # an even kernel with padding k//2 yields one extra frame: drop the last one
        self.trim = 1 if kernel % 2 == 0 else 0
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.activation = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.trim:
            x = x[..., : -self.trim]
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.activation(x)


class PositionalConv(nn.Module):
    """The relative positional embedding of data2vec-audio: a stack of conv blocks, ``(B, T, D)`` in and out."""

    def __init__(self, dim: int, num_layers: int, kernel: int, groups: int):
        super().__init__()
        if dim % groups:
            raise SpecError(f"encoder dim {dim} is not divisible by pos_conv_groups {groups}.")
        self.layers = nn.ModuleList(PositionalConvBlock(dim, kernel, groups) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for block in self.layers:
            x = block(x)
        return x.transpose(1, 2)


class AdapterLayer(nn.Module):
    """Strided Conv1d to twice the width, then GLU (halves it back), on ``(B, D, T)``."""

    def __init__(self, dim: int, kernel: int, stride: int):
        super().__init__()
        # Hugging Face pads by 1 whatever the kernel size; kept for weight/shape parity
        self.conv = nn.Conv1d(dim, 2 * dim, kernel, stride=stride, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.glu(self.conv(x), dim=1)


class AudioAdapter(nn.Module):
    """Hugging Face's ``Data2VecAudioAdapter`` (``add_adapter=True``): an optional
    Linear + LayerNorm down to ``output_dim``, then ``num_layers`` strided GLU convs
    (each skipped with probability ``layerdrop`` in training).

    The convs read the padded frames too (nothing zeroes them first), exactly as Hugging Face
    does, so the last valid frames of a short utterance in a padded batch depend on the padding.
    """

    def __init__(self, *, dim: int, output_dim: int, kernel: int, stride: int, num_layers: int, layerdrop: float):
        super().__init__()
        self.stride = stride
        self.num_layers = num_layers
        self.layerdrop = layerdrop
        if output_dim != dim:
            self.proj = nn.Linear(dim, output_dim)
            self.proj_layer_norm = nn.LayerNorm(output_dim)
        else:
            self.proj = self.proj_layer_norm = None
        self.layers = nn.ModuleList(AdapterLayer(output_dim, kernel, stride) for _ in range(num_layers))

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Valid frames after the adapter, by Hugging Face's formula (a kernel-1 conv of the
        stride: ``floor((L - 1) / stride) + 1`` per layer; equal to the real conv for kernel 3)."""
        for _ in range(self.num_layers):
            lengths = torch.div(lengths - 1, self.stride, rounding_mode="floor") + 1
        return lengths

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj_layer_norm(self.proj(x))
        x = x.transpose(1, 2)
        for layer in self.layers:
            if not (self.training and torch.rand(()) < self.layerdrop):
                x = layer(x)
        return x.transpose(1, 2)


class AudioTransformerEncoder(Encoder):
    """data2vec-audio's contextualising encoder (defaults: data2vec-audio Base).

    SpecAugment (``mask_time_*``, ``mask_feature_*``, Hugging Face's semantics and defaults)
    runs in :meth:`embed` only in training mode and only when no explicit ``mask`` is given;
    pass an all-False ``mask`` to switch it off for one call (e.g. self-supervised students
    that mask by dropping tokens).

    LayerDrop skips whole layers in training mode. A skipped layer counts as the identity in
    ``hidden_states``; when ``output_layer_targets`` is asked for, no layer is skipped
    (targets need every layer).

    ``apply_spec_augment=False`` switches the random SpecAugment off while keeping its settings
    (Hugging Face's flag); an explicit ``mask`` is still applied (self-supervised students need
    it), where Hugging Face would ignore ``mask_time_indices`` too.

    ``add_adapter`` appends :class:`AudioAdapter` after the layers (``adapter_kernel_size``,
    ``adapter_stride``, ``num_adapter_layers``; ``output_hidden_size`` its width, default
    ``dim``): ``last_hidden_state`` and ``padding_mask`` are then at the adapter's rate and
    ``output_dim`` wide, while ``hidden_states`` and ``layer_targets`` stay the layers' own.
    ``output_dim`` is what heads receive as ``input_dim``.

    data2vec 2.0 audio (fairseq ``data2vec_multi``, ``use_alibi_encoder``):

    * ``alibi`` adds ``scale * slope_h * -|i - j|`` to every layer's attention logits (slopes:
      :func:`d2v.nn.alibi.alibi_slopes`; positions: ``position_ids`` when given -- the kept
      positions of a data2vec 2.0 student, fairseq's ``masked_alibi`` -- else ``0..T-1``).
      ``alibi_scale`` (a parameter, shape ``(layers if alibi_scale_per_layer else 1, heads if
      alibi_scale_per_head else 1)``, initialised to ``alibi_scale_init``, learned when
      ``alibi_learned_scale``) is clamped at 0 before use, as fairseq does.
    ``padding_free``: the Transformer layers run on the real frames only (:mod:`d2v.nn.packing`);
    outputs at real frames are the padded path's, padded frames of the outputs are zero.

    * ``zero_padded_frames=False``: padded frames reach the positional conv as they are
      (fairseq 2.0's ``ModalitySpecificEncoder``); ``True`` zeroes them first (Hugging Face,
      fairseq 1.0). Valid frames near the padding depend on this through the conv.
    """

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
        activation_dropout: float = 0.1,
        layerdrop: float = 0.1,
        layer_norm_eps: float = 1e-5,
        num_pos_conv_layers: int = 5,
        pos_conv_kernel: int = 19,
        pos_conv_groups: int = 16,
        mask_time_prob: float = 0.05,
        mask_time_length: int = 10,
        mask_time_min_masks: int = 2,
        mask_feature_prob: float = 0.0,
        mask_feature_length: int = 10,
        mask_feature_min_masks: int = 0,
        apply_spec_augment: bool = True,
        add_adapter: bool = False,
        adapter_kernel_size: int = 3,
        adapter_stride: int = 2,
        num_adapter_layers: int = 3,
        output_hidden_size: int | None = None,
        alibi: bool = False,
        alibi_scale_init: float = 1.0,
        alibi_learned_scale: bool = True,
        alibi_scale_per_head: bool = True,
        alibi_scale_per_layer: bool = False,
        zero_padded_frames: bool = True,
        padding_free: bool = False,
    ):
        #: the constructor arguments (what the Hugging Face exporter reads back)
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.hparams = hparams
        self.dim = dim
        self.num_layers = layers
        self.layerdrop = layerdrop
        self.mask_time_prob = mask_time_prob
        self.mask_time_length = mask_time_length
        self.mask_time_min_masks = mask_time_min_masks
        self.mask_feature_prob = mask_feature_prob
        self.mask_feature_length = mask_feature_length
        self.mask_feature_min_masks = mask_feature_min_masks
        self.apply_spec_augment = bool(apply_spec_augment)
        self.output_dim = int(output_hidden_size or dim)
        self.heads = heads
        self.zero_padded_frames = bool(zero_padded_frames)
        self.padding_free = bool(padding_free)
        self.alibi = bool(alibi)
        if self.alibi:
            shape = (layers if alibi_scale_per_layer else 1, heads if alibi_scale_per_head else 1)
            self.alibi_scale = nn.Parameter(torch.full(shape, float(alibi_scale_init)),
                                            requires_grad=bool(alibi_learned_scale))
            # derived from `heads`, so not part of the checkpoint
            self.register_buffer("alibi_slopes", alibi_slopes(heads), persistent=False)

        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        self.pos_conv = PositionalConv(dim, num_pos_conv_layers, pos_conv_kernel, pos_conv_groups)
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, ffn_dim, activation, eps=layer_norm_eps, attention_dropout=attention_dropout,
                             dropout=dropout, activation_dropout=activation_dropout)
            for _ in range(layers)
        )
        self.adapter = None
        if add_adapter:
            self.adapter = AudioAdapter(dim=dim, output_dim=self.output_dim, kernel=adapter_kernel_size,
                                        stride=adapter_stride, num_layers=num_adapter_layers, layerdrop=layerdrop)
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT-style init for the Transformer (normal(0, 0.02), zero biases), Kaiming for the
        positional convs with zero bias, as Hugging Face initialises data2vec-audio."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for block in self.pos_conv.layers:
            nn.init.kaiming_normal_(block.conv.weight)
            nn.init.zeros_(block.conv.bias)

    # -- SpecAugment --------------------------------------------------------------------

    def spec_augment(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Hugging Face's ``_mask_hidden_states``: time spans -> mask embedding, feature spans -> 0.

        Random draws come from a numpy generator seeded from torch's RNG, so
        ``torch.manual_seed`` makes them reproducible.
        """
        batch, time, channels = x.shape
        if not self.apply_spec_augment or (self.mask_time_prob <= 0 and self.mask_feature_prob <= 0):
            return x
        rng = np.random.default_rng(int(torch.randint(2**31, ()).item()))
        if self.mask_time_prob > 0:
            time_mask = compute_span_mask(
                (batch, time),
                self.mask_time_prob,
                self.mask_time_length,
                rng=rng,
                padding_mask=None if padding_mask is None else padding_mask.cpu().numpy(),
                min_masks=self.mask_time_min_masks,
                require_same_masks=False,
            )
            time_mask = torch.as_tensor(time_mask, dtype=torch.bool, device=x.device)
            x = torch.where(time_mask[..., None], self.mask_embedding.to(x.dtype), x)
        if self.mask_feature_prob > 0:
            feature_mask = compute_span_mask(
                (batch, channels),
                self.mask_feature_prob,
                self.mask_feature_length,
                rng=rng,
                min_masks=self.mask_feature_min_masks,
                require_same_masks=False,
            )
            feature_mask = torch.as_tensor(feature_mask, dtype=torch.bool, device=x.device)
            x = x.masked_fill(feature_mask[:, None, :], 0.0)
        return x

    # -- Encoder interface ----------------------------------------------------------------

    def embed(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = features
        padding_mask = None if padding_mask is None else padding_mask.bool()
        if mask is not None:
            x = torch.where(mask.bool()[..., None], self.mask_embedding.to(x.dtype), x)
        elif self.training:
            x = self.spec_augment(x, padding_mask)
        if padding_mask is not None and self.zero_padded_frames:
            # padded frames are zero before the positional conv sees them (as Hugging Face)
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        return self.dropout(self.layer_norm(x))

    def _alibi_bias(self, x: Tensor, position_ids: Tensor | None) -> Tensor:
        """Unscaled ALiBi biases ``(B or 1, H, T, T)`` at the tokens' positions."""
        if position_ids is None:
            positions = torch.arange(x.shape[1], device=x.device)[None, :]
        else:
            positions = position_ids.to(x.device)
            if positions.dim() == 1:
                positions = positions[None, :]
            if positions.shape[-1] != x.shape[1]:
                raise SpecError(f"position_ids cover {positions.shape[-1]} tokens but the encoder got {x.shape[1]}.")
        return alibi_bias_1d(positions, self.alibi_slopes)

    @staticmethod
    def _biased_mask(bias: Tensor, scale: Tensor, padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """One layer's additive attention mask: ``scale`` ``(H or 1,)`` times the biases, with
        ``-inf`` at padded keys (SDPA takes a float mask as logits to add)."""
        mask = bias * scale.to(bias.dtype).view(1, -1, 1, 1)
        if padding_mask is not None:
            mask = mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        return mask.to(dtype)

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
        """``position_ids`` ``(B, T)`` or ``(T,)``: where each token of ``x`` sits in the full
        sequence (only ALiBi reads them; the conv positions come from :meth:`embed`)."""
        if target_feature not in TARGET_FEATURES:
            raise SpecError(f"unknown target_feature '{target_feature}'; expected one of {', '.join(TARGET_FEATURES)}.")
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        bias = scales = None
        if self.alibi:
            bias, scales = self._alibi_bias(x, position_ids), self.alibi_scale.clamp_min(0)
            if scales.shape[0] == 1:  # one scale row for all layers: one mask
                attn_mask, bias = self._biased_mask(bias, scales[0], padding_mask, x.dtype), None
        hidden_states = [x] if output_hidden_states else None
        layer_targets = [] if output_layer_targets else None
        may_drop = self.training and self.layerdrop > 0 and not output_layer_targets
        packed = PackedBatch.of(padding_mask) if self.padding_free else None
        if packed is not None:  # the padding is left out; a bool key mask is then not needed
            x = packed.pack(x)
            attn_mask = attn_mask if attn_mask is None or attn_mask.is_floating_point() else None

        for index, layer in enumerate(self.layers):
            if not (may_drop and torch.rand(()) < self.layerdrop):
                mask = attn_mask if bias is None else self._biased_mask(bias, scales[index], padding_mask, x.dtype)
                x, ffn_out = run_layer(self, layer, x, mask, packed=packed)
                if layer_targets is not None:
                    layer_targets.append(ffn_out if target_feature == "ffn" else x)
            if hidden_states is not None:
                hidden_states.append(x)
        if packed is not None:
            x, hidden_states, layer_targets = packed.unpack_all(x, hidden_states, layer_targets)

        if self.adapter is not None:
            x = self.adapter(x)
            if padding_mask is not None:
                lengths = self.adapter.output_lengths((~padding_mask).sum(-1)).clamp(1, x.shape[1])
                padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]

        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            layer_targets=None if layer_targets is None else tuple(layer_targets),
            padding_mask=padding_mask,
        )
