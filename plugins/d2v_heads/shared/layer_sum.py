"""What the audio task heads share: the learned weighted sum of layers and valid-frame counts.

SUPERB-style probing (s3prl) and Hugging Face's ``use_weighted_layer_sum`` let a head read a
softmax-weighted average of every hidden state instead of the last one, because speaker and
paralinguistic information peaks in the middle layers of a speech encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import EncoderOutput


def weighted_layer_sum(layer_weights: Tensor, hidden_states: tuple[Tensor, ...] | None) -> Tensor:
    """``sum_i softmax(w)_i * hidden_states[i]`` over the ``num_layers + 1`` hidden states
    (the embedded input, then every layer)."""
    if not hidden_states:
        raise SpecError("use_weighted_layer_sum: the encoder returned no hidden_states; the head asks for them "
                        "through needs_hidden_states, so call it through d2v.spec.model.TaskModel.")
    if len(hidden_states) != layer_weights.numel():
        raise SpecError(
            f"use_weighted_layer_sum: the head has {layer_weights.numel()} layer weights but the encoder returned "
            f"{len(hidden_states)} hidden states; set the head's num_layers to the encoder's layer count "
            f"({len(hidden_states) - 1})."
        )
    stacked = torch.stack(tuple(hidden_states), dim=1)  # (B, L+1, T, D)
    weights = torch.softmax(layer_weights, dim=-1)
    return (stacked * weights.view(-1, 1, 1)).sum(dim=1)


def make_layer_weights(use_weighted_layer_sum: bool, num_layers: int | None) -> nn.Parameter | None:
    """HF's ``layer_weights = ones(num_layers + 1) / (num_layers + 1)`` (uniform at the start; the
    head stores it under HF's name ``layer_weights``), or None when unused."""
    if not use_weighted_layer_sum:
        return None
    if num_layers is None or int(num_layers) < 1:
        raise SpecError(f"use_weighted_layer_sum needs num_layers (the encoder's layer count), got {num_layers!r}.")
    count = int(num_layers) + 1
    return nn.Parameter(torch.ones(count) / count)


def head_input(encoder_output: EncoderOutput, layer_weights: Tensor | None) -> Tensor:
    """The ``(B, T, D)`` features a head reads: the weighted layer sum, or the last hidden state."""
    if layer_weights is None:
        return encoder_output.last_hidden_state
    return weighted_layer_sum(layer_weights, encoder_output.hidden_states)


def valid_frames(padding_mask: Tensor | None, batch_size: int, frames: int, device: torch.device) -> Tensor:
    """Valid frames per example ``(B,)`` from a padding mask (True at padding); all frames without one."""
    if padding_mask is None:
        return torch.full((batch_size,), frames, dtype=torch.long, device=device)
    return (~padding_mask.bool()).sum(-1).to(device=device, dtype=torch.long)
