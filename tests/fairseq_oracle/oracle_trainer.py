"""Build a fairseq model, criterion and ``Trainer`` from fairseq's own config dataclasses, and save
checkpoints through ``Trainer.save_checkpoint`` -- the file layout fairseq's training writes.

Runs in the oracle venv only (see README.md). ``fairseq_env.load_fairseq()`` must have run.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def _node(registry: dict, name: str, overrides: dict[str, Any]) -> DictConfig:
    node = OmegaConf.structured(registry[name]())
    OmegaConf.set_struct(node, False)
    node._name = name
    for key, value in overrides.items():
        OmegaConf.update(node, key, value, merge=False)
    return node


def fairseq_config(task: str, task_args: dict, model: str, model_args: dict, *,
                   criterion: str = "model", criterion_args: dict | None = None,
                   lr: float = 5e-4, max_update: int = 100, seed: int = 1) -> DictConfig:
    """A complete ``FairseqConfig`` as ``fairseq-hydra-train`` would hold it: every group filled
    from fairseq's dataclass defaults, the named task/model/criterion with the given overrides,
    Adam with a tri-stage schedule (what the data2vec recipes use), CPU."""
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY
    from fairseq.optim.lr_scheduler import LR_SCHEDULER_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    cfg = OmegaConf.structured(FairseqConfig)
    OmegaConf.set_struct(cfg, False)
    cfg.common.cpu, cfg.common.seed = True, seed
    cfg.task = _node(TASK_DATACLASS_REGISTRY, task, task_args)
    cfg.model = _node(MODEL_DATACLASS_REGISTRY, model, model_args)
    cfg.criterion = _node(CRITERION_DATACLASS_REGISTRY, criterion, criterion_args or {})
    cfg.optimizer = _node(OPTIMIZER_DATACLASS_REGISTRY, "adam", {})
    cfg.lr_scheduler = _node(LR_SCHEDULER_DATACLASS_REGISTRY, "tri_stage", {"phase_ratio": [0.1, 0.4, 0.5]})
    cfg.optimization.lr, cfg.optimization.max_update = [lr], max_update
    return cfg


def build(cfg: DictConfig):
    """(task, model, criterion, trainer) exactly as ``fairseq_cli.train.main`` builds them."""
    from fairseq import tasks
    from fairseq.trainer import Trainer

    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion, Trainer(cfg, task, model, criterion)


def save(trainer, path: str, extra_state: dict | None = None) -> None:
    """What ``checkpoint_utils.save_checkpoint`` does for one file (no epoch iterator here)."""
    trainer.consolidate_optimizer()
    state = {"train_iterator": {"epoch": 1, "iterations_in_epoch": trainer.get_num_updates(), "shuffle": True},
             "val_loss": None}
    state.update(extra_state or {})
    trainer.save_checkpoint(path, state)
