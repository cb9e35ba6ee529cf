"""Named data2vec-audio model presets (registered as ``model`` components).

Each returns the ``model:`` section of a spec: ``{"feature_extractor": {...}, "encoder": {...}}``;
a spec's own keys are merged over it (``model: {preset: data2vec-audio-base, encoder: {layerdrop: 0.05}}``).
"""

from __future__ import annotations

from typing import Any

# the wav2vec 2.0 / data2vec conv stack: 320x downsampling (50 Hz at 16 kHz), 400-sample receptive field
_CONV = {
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
}


def _preset(dim: int, layers: int, heads: int, ffn_dim: int, *, conv: dict[str, Any] = _CONV, **encoder: Any) -> dict:
    return {
        "feature_extractor": {"name": "audio.conv", **conv, "feat_proj_dropout": 0.0},  # dim: the encoder's
        "encoder": {"name": "audio.transformer", "dim": dim, "layers": layers, "heads": heads, "ffn_dim": ffn_dim, **encoder},
    }


def data2vec_audio_base() -> dict:
    """data2vec-audio Base (``facebook/data2vec-audio-base``): 12 layers, 768 wide, 12 heads,
    FFN 3072, 5 positional conv layers of kernel 19 in 16 groups; Hugging Face's config defaults."""
    return _preset(768, 12, 12, 3072)


def data2vec_audio_large() -> dict:
    """data2vec-audio Large (``facebook/data2vec-audio-large``): 24 layers, 1024 wide, 16 heads,
    FFN 4096. The conv stack, positional conv (5 x kernel 19, 16 groups), LayerNorm eps (1e-5)
    and dropouts are those of Base: the Hugging Face conversion script builds Large from a
    ``Data2VecAudioConfig`` that only changes the sizes. (Not checked against the hub's
    ``config.json``: ``conv_bias`` is assumed False, as in the fairseq data2vec-audio config.)"""
    return _preset(1024, 24, 16, 4096)


def data2vec_audio_tiny() -> dict:
    """A tiny data2vec-audio for tests and CPU demos: 4 conv layers of 32 channels that keep the
    320x downsampling (50 frames per second at 16 kHz, 345-sample receptive field), a 2-layer,
    64-wide, 4-head encoder with 2 positional conv layers."""
    conv = {"conv_dim": [32] * 4, "conv_kernel": [10, 8, 4, 4], "conv_stride": [5, 4, 4, 4], "conv_bias": False}
    return _preset(64, 2, 4, 128, conv=conv, num_pos_conv_layers=2, pos_conv_kernel=19, pos_conv_groups=16, layerdrop=0.0)
