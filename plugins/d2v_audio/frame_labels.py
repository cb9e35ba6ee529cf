"""Segments (start, end, label) -> per-frame multi-hot label rows at the model's frame rate.

data2vec-audio's conv stack emits frame ``t`` from samples ``[t * shift, t * shift + length)``
(``shift`` 320 and ``length`` 400 at 16 kHz: 20 ms hop, 25 ms window), so an utterance of
``S`` samples has ``floor((S - length) / shift) + 1`` frames. A label is active in a frame when
one of its segments covers the frame's centre, ``t * shift + length / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100.0


def num_label_frames(num_samples: int, *, shift: int, length: int) -> int:
    """Frames a conv stack with hop ``shift`` and receptive field ``length`` makes (at least 1)."""
    return max(1, (int(num_samples) - length) // shift + 1)


def segments_to_frames(
    segments: Sequence[tuple[float, float, int]],
    num_samples: int,
    num_labels: int,
    *,
    sample_rate: int,
    shift: int = 320,
    length: int = 400,
) -> torch.Tensor:
    """``(frames, num_labels)`` float rows of 0/1 for ``segments`` given in seconds."""
    frames = num_label_frames(num_samples, shift=shift, length=length)
    centres = (torch.arange(frames, dtype=torch.float64) * shift + length / 2) / sample_rate
    rows = torch.zeros(frames, num_labels)
    for start, end, label in segments:
        rows[(centres >= start) & (centres < end), int(label)] = 1.0
    return rows


def pad_frame_labels(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``(F_i, L)`` rows into ``(B, max F, L)``, padded frames set to -100 (ignored)."""
    longest = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), longest, rows[0].shape[1]), IGNORE)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def shift_segments(segments: Sequence[tuple[float, float, int]], offset_seconds: float,
                   duration_seconds: float) -> list[tuple[float, float, int]]:
    """Segments relative to a crop starting at ``offset_seconds`` and lasting ``duration_seconds``."""
    shifted = []
    for start, end, label in segments:
        start, end = max(0.0, start - offset_seconds), min(duration_seconds, end - offset_seconds)
        if end > start:
            shifted.append((start, end, label))
    return shifted
