"""The data2vec teacher: an exponential moving average (EMA) of the student, kept in fp32.

data2vec regresses the student onto the representations of a teacher whose weights follow
the student, ``teacher = decay * teacher + (1 - decay) * student``, with ``decay`` rising
linearly from ``start`` to ``end`` over the first ``anneal_steps`` updates
(:func:`annealed_decay`). The EMA is done in fp32 (the paper: "for numerical stability") even
when the student trains in bf16/fp16. Parameters named by ``copy_keys`` (fairseq's
``skip_keys``, e.g. the audio positional conv) are copied from the student instead of
averaged, so they are effectively shared.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from d2v.api.errors import SpecError

__all__ = ["EMATeacher", "annealed_decay", "matches_any"]


def annealed_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """EMA decay at ``step``: linear from ``start`` (step 0) to ``end`` (step ``anneal_steps``), then ``end``.

    fairseq's ``get_annealed_rate``: ``end - (end - start) * (1 - step / anneal_steps)``;
    ``anneal_steps == 0`` means a constant ``end``.
    """
    if anneal_steps < 0:
        raise SpecError(f"anneal_steps must be >= 0, got {anneal_steps}.")
    if anneal_steps == 0 or step >= anneal_steps:
        return float(end)
    return float(end - (end - start) * (1.0 - step / anneal_steps))


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Does parameter ``name`` match one of ``patterns``?

    A plain pattern matches whole dotted components anywhere in the name (``"pos_conv"``
    matches ``"encoder.pos_conv.0.weight"`` but not ``"pos_conv_x.weight"``); a pattern with
    glob characters (``*?[``) is matched against the full name with :func:`fnmatch.fnmatchcase`.
    """
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif f".{pattern}." in f".{name}.":
            return True
    return False


class EMATeacher(nn.Module):
    """An fp32 EMA copy of a student module, used as data2vec's teacher.

    ``EMATeacher(student_module, copy_keys=("pos_conv",))`` deep-copies the module (pass the
    part the recipe averages, e.g. only the Transformer encoder for data2vec 1.0 audio),
    casts it to fp32, turns off ``requires_grad`` and keeps it in eval mode (no dropout or
    layerdrop), even when a parent calls ``.train()`` (``eval_mode=False`` lets it follow).
    Calling the teacher runs the copied module. It is an ``nn.Module`` so it moves with its
    parent (``.to(device)``) and its ``state_dict`` (keys ``model.<param>``) checkpoints and
    restores it exactly; a parent's ``.half()``/``.to(bfloat16)`` leaves it in fp32.

    Call :meth:`update` after each optimizer step.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        copy_keys: Sequence[str] = (),
        fp32: bool = True,
        eval_mode: bool = True,
    ):
        super().__init__()
        if isinstance(copy_keys, str):
            copy_keys = (copy_keys,)
        self.copy_keys = tuple(copy_keys)
        self.fp32 = bool(fp32)
        self.eval_mode = bool(eval_mode)
        model = copy.deepcopy(student)
        if self.fp32:
            model.float()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # deepcopy carries the student's .grad along
        self.model = model
        self.train(student.training)

    # -- nn.Module plumbing ------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> EMATeacher:
        """Record ``mode`` but keep the copied module in eval mode unless ``eval_mode=False``."""
        self.training = mode
        self.model.train(mode and not self.eval_mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> EMATeacher:
        super()._apply(fn, recurse)
        if self.fp32:
            self.model.float()  # a dtype change from a parent must not leave the EMA in half precision
        return self

    def extra_repr(self) -> str:
        return f"copy_keys={self.copy_keys}, fp32={self.fp32}, eval_mode={self.eval_mode}"

    # -- the EMA -----------------------------------------------------------------------

    def _pairs(self, student: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            missing = sorted(teacher_params.keys() - student_params.keys())
            extra = sorted(student_params.keys() - teacher_params.keys())
            raise ValueError(
                "EMATeacher.update: the student's parameters do not match the teacher's "
                f"(missing from student: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"not in teacher: {extra[:5]}{'...' if len(extra) > 5 else ''}). Pass the same "
                "module the teacher was built from (unwrapped, not the DDP/compiled wrapper)."
            )
        pairs = []
        for name, t in teacher_params.items():
            s = student_params[name]
            if s.shape != t.shape:
                raise ValueError(f"EMATeacher.update: '{name}' has shape {tuple(s.shape)} in the student, {tuple(t.shape)} in the teacher.")
            pairs.append((name, t, s))
        return pairs

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> bool:
        """``teacher = decay * teacher + (1 - decay) * student`` in the teacher's precision.

        Parameters matching ``copy_keys``, and parameters the student does not train
        (``requires_grad=False``), are copied as fairseq does; buffers are copied.
        ``decay == 1.0`` means a frozen teacher: nothing is touched (fairseq skips the EMA
        step then too). Returns whether the teacher changed.
        """
        decay = float(decay)
        if not (0.0 <= decay <= 1.0):
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        if decay == 1.0:
            return False

        avg_t: list[torch.Tensor] = []
        avg_s: list[torch.Tensor] = []
        for name, t, s in self._pairs(student):
            value = s.detach().to(device=t.device, dtype=t.dtype)
            if not s.requires_grad or matches_any(name, self.copy_keys):
                t.copy_(value)
            else:
                avg_t.append(t)
                avg_s.append(value)
        if avg_t:
            torch._foreach_mul_(avg_t, decay)
            torch._foreach_add_(avg_t, avg_s, alpha=1.0 - decay)

        self._copy_buffers(student)
        return True

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Make the teacher an exact (fp32) copy of ``student`` again (e.g. data2vec ViT-L's second stage)."""
        for _, t, s in self._pairs(student):
            t.copy_(s.detach())
        self._copy_buffers(student)

    def _copy_buffers(self, student: nn.Module) -> None:
        teacher_buffers = dict(self.model.named_buffers())
        for name, b in student.named_buffers():
            t = teacher_buffers.get(name)
            if t is not None and t.shape == b.shape:
                t.copy_(b.detach())
