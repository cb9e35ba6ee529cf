"""Small building blocks every modality's model code shares."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from d2v.api.errors import SpecError

#: activation names as Hugging Face's ``ACT2FN`` spells them (the subset d2v supports);
#: ``gelu`` is the exact erf form, ``gelu_new``/``gelu_pytorch_tanh`` the tanh approximation
ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """``nn.Module`` for an activation name."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise SpecError(f"unknown activation '{name}'; supported: {', '.join(sorted(ACTIVATIONS))}.") from None


class MultiHeadAttention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention`` (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``, as fairseq and most Hugging Face speech/text models name them).

    Self-attention takes keys/values from ``x``; with ``cross=True`` they come from ``memory``
    (the states of another encoder). For incremental decoding pass a ``cache``: any object with
    ``update(layer, keys, values) -> (all_keys, all_values)`` (self-attention keys/values grow by
    the new tokens) and a dict ``cross_attention`` (``layer -> (keys, values)``, projected once).
    """

    def __init__(self, dim: int, heads: int, dropout: float, *, cross: bool = False):
        super().__init__()
        if dim % heads:
            raise SpecError(f"encoder dim {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.dropout = dropout
        self.cross = cross
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        batch, time, dim = x.shape
        return x.view(batch, time, self.heads, dim // self.heads).transpose(1, 2)

    def _keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        *,
        memory: Tensor | None = None,
        cache: Any = None,
        layer: int = 0,
    ) -> Tensor:
        """``x`` ``(B, T, D)``; ``attn_mask`` bool, broadcastable to ``(B, H, T, T_keys)``, True
        where a key may be attended."""
        q = self._split(self.q_proj(x))
        if self.cross:
            if cache is not None and layer in cache.cross_attention:
                k, v = cache.cross_attention[layer]
            else:
                k, v = self._keys_values(memory)
                if cache is not None:
                    cache.cross_attention[layer] = (k, v)
        else:
            k, v = self._keys_values(x)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """``fc2(dropout(act(fc1(x))))``; the output dropout belongs to the layer, since the output
    *before* it is data2vec's target feature (speech, text and 2.0)."""

    def __init__(self, dim: int, ffn_dim: int, activation: str, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.activation = make_activation(activation)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


def run_layer(encoder: nn.Module, block: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
    """Call one Transformer block of ``encoder``; with ``encoder.gradient_checkpointing`` on
    (``trainer.gradient_checkpointing``) and gradients being recorded, keep only its inputs and
    recompute its activations in the backward pass: roughly one block's activations in memory
    instead of all of them, for about a third more compute. Dropout masks are replayed exactly."""
    if getattr(encoder, "gradient_checkpointing", False) and encoder.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
