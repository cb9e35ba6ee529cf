"""Multi-head attention for every built-in Transformer block: one class, with the projections
named as the checkpoints it must load name them.

Why names are a parameter: a block's weight names are what Hugging Face and fairseq
checkpoints, d2v checkpoints, ``freeze`` patterns and layer-wise lr decay all refer to, and they
differ per model family (``q_proj``/``k_proj``/``v_proj``/``out_proj``; BEiT's
``query``/``key``/``value``/``proj`` with no key bias; data2vec 2.0's fused ``qkv``/``proj``),
while the math is the same. The names change what ``state_dict()`` and ``named_parameters()``
say, nothing else.

Self-attention computes query, key and value in **one** matmul whichever way the weights are
stored: separate projections are concatenated per call (one weight copy, small next to the
matmul) rather than stored fused, so parameter names, optimizer state and checkpoints stay as
they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.nn.packing import PackedBatch


@dataclass(frozen=True)
class AttentionNames:
    """What the projections are called. ``fused`` set: one ``(3D, D)`` projection (query, key,
    value rows in that order) under that name, and ``query``/``key``/``value`` are unused.
    ``key_bias=False``: the key projection has no bias (BEiT). ``position_bias``: the name of
    an optional module adding position-dependent logits (e.g. a relative position table)."""

    query: str = "q_proj"
    key: str = "k_proj"
    value: str = "v_proj"
    output: str = "out_proj"
    fused: str | None = None
    key_bias: bool = True
    position_bias: str = "relative_position_bias"


class MultiHeadAttention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    Self-attention takes keys/values from ``x``; with ``cross=True`` they come from ``memory``
    (the states of another encoder). For incremental decoding pass a ``cache``: any object with
    ``update(layer, keys, values) -> (all_keys, all_values)`` (self-attention keys/values grow by
    the new tokens) and a dict ``cross_attention`` (``layer -> (keys, values)``, projected once).
    ``position_bias``: a module whose output ``(B or 1, H, T, T)`` is added to the logits; it is
    called with the block's ``position`` arguments.
    """

    def __init__(self, dim: int, heads: int, dropout: float, *, cross: bool = False,
                 names: AttentionNames = AttentionNames(), position_bias: nn.Module | None = None):
        super().__init__()
        if dim % heads:
            raise SpecError(f"encoder dim {dim} is not divisible by heads {heads}.")
        if cross and names.fused:
            raise SpecError("cross-attention projects queries and keys/values from different inputs; it cannot "
                            "store them as one fused projection.")
        self.heads = heads
        self.dropout = dropout
        self.cross = cross
        self.names = names
        if names.fused:
            self.add_module(names.fused, nn.Linear(dim, 3 * dim))
        else:
            self.add_module(names.query, nn.Linear(dim, dim))
            self.add_module(names.key, nn.Linear(dim, dim, bias=names.key_bias))
            self.add_module(names.value, nn.Linear(dim, dim))
        self.add_module(names.output, nn.Linear(dim, dim))
        if position_bias is not None:
            self.add_module(names.position_bias, position_bias)
        self.has_position_bias = position_bias is not None

    def projection(self, role: str) -> nn.Linear:
        """The ``query``/``key``/``value``/``output`` (or ``fused``) linear layer."""
        return getattr(self, getattr(self.names, role))

    def _split(self, x: Tensor) -> Tensor:
        batch, time, dim = x.shape
        return x.view(batch, time, self.heads, dim // self.heads).transpose(1, 2)

    def _project(self, x: Tensor, roles: tuple[str, ...]) -> list[Tensor]:
        """``x`` through the ``roles``' projections in one matmul, split per role and head."""
        if self.names.fused:
            fused = self.projection("fused")
            joint = F.linear(x, fused.weight, fused.bias)
        else:
            layers = [self.projection(role) for role in roles]
            weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 else layers[0].weight
            biases = [layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                      for layer in layers]
            joint = F.linear(x, weight, torch.cat(biases) if len(biases) > 1 else biases[0])
        return [self._split(part) for part in joint.chunk(len(roles), dim=-1)]

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        *,
        memory: Tensor | None = None,
        cache: Any = None,
        layer: int = 0,
        position: tuple = (),
        packed: PackedBatch | None = None,
    ) -> Tensor:
        """``x`` ``(B, T, D)``; ``attn_mask`` bool (True where a key may be attended) or float
        (logits to add), broadcastable to ``(B, H, T, T_keys)``. ``packed``: ``x`` is ``(1, N, D)``,
        the real tokens of a padded batch (:mod:`d2v.nn.packing`); ``attn_mask`` is then a float
        bias on the padded grid or None."""
        if self.cross:
            (q,) = self._project(x, ("query",))
            if cache is not None and layer in cache.cross_attention:
                k, v = cache.cross_attention[layer]
            else:
                k, v = self._project(memory, ("key", "value"))
                if cache is not None:
                    cache.cross_attention[layer] = (k, v)
        else:
            q, k, v = self._project(x, ("query", "key", "value"))
            if cache is not None:
                k, v = cache.update(layer, k, v)
        if self.has_position_bias:
            own = getattr(self, self.names.position_bias)(*position)
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # allowed keys -> logits to add
                attn_mask = own.new_zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
            attn_mask = own if attn_mask is None else attn_mask + own
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if packed is not None:
            if self.cross or cache is not None:
                raise SpecError("padding-free attention is for self-attention without a key/value cache; "
                                "set padding_free: false for decoders.")
            out = packed.attention(q, k, v, attn_mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.projection("output")(out.transpose(1, 2).flatten(2))
