"""Named data2vec-text model presets (registered as ``model`` components).

Each returns the ``model:`` section of a spec; a spec's own keys are merged over it, e.g.
``model: {preset: data2vec-text-tiny, feature_extractor: {vocab_size: 8000}}`` for a tokenizer
of another size (the runner stops with a clear error when the tokenizer is larger than the
embedding table).
"""

from __future__ import annotations

from typing import Any

#: the demo tokenizer's size (experiments/data/text_demo/tokenizer, byte-level BPE)
DEMO_VOCAB_SIZE = 1500


def _preset(dim: int, layers: int, heads: int, ffn_dim: int, *, vocab_size: int = 50265,
            max_position_embeddings: int = 514, **encoder: Any) -> dict:
    return {
        "feature_extractor": {"name": "text.embeddings", "vocab_size": vocab_size,
                              "max_position_embeddings": max_position_embeddings, "type_vocab_size": 1,
                              "padding_idx": 1, "layer_norm_eps": 1e-5},  # dim: the encoder's
        "encoder": {"name": "text.transformer", "dim": dim, "layers": layers, "heads": heads, "ffn_dim": ffn_dim,
                    "layer_norm_eps": 1e-5, **encoder},
    }


def data2vec_text_base() -> dict:
    """data2vec-text Base (``facebook/data2vec-text-base``): RoBERTa Base shapes -- 50265 BPE
    tokens, 12 layers, 768 wide, 12 heads, FFN 3072, 514 positions (512 tokens after the
    ``padding_idx + 1`` offset), one token type, pad id 1, LayerNorm eps 1e-5, dropout 0.1."""
    return _preset(768, 12, 12, 3072)


def data2vec_text_large() -> dict:
    """data2vec-text Large: RoBERTa Large shapes -- 24 layers, 1024 wide, 16 heads, FFN 4096,
    otherwise as Base (vocabulary, positions, eps, dropout)."""
    return _preset(1024, 24, 16, 4096)


def data2vec_text_tiny() -> dict:
    """A tiny data2vec-text for tests and CPU demos: the demo tokenizer's 1500 tokens, 2 layers,
    64 wide, 4 heads, FFN 128, 514 positions. Override ``feature_extractor.vocab_size`` for
    another tokenizer."""
    return _preset(64, 2, 4, 128, vocab_size=DEMO_VOCAB_SIZE)
