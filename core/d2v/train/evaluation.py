"""Evaluation: a split's metrics during training (``valid``) and in an ``evaluate`` run.

Kept apart from the loop because evaluating under several processes has rules of its own: each
process evaluates a disjoint share of the batches (no duplicated examples, so the summed counts
are exact), FSDP needs every process to run as many forwards, examples that fail to load are
counted against the skip budget, and the heads' counts are summed over processes before they
become metrics. The functions take the :class:`~d2v.train.loop.Run` (``run``) for its datasets,
processor, accelerator and logs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object, send_to_device
from torch.utils.data import DataLoader

from d2v.api.errors import SpecError
from d2v.api.interfaces import Head
from d2v.data.loading import Collate, ProcessedDataset, batch_sampler_for
from d2v.interop.weights import load_initial_weights
from d2v.spec.config import EvaluateConfig, dump_spec
from d2v.train.checkpoint import write_text_atomic
from d2v.train.pending import sample_size_of


def add_counts(totals: dict[str, Any], counts: dict[str, Any]) -> None:
    """Add one batch's (or process's) evaluation counts into ``totals``: numbers are summed,
    lists (per-example values a metric needs whole, e.g. scores for a rank correlation or an
    EER) are concatenated."""
    for key, value in counts.items():
        if isinstance(value, (list, tuple)):
            totals.setdefault(key, []).extend(value)
        else:
            totals[key] = totals.get(key, 0.0) + float(value)


def evaluate(run) -> dict[str, float]:
    """An ``evaluate`` run: ``evaluate.split`` of the spec's model (or ``evaluate.checkpoint``),
    its metrics written to ``<split>_metrics.json`` and its predictions to ``evaluate.output``."""
    cfg = EvaluateConfig(**(run.spec.get("evaluate") or {}))
    if run.is_main:  # an evaluation in a training run's directory leaves that run's spec.yaml alone
        if not (run.output_dir / "spec.yaml").exists():
            write_text_atomic(run.output_dir / "spec.yaml", dump_spec(run.spec))
    run.log.write({"event": "evaluate", "spec": getattr(run.spec, "source", None), "split": cfg.split,
                   "checkpoint": cfg.checkpoint or ((run.spec.get("model") or {}).get("init") or {}).get("checkpoint")})
    if cfg.checkpoint:
        report = load_initial_weights(run.model, cfg.checkpoint)
        if report.new:
            raise SpecError(f"evaluate.checkpoint: '{cfg.checkpoint}' does not provide every weight of the model "
                            f"in the spec.\n{report.summary()}")
        run.print(report.summary())
    metrics = evaluate_split(run, cfg.split, keep_predictions=True)
    if run.is_main:
        write_text_atomic(run.output_dir / f"{cfg.split}_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def evaluate_split(run, split: str, model=None, *, step: int | None = None,
                   keep_predictions: bool = False) -> dict[str, float]:
    """The split's metrics (the objective's loss, the head's summaries), logged and returned."""
    acc = run.accelerator
    model = model if model is not None else acc.prepare_model(run.model, evaluation_mode=True)
    unwrapped = acc.unwrap_model(model)
    head = getattr(unwrapped, "head", None)
    head = head if isinstance(head, Head) else None
    model.eval()
    counts: dict[str, Any] = {}
    rows: list[tuple[str, Any, Any]] = []
    left_out_count = 0
    batches, own = eval_batches(run, split)
    # FSDP gathers parameters in every forward: all processes run as many. Anywhere else each
    # process holds the whole model and evaluates its share alone (DDP's wrapper would
    # broadcast buffers in forward, a collective the process with fewer batches never joins)
    in_step = acc.distributed_type == DistributedType.FSDP
    model = model if in_step else unwrapped
    stand_in = None
    for index, batch in enumerate(eval_loader(run, split, batches)):
        left_out = batch.pop("skipped_examples", None)
        if left_out and index < own:
            left_out_count += len(left_out)
            run.skipped_log.write(split, left_out)
            run.skip_budget.add(split, left_out)
        if not batch or index >= own:
            if in_step and (batch or stand_in):  # run, not counted
                with autocast(run):
                    model(send_to_device(batch, acc.device) if batch else stand_in)
            continue
        batch = send_to_device(batch, acc.device)
        stand_in = stand_in or batch
        with autocast(run):
            out = model(batch)
        if out.loss is not None:  # weighed by what the loss is a mean over: a true mean of the split
            weight = sample_size_of(out) or len(batch.get("ids", ())) or int(batch["inputs"].shape[0])
            add_counts(counts, {"objective_loss_sum": float(out.loss) * weight, "objective_loss_weight": weight})
        if head is not None:
            add_counts(counts, head.eval_counts(out.head_output, batch))
            if keep_predictions:
                preds = head.predict(out.head_output, batch)
                rows.extend(zip(batch.get("ids", [""] * len(preds)), head.references(batch), preds))
    if left_out_count:
        add_counts(counts, {"skipped_examples": left_out_count})
    all_counts: dict[str, Any] = {}
    for part in gather_object([counts]):
        add_counts(all_counts, part)
    metrics: dict[str, float] = {}
    if all_counts.get("skipped_examples"):
        metrics["skipped_examples"] = all_counts["skipped_examples"]
        run.print(f"[{split}] {int(all_counts['skipped_examples'])} examples could not be loaded and were "
                  f"left out of the metrics (see {run.skipped_log.path})")
    if all_counts.get("objective_loss_weight"):
        metrics["loss"] = all_counts["objective_loss_sum"] / all_counts["objective_loss_weight"]
    if head is not None:
        metrics.update(head.summarize(dict(all_counts)))
    record = {"split": split, "step": step, **metrics}
    run.log.write(record)
    run.log.track(record)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    run.print(f"[{split}{'' if step is None else f' @ step {step}'}] {shown}")
    if keep_predictions:
        write_predictions(run, gather_object(rows))
    run.skip_budget.check(split, int(all_counts.get("skipped_examples", 0)))  # the metrics are written first
    return metrics


