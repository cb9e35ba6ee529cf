"""Shared tools of the fairseq speech importers: weight-name tables and config values.

A converter writes out, from the checkpoint's config, the complete list of weights the fairseq
model has (:class:`Rename`: d2v name <- fairseq name, with an optional slice for fused tensors)
and :func:`collect` pulls them from the checkpoint. Writing the list out (rather than matching
whatever names the file holds) is what lets a missing weight be reported by its fairseq name,
and lets every tensor the table does not mention be reported as not imported.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from torch import Tensor

from d2v.api.errors import SpecError

#: fairseq activation names (``fairseq.utils.get_activation_fn``) -> d2v's
ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "relu": "relu",
               "swish": "silu", "tanh": "tanh"}


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


def collect(table: Iterable[Rename], weights: dict[str, Tensor], where: str) -> tuple[dict[str, Tensor], set[str]]:
    """d2v state dict and the fairseq names used; a SpecError names every weight the table
    expects and ``weights`` lacks."""
    table = list(table)
    missing = sorted({r.theirs for r in table if r.theirs not in weights})
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise SpecError(
            f"{where}: the checkpoint lacks {len(missing)} weight(s) its config implies: {shown}. The file is "
            f"incomplete, or its config does not describe its weights (compare cfg.model with the tensor names)."
        )
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


def refuse_unaccounted(weights: dict[str, Tensor], used: set[str], prefixes: tuple[str, ...], where: str,
                       settings: str) -> None:
    """A SpecError naming the backbone tensors (names under ``prefixes``) that the table built
    from the config did not take: the config describes a smaller model than the file holds (fewer
    layers or conv blocks, no ALiBi), which fairseq's strict ``load_state_dict`` refuses too."""
    extra = sorted(n for n in weights if n.startswith(prefixes) and n not in used)
    if extra:
        shown = ", ".join(extra[:12]) + (f" and {len(extra) - 12} more" if len(extra) > 12 else "")
        raise SpecError(
            f"{where}: the file holds {len(extra)} backbone tensor(s) its config does not account for: {shown}. "
            f"The config ({settings}) describes a smaller model than the weights; correct it to match the file "
            f"(or use the file the config belongs to)."
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


# --------------------------------------------------------------------------- config values


def conv_layers(spec: str, where: str) -> list[tuple[int, int, int]]:
    """fairseq's conv stack string, e.g. ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``, read without
    ``eval``: only list/tuple literals of integers, ``+`` and ``*`` are accepted."""

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = value(ast.parse(str(spec), mode="eval").body)
        layers = [tuple(int(v) for v in layer) for layer in layers]
        if not layers or any(len(layer) != 3 for layer in layers):
            raise ValueError("not a list of (dim, kernel, stride)")
    except (SyntaxError, ValueError, TypeError) as err:
        raise SpecError(f"{where} = {spec!r} is not a list of (dim, kernel, stride) triples ({err}).") from None
    return layers


def activation(name: str, where: str) -> str:
    try:
        return ACTIVATIONS[str(name)]
    except KeyError:
        raise SpecError(f"{where} = {name!r}: d2v knows the fairseq activations {', '.join(ACTIVATIONS)}.") from None


def unsupported(where: str, problems: list[str]) -> None:
    """A SpecError listing the architecture features d2v does not implement."""
    if problems:
        raise SpecError(f"{where} uses features d2v's audio components do not implement: " + "; ".join(problems) + ".")
