"""Named sensor model presets (``model`` components): the sensor patch embedding in front of d2v's
built-in 1-D Transformer encoder (``audio.transformer``: nothing in it is specific to speech).

The encoder carries data2vec 2.0's options (learned-scale ALiBi, padded frames not zeroed), in
the preset rather than in the pretraining spec, so a pretrained checkpoint and a fine-tuning
model have the same parameters.
"""

from __future__ import annotations


def data2vec_sensors_tiny() -> dict:
    """A tiny sensor model for CPU demos: 10-sample (0.2 s at 50 Hz) patches of 3 channels, 64 conv
    channels, a 4-layer, 64-wide, 4-head encoder (FFN 128) with one positional conv of kernel 5."""
    return {
        "feature_extractor": {"name": "sensors.patches", "channels": 3, "patch_size": 10, "conv_dim": 64},
        "encoder": {
            "name": "audio.transformer", "dim": 64, "layers": 4, "heads": 4, "ffn_dim": 128,
            "num_pos_conv_layers": 1, "pos_conv_kernel": 5, "pos_conv_groups": 16,
            "layerdrop": 0.0, "mask_time_prob": 0.0, "mask_time_length": 2, "mask_time_min_masks": 0,
            "alibi": True, "zero_padded_frames": False,
        },
    }
