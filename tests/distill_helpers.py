"""Helpers shared by the objective tests (unit/test_distill.py, unit/test_distill2.py): both
objectives run on the same tiny audio model and synthetic inputs, so their tests compare."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from d2v.api import plugins
from d2v.spec.model import build_model

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}


def build_tiny(objective: dict[str, Any]) -> torch.nn.Module:
    """The ``data2vec-audio-tiny`` preset without dropout (deterministic) around ``objective``."""
    return build_model({"preset": "data2vec-audio-tiny", "encoder": NO_DROPOUT, "objective": objective},
                       plugins.registry(), "pretrain")


def waves(batch: int = 2, samples: int = 4800, seed: int = 0) -> dict:
    """Noisy sines of random pitch: learnable structure at 16 kHz, no data files needed."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    freq = 200 + 600 * torch.rand(batch, 1, generator=g)
    x = torch.sin(2 * math.pi * freq * t) + 0.1 * torch.randn(batch, samples, generator=g)
    return {"inputs": x, "padding_mask": torch.zeros(batch, samples, dtype=torch.bool)}


def train_on_waves(model: torch.nn.Module, steps: int = 30, transform: Callable[[dict], dict] | None = None):
    """Adam on 4 alternating wave batches with the runner's EMA hook after every update, as the
    runner does it; returns the per-step losses and the last output."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(1, steps + 1):
        batch = waves(batch=4, seed=step % 4)
        out = model(batch if transform is None else transform(batch))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step(step)
        losses.append(float(out.logs["loss"]))
    return losses, out
