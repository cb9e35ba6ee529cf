"""One training step: a batch's forward and backward and, on an update's last micro-batch, the
guarded optimizer update.

Why a module of its own: gradient accumulation, the zero loss that keeps processes in step when a
batch loaded nothing, DeepSpeed's step inside backward and the rules for skipping a bad update are
the densest part of the runner. Here they read together; ``loop.py`` shows only when a step runs
and what follows it. The functions take the :class:`~d2v.train.loop.Run` (``run``) for what it
built: the accelerator, the trainer settings, the skipped-example log and budget.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate.utils import DistributedType

from d2v.data.loading import Collate, ProcessedDataset, batch_sampler_for
from d2v.train.guards import EmptyBatches
from d2v.train.parallel import DeepSpeedLoss, deepspeed_skip_reason, unused_parameters, wraps_in_ddp
from d2v.train.pending import PendingUpdate, backward_loss, normalize_gradients, sample_size_of


class TrainingStep:
    """Called once per batch: notes the examples the loader left out, runs forward and backward
    (a zero loss for a batch with no loadable example) and, when Accelerate says the update's
    micro-batches are complete, applies the update (:func:`apply_update`) and steps the schedule.
    Returns why the update was skipped, ``None`` when it was applied or is still accumulating."""

    def __init__(self, run, model, optimizer, scheduler):
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.deepspeed_loss = (DeepSpeedLoss(model, run.accelerator, normalize=run.task == "pretrain")
                               if run.deepspeed else None)
        self.pending = PendingUpdate()  # the update being accumulated: losses and logs still on the device
        self.stand_in = None  # the last batch that loaded, run with a zero loss in place of an empty one
        self.empty_batches = EmptyBatches()

    def __call__(self, batch: dict[str, Any], window: dict[str, float]) -> str | None:
        run, acc, model, pending = self.run, self.run.accelerator, self.model, self.pending
        left_out = batch.pop("skipped_examples", None)
        if left_out:
            window["skipped_examples"] += len(left_out)
            run.skipped_log.write("train", left_out)
            run.skip_budget.add("train", left_out)
        self.empty_batches.seen(batch, left_out)
        with acc.accumulate(model):
            if batch:
                self.stand_in = batch
                out = model(batch)
                sample_size = sample_size_of(out)
                pending.add(out.loss, getattr(out, "logs", None),
                            len(batch.get("ids", ())) or int(batch["inputs"].shape[0]),
                            lambda ids=batch.get("ids", ()): batch_names({"ids": ids}),
                            sample_size=sample_size)
                loss = backward_loss(out.loss, sample_size)
            else:  # every example was left out: a zero loss keeps processes in step
                loss, sample_size = zero_loss(run, model, self.trainable, self.stand_in), None
                pending.add(loss, None, 0, lambda: "an empty batch", counted=False)
            if self.deepspeed_loss is not None:  # it steps in backward: settle bad losses, normalise
                loss = self.deepspeed_loss(loss, sample_size)
            # backward even on a bad loss: every process must join the gradient all-reduce
            acc.backward(loss)
            skip_reason = None
            if acc.sync_gradients:
                skip_reason = apply_update(run, self.optimizer, self.trainable, pending, window)
                if skip_reason is None:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return skip_reason

    def record(self, window: dict[str, float], step: int, epoch: int, seconds: float) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of the logging window that ends at ``step`` (summed over processes)."""
        acc = self.run.accelerator
        totals = torch.tensor([window["loss"], window["loss_weight"], window["examples"]],
                              device=acc.device, dtype=torch.float64)
        totals = acc.reduce(totals, reduction="sum")
        record: dict[str, Any] = {"split": "train", "step": step, "epoch": epoch,
                                  "loss": float(totals[0] / max(1e-12, float(totals[1]))),
                                  "lr": float(self.scheduler.get_last_lr()[0]),
                                  "grad_norm": window["grad_norm"] / max(1.0, window["steps"]),
                                  "examples_per_second": float(totals[2]) / max(seconds, 1e-9)}
        for count in ("skipped_updates", "skipped_examples"):
            if window.get(count):
                record[count] = int(window[count])
        skip = {"loss", "loss_weight", "micro_batches", "examples", "grad_norm", "steps", "skipped_updates",
                "skipped_examples"}
        for key, value in window.items():
            if key not in skip:  # objective logs may be device tensors: read once per window
                record[key] = float(value) / max(1.0, window["micro_batches"])
        return record


