"""The micro-batches of the optimizer update being accumulated, kept on the device.

Reading a loss back to the host (``float(loss)``) waits for the accelerator to finish all the
work queued so far; doing that for every micro-batch keeps the GPU from running ahead of Python
and costs most with small, launch-bound batches. The runner instead keeps each micro-batch's loss
and logs as tensors and reads them, with the gradient norm, in one transfer per update -- the
only point where it must know whether the update is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class _MicroBatch:
    loss: Tensor
    logs: dict[str, Any]
    examples: int
    describe: Callable[[], str]
    counted: bool  # False for a batch whose every example was left out (a zero loss, not a measurement)


@dataclass
class Settled:
    """What one host read says about the update: its gradient norm and why it must be skipped."""

    grad_norm: float
    bad_loss: str | None = None


@dataclass
class PendingUpdate:
    items: list[_MicroBatch] = field(default_factory=list)

    def add(self, loss: Tensor, logs: dict[str, Any] | None, examples: int, describe: Callable[[], str],
            *, counted: bool = True) -> None:
        self.items.append(_MicroBatch(loss.detach(), dict(logs or {}), examples, describe, counted))

    def non_finite_count(self, device: torch.device) -> Tensor:
        """How many accumulated losses are not finite, as a device tensor (for an all-reduce)."""
        if not self.items:
            return torch.zeros((), device=device)
        losses = torch.stack([item.loss.float().to(device) for item in self.items])
        return (~torch.isfinite(losses)).sum().float()

    def settle(self, grad_norm: Tensor | float, window: dict[str, Any], extra: Tensor | None = None) -> tuple[Settled, float]:
        """Read the losses, the gradient norm and ``extra`` (e.g. the all-reduced count of bad
        losses) back in one transfer; add the finite micro-batches to the logging ``window``
        and forget them. Returns the update's :class:`Settled` and ``extra`` as a float."""
        values = [torch.as_tensor(grad_norm, dtype=torch.float32).reshape(())]
        values += [item.loss.float().reshape(()).to(values[0].device) for item in self.items]
        if extra is not None:
            values.append(extra.float().reshape(()).to(values[0].device))
        read = torch.stack(values).tolist()
        extra_value = read.pop() if extra is not None else 0.0
        settled = Settled(grad_norm=read[0])
        for item, loss in zip(self.items, read[1:]):
            if not math.isfinite(loss):
                settled.bad_loss = settled.bad_loss or f"loss {loss} on {item.describe()}"
            elif item.counted:
                window["loss"] += loss
                window["micro_batches"] += 1
                window["examples"] += item.examples
                for key, value in item.logs.items():
                    if key != "loss":  # counted above
                        window[key] += value.detach() if isinstance(value, Tensor) else value
        self.items.clear()
        return settled, extra_value
