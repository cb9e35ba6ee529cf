"""Training: :func:`run` trains, pretrains or evaluates a spec with Accelerate. The loop, the order
of things (``loop``); a training step and its guarded update (``step``); evaluation
(``evaluation``); checkpoint files (``checkpoint``) and when to save, what is good and how to
resume (``checkpoint_policy``); guards against bad data, bad losses and signals (``guards``); loss
normalisation across micro-batches and processes (``pending``); DDP/FSDP/DeepSpeed set-up
(``parallel``) and how a launched process ends (``shutdown``); optimizers and LR schedules
(``optim``, ``schedules``); class names taken from the data (``label_names``).

Imports ``d2v.api``, ``d2v.spec``, ``d2v.data``, ``d2v.nn``, ``d2v.ssl`` and ``d2v.interop``
(initial weights).
"""

from d2v.train.loop import Run, run

__all__ = ["Run", "run"]
