"""fairseq's data2vec 2.0 ``AltBlock`` (fused-qkv ``AltAttention`` + timm ``Mlp``), shared by the
three modality references: random weights under fairseq's names, and its eval-mode forward
written out with plain torch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(x: Tensor, state: dict[str, Tensor], name: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def linear(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def block_state(prefix: str, dim: int, hidden: int, gen: torch.Generator) -> dict[str, Tensor]:
    """One ``AltBlock``: LayerNorms ``norm1``/``norm2``, ``AltAttention`` (fused ``qkv`` with bias,
    ``proj``), timm ``Mlp`` (``fc1``, ``fc2``)."""

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    return {
        f"{prefix}norm1.weight": 1 + rand(dim), f"{prefix}norm1.bias": rand(dim),
        f"{prefix}attn.qkv.weight": rand(3 * dim, dim), f"{prefix}attn.qkv.bias": rand(3 * dim),
        f"{prefix}attn.proj.weight": rand(dim, dim), f"{prefix}attn.proj.bias": rand(dim),
        f"{prefix}norm2.weight": 1 + rand(dim), f"{prefix}norm2.bias": rand(dim),
        f"{prefix}mlp.fc1.weight": rand(hidden, dim), f"{prefix}mlp.fc1.bias": rand(hidden),
        f"{prefix}mlp.fc2.weight": rand(dim, hidden), f"{prefix}mlp.fc2.bias": rand(dim),
    }


def alt_block(x: Tensor, state: dict[str, Tensor], prefix: str, heads: int, eps: float, *,
              layer_norm_first: bool = False, padding_mask: Tensor | None = None,
              alibi_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``AltBlock.forward`` in eval mode (dropouts and drop-path are identities): the output and
    ``ffn_targets`` (the MLP output before the residual)."""

    def attention(h: Tensor) -> Tensor:  # AltAttention: scores in fp32, bias added, -inf at padded keys
        b, n, c = h.shape
        qkv = linear(h, state, f"{prefix}attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
        if alibi_bias is not None:
            scores = scores.clone()
            scores[:, : alibi_bias.shape[1]] += alibi_bias
        if padding_mask is not None and bool(padding_mask.any()):
            scores = scores.masked_fill(padding_mask[:, None, None, :].bool(), float("-inf"))
        out = (scores.softmax(-1, dtype=torch.float32) @ v).transpose(1, 2).reshape(b, n, c)
        return linear(out, state, f"{prefix}attn.proj")

    def mlp(h: Tensor) -> Tensor:  # timm Mlp: fc1 -> GELU (exact) -> fc2
        return linear(F.gelu(linear(h, state, f"{prefix}mlp.fc1")), state, f"{prefix}mlp.fc2")

    if layer_norm_first:  # fairseq: r = x = mlp(norm2(x)); x = r + drop(x) -- no residual around the MLP
        x = x + attention(layer_norm(x, state, f"{prefix}norm1", eps))
        t = mlp(layer_norm(x, state, f"{prefix}norm2", eps))
        return t + t, t
    x = layer_norm(x + attention(x), state, f"{prefix}norm1", eps)
    t = mlp(x)
    return layer_norm(x + t, state, f"{prefix}norm2", eps), t
