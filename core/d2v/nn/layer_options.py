"""What acts on the Transformer blocks of every encoder in the model (``Encoder.transformer_blocks()``,
each called through :func:`d2v.nn.layers.run_layer`): ``trainer.gradient_checkpointing``,
``trainer.compile`` and FSDP's shard units.

Blocks rather than the whole model: a block is pure tensor code with one shape pattern, so
``torch.compile`` traces it without graph breaks and, with dynamic shapes, without recompiling for
every batch length, while the objective's Python (masking, the EMA update, logging) stays eager.
``nn.Module.compile`` works in place, so parameter names, checkpoints and the EMA teacher's copy of
the weights are unchanged; the teacher's blocks are compiled too (its forward is a large share of
pretraining). FSDP shards per block for the same reason: one all-gather per block in forward, its
memory freed right after, whichever encoder (built-in or plugin) the blocks belong to.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from d2v.api.errors import SpecError
from d2v.api.interfaces import Encoder


def encoders(model: nn.Module) -> list[Encoder]:
    """Every encoder in ``model`` (the student's and, in pretraining, the EMA teacher's)."""
    return [m for m in model.modules() if isinstance(m, Encoder)]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every Transformer block of every encoder in ``model``, as each encoder declares them."""
    return [block for encoder in encoders(model) for block in encoder.transformer_blocks()]


def apply_layer_options(model: nn.Module, *, gradient_checkpointing: bool = False,
                        compile: bool | dict[str, Any] = False) -> list[str]:
    """Switch the options on; returns what was done, for the run log."""
    done: list[str] = []
    if not (gradient_checkpointing or compile):
        return done
    blocks = transformer_blocks(model)
    if gradient_checkpointing:
        for encoder in encoders(model):
            encoder.gradient_checkpointing = True
        done.append(f"activation checkpointing in {len(blocks)} Transformer blocks")
    if compile:
        options = {} if compile is True else dict(compile)
        for block in blocks:
            block.compile(**options)
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        done.append(f"torch.compile ({shown}) on {len(blocks)} Transformer blocks")
    return done


def set_padding_free(model: nn.Module, on: bool = True) -> int:
    """Switch ``padding_free`` (:mod:`d2v.nn.packing`) on or off in every encoder of ``model``
    that has it, e.g. a model from ``d2v.from_pretrained`` or a pipeline's; returns how many.
    An encoder without the option is an error when asked to switch it on."""
    found = [e for e in encoders(model) if hasattr(e, "padding_free")]
    if on and not found:
        names = ", ".join(sorted({type(e).__name__ for e in encoders(model)})) or "none"
        raise SpecError(f"padding_free: no encoder of this model can leave the padding out (encoders: {names}); "
                        f"the audio and text Transformer encoders can.")
    for encoder in found:
        encoder.padding_free = bool(on)
    return len(found)
