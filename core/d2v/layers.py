"""Small building blocks every modality's model code shares."""

from __future__ import annotations

from torch import nn

from d2v.errors import SpecError

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
