"""``trainer.gradient_checkpointing`` and ``trainer.compile``: both act on the Transformer blocks
of every encoder in the model (``encoder.layers``, called through :func:`d2v.layers.run_layer`).

Blocks rather than the whole model: a block is pure tensor code with one shape pattern, so
``torch.compile`` traces it without graph breaks and, with dynamic shapes, without recompiling for
every batch length, while the objective's Python (masking, the EMA update, logging) stays eager.
``nn.Module.compile`` works in place, so parameter names, checkpoints and the EMA teacher's copy of
the weights are unchanged; the teacher's blocks are compiled too (its forward is a large share of
pretraining).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from d2v.errors import SpecError
from d2v.interfaces import Encoder


def encoders(model: nn.Module) -> list[Encoder]:
    """Every encoder in ``model`` (the student's and, in pretraining, the EMA teacher's)."""
    found = [m for m in model.modules() if isinstance(m, Encoder)]
    missing = [type(m).__name__ for m in found if not isinstance(getattr(m, "layers", None), nn.ModuleList)]
    if missing:
        raise SpecError(f"trainer.gradient_checkpointing / trainer.compile act on an encoder's Transformer blocks "
                        f"in 'self.layers' (an nn.ModuleList), which {', '.join(sorted(set(missing)))} does not have; "
                        "turn the option off or give the encoder a 'layers' list (docs/writing-a-plugin.md).")
    return found


def apply_layer_options(model: nn.Module, *, gradient_checkpointing: bool = False,
                        compile: bool | dict[str, Any] = False) -> list[str]:
    """Switch the options on; returns what was done, for the run log."""
    done: list[str] = []
    if not (gradient_checkpointing or compile):
        return done
    found = encoders(model)
    if gradient_checkpointing:
        for encoder in found:
            encoder.gradient_checkpointing = True
        done.append(f"activation checkpointing in {sum(len(e.layers) for e in found)} Transformer blocks")
    if compile:
        options = {} if compile is True else dict(compile)
        for encoder in found:
            for layer in encoder.layers:
                layer.compile(**options)
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        done.append(f"torch.compile ({shown}) on {sum(len(e.layers) for e in found)} Transformer blocks")
    return done
