"""Learning-rate schedules of the data2vec recipes, as multipliers of each group's lr."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from d2v.api.errors import SpecError


def tri_stage_factor(step: int, total_steps: int, phase_ratio: Sequence[float], init_lr_scale: float,
                     final_lr_scale: float) -> float:
    """wav2vec 2.0 / data2vec tri-stage: linear warmup from ``init_lr_scale``, hold at
    peak, then exponential decay to ``final_lr_scale`` (fairseq ``tri_stage``)."""
    warmup = int(total_steps * phase_ratio[0])
    hold = int(total_steps * phase_ratio[1])
    decay = int(total_steps * phase_ratio[2])
    if step < warmup:
        return init_lr_scale + (1.0 - init_lr_scale) * step / max(1, warmup)
    step -= warmup
    if step < hold:
        return 1.0
    step -= hold
    if step <= decay:
        return math.exp(math.log(final_lr_scale) * step / max(1, decay))
    return final_lr_scale


def cosine_factor(step: int, total_steps: int, warmup_steps: int, final_lr_scale: float) -> float:
    """Linear warmup from 0, then half a cosine down to ``final_lr_scale``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr_scale + (1.0 - final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def polynomial_factor(step: int, total_steps: int, warmup_steps: int, power: float, final_lr_scale: float) -> float:
    """Linear warmup from 0, then ``(1 - progress) ** power`` down to ``final_lr_scale``
    (fairseq ``polynomial_decay``; ``power=1`` is the linear decay of the RoBERTa/data2vec
    GLUE recipes)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr_scale + (1.0 - final_lr_scale) * (1.0 - progress) ** power


def _warmup(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None:
        return warmup_steps
    return int(total_steps * (warmup_ratio or 0.0))


def tri_stage(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    phase_ratio: Sequence[float] = (0.1, 0.4, 0.5),
    init_lr_scale: float = 0.01,
    final_lr_scale: float = 0.05,
) -> torch.optim.lr_scheduler.LambdaLR:
    if len(phase_ratio) != 3 or abs(sum(phase_ratio) - 1.0) > 1e-6:
        raise SpecError(f"schedule.phase_ratio must be three fractions summing to 1, got {list(phase_ratio)}.")
    if final_lr_scale <= 0:
        raise SpecError(f"schedule.final_lr_scale must be > 0 for tri_stage's exponential decay, got {final_lr_scale}; "
                        "for a decay to 0 use {name: cosine} or {name: polynomial}.")
    ratio = tuple(phase_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: tri_stage_factor(s, total_steps, ratio, init_lr_scale, final_lr_scale)
    )


def cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    final_lr_scale: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = _warmup(total_steps, warmup_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_factor(s, total_steps, warm, final_lr_scale))


def constant(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = _warmup(total_steps, warmup_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warm)) if warm else 1.0)


def polynomial(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    power: float = 1.0,
    final_lr_scale: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = _warmup(total_steps, warmup_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: polynomial_factor(s, total_steps, warm, power, final_lr_scale)
    )
