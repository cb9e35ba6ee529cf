"""The Accelerate-based runner: :func:`run` trains, pretrains or evaluates a spec."""

from d2v.runner.train import Run, run

__all__ = ["Run", "run"]
