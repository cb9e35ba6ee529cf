"""fairseq weight names -> d2v's: the name tables every fairseq importer declares, and their checked collection.

A converter writes out, from the checkpoint's config, the complete list of weights the fairseq
model has (:class:`Rename`: d2v name <- fairseq name, with an optional slice for fused tensors)
and :func:`collect` pulls them from the checkpoint. Writing the list out (rather than matching
whatever names the file holds) is what lets a missing weight be reported by its fairseq name
(:func:`check_complete`), and lets every tensor the table does not mention be reported as not
imported, or refused (:func:`refuse_unaccounted`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from d2v.api.errors import SpecError

__all__ = ["Rename", "ShapeMismatch", "check_complete", "chunk", "collect", "collect_ema", "fused_qkv", "linear",
           "prefixed", "rebased", "refuse_unaccounted", "reshaped"]

#: how a missing weight is described when the importer says nothing more specific
MISSING = "weight(s) its config implies"


@dataclass(frozen=True)
class Rename:
    """d2v weight ``ours`` comes from fairseq weight ``theirs`` (through ``take``, e.g. one
    third of a fused ``qkv``); ``decided_by`` names the config settings that fix the shape
    ``take`` expects, for the error when the file's tensor has another."""

    ours: str
    theirs: str
    take: Callable[[Tensor], Tensor] | None = None
    decided_by: str = ""


def linear(ours: str, theirs: str, bias: bool = True) -> list[Rename]:
    """A module's ``weight`` (and ``bias``) under both prefixes."""
    names = ("weight", "bias") if bias else ("weight",)
    return [Rename(f"{ours}.{n}", f"{theirs}.{n}") for n in names]


def fused_qkv(ours: Sequence[str], theirs: str, bias: bool = True) -> list[Rename]:
    """The query, key and value modules ``ours`` (three names) from one fused projection
    ``theirs`` whose rows are q, k, v in that order."""
    names = ("weight", "bias") if bias else ("weight",)
    return [Rename(f"{module}.{n}", f"{theirs}.{n}", chunk(part, 3)) for part, module in enumerate(ours) for n in names]


def prefixed(table: Iterable[Rename], ours: str = "", theirs: str = "") -> list[Rename]:
    """``table`` with both sides' names prefixed (a backbone inside a CTC model, a teacher)."""
    return [replace(r, ours=ours + r.ours, theirs=theirs + r.theirs) for r in table]


def rebased(table: Iterable[Rename], ours_from: str, ours_to: str, theirs_from: str, theirs_to: str) -> list[Rename]:
    """The entries under ``ours_from``/``theirs_from``, moved to ``ours_to``/``theirs_to`` (the
    encoder's names inside an EMA teacher)."""
    out = []
    for r in table:
        if r.ours.startswith(ours_from) and r.theirs.startswith(theirs_from):
            out.append(replace(r, ours=ours_to + r.ours[len(ours_from):], theirs=theirs_to + r.theirs[len(theirs_from):]))
    return out


class ShapeMismatch(ValueError):
    """A ``take`` got a tensor of another size than the config implies (message: the shape it needs)."""


def _shown(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_complete(weights: Collection[str], names: Iterable[str], where: str, what: str = MISSING) -> None:
    """A SpecError naming, in table order, every one of ``names`` (fairseq names) that
    ``weights`` lacks; ``what`` says what they are (``tensors of the ... model``)."""
    missing = [n for n in dict.fromkeys(names) if n not in weights]
    if missing:
        raise SpecError(
            f"{where}: the checkpoint lacks {len(missing)} {what}: {_shown(missing)}. The file is incomplete "
            f"(download it again), or its config does not describe its weights (compare cfg.model with the tensor "
            f"names)."
        )


def collect(table: Iterable[Rename], weights: dict[str, Tensor], where: str,
            what: str = MISSING) -> tuple[dict[str, Tensor], set[str]]:
    """d2v state dict (float32 copies) and the fairseq names used; a SpecError names every
    weight the table expects and ``weights`` lacks (:func:`check_complete`)."""
    table = list(table)
    check_complete(weights, (r.theirs for r in table), where, what)
    state = {}
    for r in table:
        tensor = weights[r.theirs]
        if r.take:
            try:
                tensor = r.take(tensor)
            except ShapeMismatch as err:
                raise SpecError(
                    f"{where}: {r.theirs} has shape {tuple(tensor.shape)}, but the config ({r.decided_by}) implies "
                    f"{err}. The config does not describe this tensor: correct those settings to match the file "
                    f"(or use the file the config belongs to)."
                ) from None
        state[r.ours] = tensor.detach().clone().float().contiguous()
    return state, {r.theirs for r in table}


def collect_ema(table: Iterable[Rename], ema: dict[str, Tensor], where: str,
                what: str = MISSING) -> tuple[dict[str, Tensor], set[str]]:
    """:func:`collect` from fairseq's EMA teacher (``model["_ema"]``), whose tensors are named
    ``_ema.<name>`` in the names used and in the error (as the import report names them)."""
    return collect(prefixed(table, theirs="_ema."), {f"_ema.{k}": v for k, v in ema.items()}, where, what)


def refuse_unaccounted(weights: dict[str, Tensor], used: set[str], prefixes: tuple[str, ...], where: str,
                       settings: str) -> None:
    """A SpecError naming the backbone tensors (names under ``prefixes``) that the table built
    from the config did not take: the config describes a smaller model than the file holds (fewer
    layers or blocks), which fairseq's strict ``load_state_dict`` refuses too."""
    extra = sorted(n for n in weights if n.startswith(prefixes) and n not in used)
    if extra:
        raise SpecError(
            f"{where}: the file holds {len(extra)} backbone tensor(s) its config does not account for: "
            f"{_shown(extra)}. The config ({settings}) describes a smaller model than the weights; correct it to "
            f"match the file (or use the file the config belongs to)."
        )


def chunk(index: int, parts: int) -> Callable[[Tensor], Tensor]:
    """Part ``index`` of ``parts`` equal slices along dim 0 (q, k, v of a fused projection)."""

    def take(tensor: Tensor) -> Tensor:
        return tensor.chunk(parts, dim=0)[index]

    return take


def reshaped(*shape: int) -> Callable[[Tensor], Tensor]:
    """The tensor viewed as ``shape`` (a :class:`ShapeMismatch` when the sizes differ)."""

    def take(tensor: Tensor) -> Tensor:
        if tensor.numel() != math.prod(shape):
            raise ShapeMismatch(f"{math.prod(shape)} values, viewed as {shape}")
        return tensor.reshape(*shape)

    return take
