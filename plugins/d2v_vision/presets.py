"""Named data2vec-vision model presets (registered as ``model`` components).

Each returns the ``model:`` section of a spec; a spec's own keys are merged over it
(``model: {preset: data2vec-vision-base, encoder: {drop_path_rate: 0.2}}``). The shapes are
the published ones (``facebook/data2vec-vision-base``/``-large``: ViT-B/16 and ViT-L/16 at
224 px, relative position bias per layer, layer scale 0.1, mean pooling).
"""

from __future__ import annotations

from typing import Any


def _preset(dim: int, layers: int, heads: int, ffn_dim: int, *, image_size: int = 224, patch_size: int = 16,
            **encoder: Any) -> dict:
    encoder = {"use_relative_position_bias": True, "layer_scale_init_value": 0.1, "use_mean_pooling": True, **encoder}
    return {
        "feature_extractor": {"name": "vision.patches", "image_size": image_size, "patch_size": patch_size},
        "encoder": {"name": "vision.transformer", "dim": dim, "layers": layers, "heads": heads, "ffn_dim": ffn_dim,
                    "image_size": image_size, "patch_size": patch_size, **encoder},
    }


def data2vec_vision_base() -> dict:
    """data2vec-vision Base (``facebook/data2vec-vision-base``): ViT-B/16, 12 layers, 768 wide, 12 heads, FFN 3072."""
    return _preset(768, 12, 12, 3072)


def data2vec_vision_large() -> dict:
    """data2vec-vision Large (``facebook/data2vec-vision-large``): ViT-L/16, 24 layers, 1024 wide, 16 heads, FFN 4096."""
    return _preset(1024, 24, 16, 4096)


def data2vec_vision_tiny() -> dict:
    """A tiny data2vec-vision for tests and CPU demos: 32 px images in 4 px patches (8x8 grid),
    4 layers, 64 wide, 4 heads, shared relative position bias (the pretraining setting)."""
    return _preset(64, 4, 4, 128, image_size=32, patch_size=4, use_relative_position_bias=False,
                   use_shared_relative_position_bias=True, drop_path_rate=0.0)


# --------------------------------------------------------------------------- data2vec 2.0


def _preset2(dim: int, layers: int, prenet_layers: int, heads: int, *, image_size: int = 224, patch_size: int = 16,
             **encoder: Any) -> dict:
    return {
        "feature_extractor": {"name": "vision.vit", "image_size": image_size, "patch_size": patch_size},
        "encoder": {"name": "vision.vit_transformer", "dim": dim, "layers": layers, "prenet_layers": prenet_layers,
                    "heads": heads, "ffn_dim": 4 * dim, **encoder},
    }


def data2vec2_vision_base() -> dict:
    """data2vec 2.0 ViT-B/16 (fairseq ``base_images_only_task``; ``data2vec2/base_imagenet.pt``):
    768 wide, 12 heads, 2 prenet + 10 shared post-LN blocks."""
    return _preset2(768, 12, 2, 12)


def data2vec2_vision_large() -> dict:
    """data2vec 2.0 ViT-L/16 (``large_images_only_task``; ``data2vec2/large_imagenet.pt``):
    1024 wide, 16 heads, 24 shared blocks, no prenet."""
    return _preset2(1024, 24, 0, 16)


def data2vec2_vision_huge() -> dict:
    """data2vec 2.0 ViT-H/16 (``huge_images_only_task``; ``data2vec2/huge_imagenet.pt``):
    1280 wide, 16 heads, 32 shared blocks, no prenet (``huge_images14``: ``patch_size: 14``)."""
    return _preset2(1280, 32, 0, 16)


def data2vec2_vision_tiny() -> dict:
    """A tiny data2vec 2.0 ViT for tests and CPU demos: 32 px images in 4 px patches (8x8 grid),
    64 wide, 4 heads, 1 prenet + 3 shared blocks."""
    return _preset2(64, 4, 1, 4, image_size=32, patch_size=4)
