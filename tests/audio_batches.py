"""Padded waveform batches for the audio parity tests (unit/parity share them)."""

from __future__ import annotations

import torch

#: three utterances of different lengths, so every batch has padding
LENGTHS = (4000, 3100, 1700)


def padded_batch(seed: int = 1, lengths=LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    """Random waveforms zero-padded to the longest, and HF's ``attention_mask`` (1 = real)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(len(lengths), max(lengths), generator=g)
    attention_mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        attention_mask[i, :n] = 1
        inputs[i, n:] = 0.0  # as the HF processor pads
    return inputs, attention_mask
