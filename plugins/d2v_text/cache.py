"""The key/value cache of the text decoder (what Hugging Face's ``DynamicCache`` /
``EncoderDecoderCache`` hold for ``Data2VecTextForCausalLM``).

Self-attention keys/values grow by the new tokens at every call; cross-attention keys/values
are computed once from ``encoder_hidden_states`` and reused. The cache is updated in place by
the encoder, and returned in ``EncoderOutput.past_key_values`` so the caller passes it back.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KeyValueCache:
    """Per layer: self-attention ``(keys, values)`` ``(B, H, T, Dh)`` and, with cross-attention,
    the projected encoder states' ``(keys, values)``."""

    def __init__(self) -> None:
        self.self_attention: dict[int, tuple[Tensor, Tensor]] = {}
        self.cross_attention: dict[int, tuple[Tensor, Tensor]] = {}

    def get_seq_length(self) -> int:
        """Tokens already decoded (the positions of the next tokens start after them)."""
        first = self.self_attention.get(0)
        return 0 if first is None else int(first[0].shape[-2])

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' keys/values of ``layer``; return all of them."""
        if layer in self.self_attention:
            past_keys, past_values = self.self_attention[layer]
            keys, values = torch.cat([past_keys, keys], dim=-2), torch.cat([past_values, values], dim=-2)
        self.self_attention[layer] = (keys, values)
        return keys, values

    def reorder(self, rows: Tensor) -> None:
        """Keep/reorder batch rows (beam search, dropping finished rows)."""
        for store in (self.self_attention, self.cross_attention):
            for layer, (keys, values) in store.items():
                store[layer] = (keys.index_select(0, rows), values.index_select(0, rows))

    def __repr__(self) -> str:
        return (f"KeyValueCache(layers={len(self.self_attention)}, seq_length={self.get_seq_length()}, "
                f"cross_attention={bool(self.cross_attention)})")