def apply_update(run, optimizer, trainable, pending: PendingUpdate, window: dict[str, Any]) -> str | None:
    """Normalise, clip and step, unless a loss or the gradient norm is not finite; returns why
    the update was skipped (``None`` when it was applied). Every process reaches the same
    decision: the gradient norm is computed after the all-reduce, and the count of bad
    losses is summed (in the same all-reduce as the update's sample size). The losses, the
    norm and that count reach the host in one read."""
    acc, cfg = run.accelerator, run.trainer
    skipped = torch.tensor([float(run.skip_budget.loaded_count("train"))], dtype=torch.float64).to(acc.device)
    counts = torch.cat([pending.counts(acc.device), skipped])  # [bad losses, weighted, sample size, left out]
    if acc.num_processes > 1:
        counts = acc.reduce(counts, reduction="sum")
    if not run.deepspeed:  # DeepSpeed has stepped already, normalised in backward (DeepSpeedLoss)
        averaged_over = acc.num_processes * acc.gradient_accumulation_steps  # Accelerate's and DDP/FSDP's means
        normalize_gradients([p.grad for p in trainable if p.grad is not None], counts[1], counts[2], averaged_over)
    max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
    grad_norm = acc.clip_grad_norm_(trainable, max_norm)  # DeepSpeed: the norm its step saw (it clipped there)
    settled, (bad_count, left_out) = pending.settle(grad_norm, window, counts[[0, 3]])
    if run.skip_budget.total("train", left_out) > run.skip_budget.allowed("train"):
        run.skip_budget.check_over_processes(acc, "train")  # every process: the sum is the same everywhere
    reason = settled.bad_loss
    if reason is None and bad_count > 0:
        reason = "a non-finite loss on another process"
    if reason is None and not math.isfinite(settled.grad_norm):
        reason = f"gradient norm {settled.grad_norm}"
    if reason is not None and acc.scaler is None and not run.deepspeed:
        return reason
    optimizer.step()  # with fp16 the grad scaler skips a non-finite step itself and lowers its scale
    if run.deepspeed:  # its step (a no-op here) ran in backward: its verdict decides
        reason = deepspeed_skip_reason(optimizer.step_was_skipped, reason)
    elif getattr(optimizer, "step_was_skipped", False):
        return reason or "fp16 overflow (the grad scaler lowered its loss scale)"
    if reason is not None:
        return reason
    window["grad_norm"] += settled.grad_norm
    return None


def zero_loss(run, model, trainable, stand_in: dict[str, Any] | None):
    """A zero loss whose backward joins the gradient all-reduce, for a process whose batch had
    no loadable example. Under FSDP the model must also run forward (it gathers parameters
    from every process then), under DeepSpeed give gradients to the same parameters as the
    other processes' batches (ZeRO-2 reduces them in buckets): on the last batch that loaded."""
    if (run.accelerator.distributed_type == DistributedType.FSDP or run.deepspeed) and stand_in is not None:
        return model(stand_in).loss * 0.0
    return sum(p.sum() for p in trainable) * 0.0


def batch_names(batch: dict[str, Any]) -> str:
    ids = [str(i) for i in batch.get("ids", ())]
    shown = ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
    return f"the batch of {shown}" if ids else "this batch"


def set_find_unused_parameters(run, train_set, transform) -> None:
    """Tell DDP to look for unused parameters only when some can be unused: LayerDrop, or
    parameters a probe batch leaves without gradient (e.g. a pooler the head ignores)."""
    acc, setting = run.accelerator, run.trainer.find_unused_parameters
    if not wraps_in_ddp(acc) or acc.ddp_handler is None:
        if setting != "auto" and acc.num_processes > 1:  # the spec may serve DDP launches too: say, not stop
            run.print(f"note: trainer.find_unused_parameters: {str(setting).lower()} is a DDP setting; "
                      f"it does nothing under {acc.distributed_type.value}")
        return
    if setting == "auto":
        layerdrop = any(float(getattr(m, "layerdrop", 0) or 0) > 0 for m in run.model.modules())
        setting = layerdrop or bool(unused_parameters(run.model, probe_batch(run, train_set, transform), acc.device))
    acc.ddp_handler.find_unused_parameters = bool(setting)


def probe_batch(run, train_set, transform) -> dict[str, Any]:
    """The first training batch, built without touching the run's RNG."""
    indices = next(iter(batch_sampler_for(train_set, run.processor, run.loader_cfg, train=True,
                                          seed=run.seed, where="data.train")))
    dataset = ProcessedDataset(train_set, run.processor, train=True, seed=run.seed)
    with torch.random.fork_rng(devices=[]):
        return Collate(run.processor.collate, transform, run.seed)([dataset[i] for i in indices])
