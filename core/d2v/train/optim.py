"""Optimizers used by the data2vec recipes, built from a spec's ``optim:`` section."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from d2v.api.errors import SpecError


def _trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adamw(param_groups, *, fused: bool | str, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused by default (``fused: auto``): one kernel per step instead of a
    loop over parameter groups -- about 2.8x faster on a 2-core CPU for a Base model's update, and
    what ``transformers``' Trainer uses by default. ``fused: false`` is the for-each version."""
    if fused not in (True, False, "auto"):
        raise SpecError(f"optim.fused must be true, false or auto, not {fused!r}.")
    if fused is False:
        return torch.optim.AdamW(param_groups, foreach=True, **kwargs)
    try:
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, ValueError) as exc:  # a device or dtype without the fused kernel
        if fused is True:
            raise SpecError(f"optim.fused: true is not supported here ({exc}); use fused: auto.") from None
        return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


def adam(
    model: nn.Module,
    lr: float = 5e-4,
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    fused: bool | str = "auto",
) -> torch.optim.Optimizer:
    """fairseq's Adam as data2vec used it: decoupled weight decay on every parameter."""
    params = [p for _, p in _trainable(model)]
    if not params:
        raise SpecError("optim: the model has no trainable parameters (is everything frozen by model.freeze?).")
    return _adamw(params, fused=fused, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def adamw(
    model: nn.Module,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    fused: bool | str = "auto",
) -> torch.optim.AdamW:
    """AdamW without decay on biases, norms and embeddings-like 1-d tensors.

    ``layer_decay < 1`` scales layer ``i`` of ``L`` by ``layer_decay ** (L - i)`` (BEiT /
    data2vec vision fine-tuning); parameters outside the encoder layers count as layer 0
    (feature extractor) or the top (head). Components may list parameter names exempt from
    weight decay in ``no_weight_decay_names`` (timm's ``no_weight_decay``: vision's CLS token,
    position embeddings and relative-bias tables). An encoder may name submodules that belong with the
    top in ``top_parameters`` (vision: the final/pooler LayerNorms and the shared relative
    position bias, as BEiT's layer-id rule does).
    """
    named = _trainable(model)
    if not named:
        raise SpecError("optim: the model has no trainable parameters (is everything frozen by model.freeze?).")
    num_layers = _num_layers(model)
    top = tuple(getattr(getattr(model, "encoder", None), "top_parameters", ()) or ())
    skip = _no_weight_decay(model)
    groups: dict[tuple[float, float], list] = {}
    for name, param in named:
        no_decay = param.ndim <= 1 or name.endswith(".bias") or not skip.isdisjoint(name.split("."))
        decay = 0.0 if no_decay else weight_decay
        scale = layer_decay ** (num_layers + 1 - _layer_id(name, num_layers, top)) if layer_decay != 1.0 else 1.0
        groups.setdefault((decay, scale), []).append(param)
    param_groups = [
        {"params": ps, "weight_decay": decay, "lr": lr * scale, "lr_scale": scale}
        for (decay, scale), ps in groups.items()
    ]
    return _adamw(param_groups, fused=fused, lr=lr, betas=tuple(betas), eps=eps)


def _no_weight_decay(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for attribute in ("feature_extractor", "encoder"):
        names |= set(getattr(getattr(model, attribute, None), "no_weight_decay_names", ()) or ())
    return names


def _num_layers(model: nn.Module) -> int:
    encoder = getattr(model, "encoder", None)
    return int(getattr(encoder, "num_layers", 0))


def _layer_id(name: str, num_layers: int, top: tuple[str, ...] = ()) -> int:
    if any(name.startswith(f"encoder.{prefix}.") or name == f"encoder.{prefix}" for prefix in top):
        return num_layers + 1
    if name.startswith("feature_extractor.") or name.startswith("encoder.") and ".layers." not in name:
        return 0
    if name.startswith("encoder.") and ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) + 1
    return num_layers + 1