def eval_batches(run, split: str) -> tuple[list[list[int]], int]:
    """This process's share of the split's batches and how many of them are its own: no
    duplicated examples, so the summed counts are exact whatever the number of processes.
    Under FSDP every forward gathers parameters from all processes, so the shorter shares
    are topped up with repeats of the first batch, run and not counted."""
    sampler = batch_sampler_for(run.datasets[split], run.processor, run.loader_cfg, train=False,
                                seed=run.seed, where=f"data.{split}")
    acc = run.accelerator
    batches = list(sampler)
    mine = batches[acc.process_index::acc.num_processes]
    real = len(mine)
    if acc.distributed_type == DistributedType.FSDP and batches:
        mine += [batches[0]] * (math.ceil(len(batches) / acc.num_processes) - real)
    return mine, real


def eval_loader(run, split: str, batches: list[list[int]] | None = None) -> DataLoader:
    """A loader over ``batches`` of the split (default: this process's share)."""
    return DataLoader(ProcessedDataset(run.datasets[split], run.processor, train=False, seed=run.seed,
                                       on_bad_example=run.on_bad_example, where=f"data.{split}"),
                      batch_sampler=eval_batches(run, split)[0] if batches is None else batches,
                      collate_fn=Collate(run.processor.collate), num_workers=run.loader_cfg.num_workers)


def autocast(run):
    """Accelerate's autocast. DeepSpeed turns that off and autocasts inside its engine's forward;
    evaluation calls the model itself, so it autocasts the same way there."""
    if run.deepspeed and run.precision == "bf16":
        return torch.autocast(run.accelerator.device.type, dtype=torch.bfloat16)
    return run.accelerator.autocast()


def write_predictions(run, rows: list) -> None:
    if not run.is_main:
        return
    cfg = EvaluateConfig(**(run.spec.get("evaluate") or {}))
    path = run.output_dir / cfg.output
    lines = ["id\treference\thypothesis"] + [f"{i}\t{ref}\t{hyp}" for i, ref, hyp in sorted(rows, key=lambda r: str(r[0]))]
    write_text_atomic(path, "\n".join(lines) + "\n")
    run.print(f"wrote {len(rows)} hypotheses to {path}")
