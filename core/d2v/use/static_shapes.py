"""Compiled, fixed-shape inference for ``d2v.pipeline`` / ``d2v predict --compile``.

Why buckets: a compiled model recompiles for every new input shape, and CUDA graphs replay only
the exact shapes they captured. Padding each batch's length up to a multiple of the processor's
``length_bucket`` (its ``pad_batch`` hook) leaves a handful of shapes, each compiled and (on
CUDA, ``mode: reduce-overhead``) graph-captured once, then replayed. The extra padding is masked
like any batch padding, so results are what a padded batch of the same inputs gives.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from d2v.api.errors import SpecError

if TYPE_CHECKING:
    from torch import nn


def compile_options(setting: bool | dict[str, Any], device_type: str) -> dict[str, Any]:
    """``torch.compile`` options: ``True`` = fixed shapes, and CUDA graphs on CUDA."""
    options = {} if setting is True else dict(setting)
    options.setdefault("dynamic", False)
    if device_type == "cuda":
        options.setdefault("mode", "reduce-overhead")
    return options


def compile_for_inference(model: nn.Module, setting: bool | dict[str, Any], device_type: str) -> None:
    """Compile ``model`` in place (names and weights unchanged)."""
    try:
        model.compile(**compile_options(setting, device_type))
    except TypeError as exc:
        raise SpecError(f"compile: {exc}; options are torch.compile's (backend, mode, dynamic, fullgraph, "
                        f"options).") from None


def bucket_for(processor: Any, bucket: int | None) -> int | None:
    """The length step batches are padded to: ``bucket``, else the processor's ``length_bucket``;
    None for processors whose batches have one shape already (no ``pad_batch``)."""
    if not callable(getattr(processor, "pad_batch", None)):
        if bucket is not None:
            raise SpecError(f"pad_to_multiple_of: the processor {type(processor).__name__} cannot pad a batch "
                            f"further (it has no pad_batch hook).")
        return None
    step = bucket if bucket is not None else getattr(processor, "length_bucket", None)
    if step is None or int(step) < 1:
        raise SpecError(f"pad_to_multiple_of must be a positive length, got {step}.")
    return int(step)


def padded_to_bucket(batch: dict[str, Any], processor: Any, bucket: int | None) -> dict[str, Any]:
    """``batch`` with its length rounded up to a multiple of ``bucket`` (no-op for None)."""
    if bucket is None or batch.get("padding_mask") is None:
        return batch
    length = int(batch["padding_mask"].shape[-1])  # tokens are the last axis ((B, C, T) for multiple choice)
    return processor.pad_batch(batch, math.ceil(length / bucket) * bucket)
