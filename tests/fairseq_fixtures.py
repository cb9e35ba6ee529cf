"""Small checkpoints in fairseq's exact on-disk layout, built without fairseq.

fairseq's ``Trainer.state_dict`` (fairseq/trainer.py) saves, through ``torch.save``::

    {"args": None, "cfg": <the run's config>, "model": model.state_dict() (+ "_ema": {...}),
     "criterion": None, "optimizer_history": [{criterion_name, optimizer_name,
     lr_scheduler_state, num_updates}], "task_state": {}, "extra_state": {"metrics": {...},
     "previous_training_time": ...}, "last_optimizer_state": optimizer.state_dict()}

Released checkpoints carry ``cfg`` as an omegaconf ``DictConfig`` (older fairseq) or a plain
container (newer), and ``extra_state["metrics"]`` holds fairseq's meter objects; both are
reproduced here (the meters as instances of a class that pickles under fairseq's module name).
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class AverageMeter:
    """Pickles as ``fairseq.logging.meters.AverageMeter`` (what fairseq's metrics hold)."""

    def __init__(self, val: float = 0.0):
        self.val, self.sum, self.count, self.round = val, val, 1, None


@contextmanager
def _fairseq_modules():
    """Make ``fairseq.logging.meters.AverageMeter`` importable while pickling."""
    names = ("fairseq", "fairseq.logging", "fairseq.logging.meters")
    saved = {n: sys.modules.get(n) for n in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["fairseq.logging.meters"].AverageMeter = AverageMeter
    old = AverageMeter.__module__
    AverageMeter.__module__ = "fairseq.logging.meters"
    try:
        yield
    finally:
        AverageMeter.__module__ = old
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def save_fairseq_checkpoint(path: str | Path, cfg: dict[str, Any], model: dict[str, Tensor],
                            ema: dict[str, Tensor] | None = None, *, dictconfig: bool = True,
                            num_updates: int = 1000) -> Path:
    """Write ``model`` and ``cfg`` (plain dicts; stored as a ``DictConfig`` when ``dictconfig``)
    as fairseq's trainer would."""
    from omegaconf import OmegaConf

    weights: dict[str, Any] = {k: v.detach().clone() for k, v in model.items()}
    if ema is not None:
        weights["_ema"] = {k: v.detach().clone().float() for k, v in ema.items()}
    state = {
        "args": None,
        "cfg": OmegaConf.create(cfg) if dictconfig else cfg,
        "model": weights,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": num_updates}],
        "task_state": {},
        "extra_state": {"metrics": {"train": [("loss", AverageMeter(3.2), 0)]}, "previous_training_time": 12.5},
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4}]},
    }
    path = Path(path)
    with _fairseq_modules():
        torch.save(state, path)
    return path
