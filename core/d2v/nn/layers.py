"""Small building blocks every modality's model code shares."""

from __future__ import annotations

from typing import Any

import torch
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


class FeedForward(nn.Module):
    """``drop2(fc2(drop1(act(fc1(x)))))``. ``output_dropout`` (timm ``Mlp``'s ``drop2``, BEiT and
    data2vec 2.0 use it) is part of the output; the speech/text layers' dropout after the FFN
    belongs to the block instead, since the output *before* it is data2vec's target feature."""

    def __init__(self, dim: int, ffn_dim: int, activation: str, activation_dropout: float = 0.0,
                 output_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.activation = make_activation(activation)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.output_dropout = nn.Dropout(output_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_dropout(self.fc2(self.activation_dropout(self.activation(self.fc1(x)))))


def run_layer(encoder: nn.Module, block: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
    """Call one Transformer block of ``encoder``; with ``encoder.gradient_checkpointing`` on
    (``trainer.gradient_checkpointing``) and gradients being recorded, keep only its inputs and
    recompute its activations in the backward pass: roughly one block's activations in memory
    instead of all of them, for about a third more compute. Dropout masks are replayed exactly."""
    if getattr(encoder, "gradient_checkpointing", False) and encoder.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
