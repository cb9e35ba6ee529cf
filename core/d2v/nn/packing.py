"""Padding-free Transformer blocks: a padded batch's real tokens laid end to end.

Why: in a padded batch of speech or text every linear layer, LayerNorm and activation also runs
on the padding (15-25 % of the tokens at the length spreads people train with). Packed, those
per-token layers see only real tokens: the block is unchanged, its input is ``(1, N, D)``
instead of ``(B, T, D)``. Only attention needs the sequence boundaries:

* CUDA: a nested jagged tensor through ``scaled_dot_product_attention``, which runs PyTorch's
  own variable-length flash / memory-efficient kernels (no compute on padding at all);
* elsewhere (CPU, or with a float bias such as ALiBi, which those kernels do not take): the
  packed queries/keys/values are scattered back into a padded batch for one padded SDPA call
  (attention is the smaller share of a block's FLOPs at these lengths) and gathered again.

Real positions get the padded path's outputs (within float rounding); padded positions of the
unpacked outputs are zero, where the padded path leaves values nothing may read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class PackedBatch:
    """Where each real token of a padded ``(B, T)`` batch sits once packed."""

    def __init__(self, padding_mask: Tensor):
        valid = ~padding_mask.bool()
        self.batch, self.time = valid.shape
        self.key_mask = valid[:, None, None, :]
        lengths = valid.sum(1)
        self.offsets = F.pad(lengths.cumsum(0), (1, 0))
        self.index = valid.flatten().nonzero().squeeze(1)

    @classmethod
    def of(cls, padding_mask: Tensor | None) -> PackedBatch | None:
        """A packing for the batch, or None where there is no padding to leave out."""
        if padding_mask is None or not bool(padding_mask.any()):
            return None
        return cls(padding_mask)

    def pack(self, x: Tensor) -> Tensor:
        """``(B, T, ...)`` -> ``(1, N, ...)``: the real tokens in batch order."""
        return x.flatten(0, 1).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: Tensor) -> Tensor:
        """``(1, N, ...)`` -> ``(B, T, ...)``, zeros at the padding."""
        out = x.new_zeros((self.batch * self.time,) + tuple(x.shape[2:]))
        return out.index_copy(0, self.index, x[0]).view(self.batch, self.time, *x.shape[2:])

    def unpack_all(self, x: Tensor, hidden_states: list[Tensor] | None,
                   layer_targets: list[Tensor] | None) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None]:
        """An encoder's packed outputs back on the padded grid (``hidden_states[0]``, the
        input, was recorded before packing)."""
        if hidden_states is not None:
            hidden_states = hidden_states[:1] + [self.unpack(h) for h in hidden_states[1:]]
        if layer_targets is not None:
            layer_targets = [self.unpack(t) for t in layer_targets]
        return self.unpack(x), hidden_states, layer_targets

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
        """Self-attention within each sequence: ``q``, ``k``, ``v`` ``(1, H, N, d)`` -> ``(1, H, N, d)``.
        ``attn_mask``: an additive float bias on the padded ``(B, H, T, T)`` grid, or None."""
        if q.is_cuda and attn_mask is None:
            nested = [torch.nested.nested_tensor_from_jagged(t[0].transpose(0, 1).contiguous(), self.offsets)
                      .transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p)
            return out.transpose(1, 2).values().transpose(0, 1).unsqueeze(0)
        padded = [self.unpack(t[0].transpose(0, 1).unsqueeze(0)).transpose(1, 2) for t in (q, k, v)]
        mask = self.key_mask if attn_mask is None else attn_mask.masked_fill(~self.key_mask, float("-inf"))
        out = F.scaled_dot_product_attention(*padded, attn_mask=mask, dropout_p=dropout_p)
        return self.pack(out.transpose(1, 2)).squeeze(0).transpose(0, 1).unsqueeze(0)
