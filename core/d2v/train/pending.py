"""The micro-batches of the optimizer update being accumulated, kept on the device.

Reading a loss back to the host (``float(loss)``) waits for the accelerator to finish all the
work queued so far; doing that for every micro-batch keeps the GPU from running ahead of Python
and costs most with small, launch-bound batches. The runner instead keeps each micro-batch's loss
and logs as tensors and reads them, with the gradient norm, in one transfer per update -- the
only point where it must know whether the update is applied.

It also holds what normalising the update by its sample size needs (fairseq's rule for the
data2vec objectives, whose outputs carry ``sample_size``): the gradient of an update is the
gradient of the *summed* loss of all its micro-batches on all processes divided by their total
sample size, not the mean of per-micro-batch means (which weighs a short utterance's tokens more
than a long one's). Each micro-batch backpropagates ``loss * sample_size``; once the gradients are
accumulated and all-reduced, :func:`normalize_gradients` divides them by the all-reduced total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_size_of(output: Any) -> int | None:
    """The number of items an output's loss is the mean over, when it says (``sample_size``,
    data2vec objectives: the regressed positions); ``None`` for a per-batch loss (task heads,
    whose losses follow Hugging Face's batch means)."""
    size = getattr(output, "sample_size", None)
    return None if size is None or int(size) <= 0 else int(size)


def backward_loss(loss: Tensor, sample_size: int | None) -> Tensor:
    """What to backpropagate: the summed loss where the update is normalised by sample size."""
    return loss if sample_size is None else loss * sample_size


@torch.no_grad()
def normalize_gradients(grads: list[Tensor], weighted: Tensor, sample_size: Tensor, averaged_over: int) -> None:
    """Turn accumulated gradients of ``loss * sample_size`` into fairseq's per-update gradient.

    ``averaged_over``: how many micro-batch gradients the framework averaged (Accelerate divides
    each backward by ``grad_accum``, DDP/FSDP average over processes). ``weighted`` and
    ``sample_size``: the all-reduced count of weighted micro-batches and their total sample size,
    device tensors, so this reads nothing back to the host; an update without weighted
    micro-batches is left alone (multiplied by 1)."""
    if not grads:
        return
    factor = torch.where(weighted > 0, averaged_over / sample_size.clamp(min=1.0), torch.ones_like(sample_size))
    for grad in grads:
        grad.mul_(factor.to(device=grad.device, dtype=grad.dtype))


@dataclass
class _MicroBatch:
    loss: Tensor
    logs: dict[str, Any]
    examples: int
    describe: Callable[[], str]
    counted: bool  # False for a batch whose every example was left out (a zero loss, not a measurement)
    sample_size: int | None  # None: a per-batch loss, weighted 1 in the logged mean


@dataclass
class Settled:
    """What one host read says about the update: its gradient norm and why it must be skipped."""

    grad_norm: float
    bad_loss: str | None = None


@dataclass
class PendingUpdate:
    items: list[_MicroBatch] = field(default_factory=list)

    def add(self, loss: Tensor, logs: dict[str, Any] | None, examples: int, describe: Callable[[], str],
            *, counted: bool = True, sample_size: int | None = None) -> None:
        self.items.append(_MicroBatch(loss.detach(), dict(logs or {}), examples, describe, counted, sample_size))

    def counts(self, device: torch.device) -> Tensor:
        """``[non-finite losses, weighted micro-batches, total sample size]`` of this process, a
        float64 device tensor, to be summed over processes in one all-reduce."""
        weighted = [item.sample_size for item in self.items if item.sample_size is not None]
        host = torch.tensor([0.0, float(len(weighted)), float(sum(weighted))], dtype=torch.float64)
        host = host.to(device, non_blocking=True)
        if not self.items:
            return host
        losses = torch.stack([item.loss.float().to(device) for item in self.items])
        return host + F.pad((~torch.isfinite(losses)).sum().reshape(1).double(), (0, 2))

    def settle(self, grad_norm: Tensor | float, window: dict[str, Any],
               extra: Tensor | None = None) -> tuple[Settled, list[float]]:
        """Read the losses, the gradient norm and ``extra`` (numbers the update decides on, e.g.
        the all-reduced count of bad losses) back in one transfer; add the finite micro-batches
        to the logging ``window`` and forget them. Returns the update's :class:`Settled` and
        ``extra``'s values."""
        values = [torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1)]
        values += [item.loss.float().reshape(1).to(values[0].device) for item in self.items]
        extra_count = 0 if extra is None else extra.numel()
        if extra is not None:
            values.append(extra.float().reshape(-1).to(values[0].device))
        read = torch.cat(values).tolist()
        extra_values = read[len(read) - extra_count:]
        read = read[:len(read) - extra_count]
        settled = Settled(grad_norm=read[0])
        for item, loss in zip(self.items, read[1:]):
            if not math.isfinite(loss):
                settled.bad_loss = settled.bad_loss or f"loss {loss} on {item.describe()}"
            elif item.counted:
                weight = 1 if item.sample_size is None else item.sample_size
                window["loss"] += loss * weight
                window["loss_weight"] += weight
                window["micro_batches"] += 1
                window["examples"] += item.examples
                for key, value in item.logs.items():
                    if key != "loss":  # counted above
                        window[key] += value.detach() if isinstance(value, Tensor) else value
        self.items.clear()
        return settled, extra_values
