"""The training / evaluation loop: one readable file on top of Hugging Face Accelerate.

Accelerate owns devices, mixed precision, gradient accumulation and multi-process
(``accelerate launch``); this file owns the order of things: build from the spec, then train
for ``max_steps`` optimizer updates -- each batch a step, then log, evaluate?, checkpoint?,
stop? -- and resume. What each of those does lives beside it: the step and the guarded update in
``step``, evaluation in ``evaluation``, when and what to save and how to resume in
``checkpoint_policy``, skipped updates, skipped examples and stop signals in ``guards``.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm.auto import tqdm

import d2v.train.evaluation as evaluation
from d2v.api import plugins
from d2v.api.errors import SpecError, TrainingCollapse
from d2v.data.loading import check_policy, drop_featureless, filter_training_examples, make_loader, set_epoch
from d2v.interop.weights import load_initial_weights
from d2v.nn.layer_options import apply_layer_options
from d2v.spec.config import MAX_SKIPPED_FRACTION, EvaluateConfig, LoaderConfig, Spec, TrainerConfig, validate
from d2v.spec.model import build_component, build_model
from d2v.ssl.batch_masks import frame_lengths_fn
from d2v.train.checkpoint import prepare_run_dir
from d2v.train.checkpoint_policy import Checkpoints, save_final
from d2v.train.evaluation import add_counts  # noqa: F401 -- d2v.train.loop.add_counts, as before
from d2v.train.guards import BadUpdates, Preempted, RunLock, SkipBudget, SkippedLog, StopSignals, stop_with_launcher
from d2v.train.label_names import adopt_label_names
from d2v.train.parallel import (configure_deepspeed, declare_fsdp_units, deepspeed_on_cpu, describe_deepspeed,
                                describe_fsdp_units, enable_fsdp_on_cpu, launched_with_deepspeed,
                                refuse_under_deepspeed)
from d2v.train.shutdown import close_process_group
from d2v.train.step import TrainingStep, set_find_unused_parameters


def check_vocabulary(processor: Any, model: Any) -> None:
    """A tokenizer that emits ids the model cannot embed fails on the first batch with an
    index error deep in torch; say so before anything runs."""
    produced = getattr(processor, "vocab_size", None)
    embedded = getattr(getattr(model, "feature_extractor", None), "vocab_size", None)
    if produced is not None and embedded is not None and int(produced) > int(embedded):
        raise SpecError(
            f"data.processor produces token ids up to {int(produced) - 1} but the model embeds only {int(embedded)} "
            f"tokens; set model.feature_extractor.vocab_size: {int(produced)} (or use the model's own tokenizer)."
        )


def resolve_precision(setting: str, cpu: bool) -> str:
    """``auto`` -> bf16 where the GPU computes in it natively, else full precision (CPU runs
    stay exact and comparable with the fp32 parity tests)."""
    if setting != "auto":
        return setting
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` (main process only); :meth:`track`
    sends a record's numbers to the Accelerate trackers too (``tracker``: the accelerator, when
    ``trainer.trackers`` names some)."""

    def __init__(self, path: Path, enabled: bool, tracker: Accelerator | None = None):
        self.path = path
        self.enabled = enabled
        self.tracker = tracker

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:  # "time" (Unix seconds) lets `d2v runs` report wall time
            with self.path.open("a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def track(self, record: dict[str, Any]) -> None:
        """Send a ``metrics.jsonl`` record's numbers to the Accelerate trackers (TensorBoard
        etc.) as ``<split>/<name>`` at its step, so both logs hold the same values."""
        if self.tracker is not None and record.get("step") is not None:
            self.tracker.log({f"{record['split']}/{k}": v for k, v in record.items()
                              if k not in ("split", "step") and isinstance(v, (int, float))}, step=record["step"])


class Run:
    """Everything built from a spec, ready to train or evaluate."""

    def __init__(self, spec: Spec, *, resume: bool | str = False):
        validate(spec)
        self.spec = spec
        self.task = spec.get("task", "finetune")
        self.seed = int(spec.get("seed", 1))
        self.trainer = TrainerConfig(**(spec.get("trainer") or {}))
        self.loader_cfg = LoaderConfig(**((spec.get("data") or {}).get("loader") or {}))
        self.output_dir = Path(self.trainer.output_dir)
        self.precision = resolve_precision(self.trainer.mixed_precision, self.trainer.cpu)
        deepspeed = launched_with_deepspeed()  # runs DeepSpeed on CPUs too (deepspeed_on_cpu), never DDP instead
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            gradient_accumulation_steps=self.trainer.grad_accum,
            cpu=not deepspeed and (self.trainer.cpu or not torch.cuda.is_available()),  # CPU-only: DDP over gloo
            step_scheduler_with_optimizer=False,
            log_with=self.trainer.trackers or None,
            project_dir=str(self.output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),  # see set_find_unused_parameters
                             *(deepspeed_on_cpu(self.trainer.cpu) if deepspeed else [])],
            dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned batches: copies overlap compute
        )
        enable_fsdp_on_cpu(self.accelerator)
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            configure_deepspeed(self.accelerator.state.deepspeed_plugin.deepspeed_config, precision=self.precision,
                                clip_norm=self.trainer.clip_norm, grad_accum=self.trainer.grad_accum,
                                micro_batch=self.loader_cfg.batch_size or 1)
        self.is_main = self.accelerator.is_main_process
        self.resume_from: list[Path] | None = None
        self.lock = None
        if self.task != "evaluate":
            stop_with_launcher()
            if self.is_main:  # before looking at the directory: two jobs must not both pass the check
                self.lock = RunLock(self.output_dir).acquire()
            resume = resume or self.trainer.resume
            try:
                self.resume_from = prepare_run_dir(self.output_dir, resume=resume)
            except BaseException:
                self.release()
                raise
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._build(spec)
        except BaseException:
            self.release()
            raise

    def _build(self, spec: Spec) -> None:
        set_seed(self.seed)
        self.registry = plugins.registry()
        data = spec["data"]
        self.on_bad_example = check_policy(data.get("on_bad_example", "skip"))
        self.skipped_log = SkippedLog(self.output_dir / "skipped.tsv")
        self.skip_budget = SkipBudget(data.get("max_skipped_fraction", MAX_SKIPPED_FRACTION), self.skipped_log)
        # data first: a missing corpus is the cheapest mistake to report
        self.datasets = {
            split: build_component(self.registry, "dataset", data[split], f"data.{split}",
                                   on_bad_example=self.on_bad_example)
            for split in ("train", "valid", "test")
            if data.get(split) is not None and (self.task != "evaluate" or split == self._eval_split())
        }
        for split, dataset in self.datasets.items():
            self.skip_budget.sizes[split] = len(dataset) + len(getattr(dataset, "skipped", None) or [])
            self._leave_out_up_front(split, list(getattr(dataset, "skipped", None) or []), "unreadable examples")
        self.processor = build_component(self.registry, "processor", data["processor"], "data.processor")
        if self.task != "evaluate":  # an evaluated checkpoint keeps the names it was trained with
            adopted = adopt_label_names(spec["model"], self.datasets.get("train"), self.registry)
            if adopted:
                self.print(adopted)
        self.model = build_model(spec["model"], self.registry, self.task)
        check_vocabulary(self.processor, self.model)
        if self.deepspeed and self.task != "evaluate":
            refuse_under_deepspeed(self.model, task=self.task, grad_accum=self.trainer.grad_accum)
        init = (spec["model"] or {}).get("init")
        if init and not self.resume_from:
            report = load_initial_weights(self.model, init["checkpoint"], strict=bool(init.get("strict", False)),
                                          allow_mismatch=bool(init.get("allow_mismatch", False)))
            self.print(report.summary())
        for line in apply_layer_options(self.model, gradient_checkpointing=self.trainer.gradient_checkpointing,
                                        compile=self.trainer.compile):
            self.print(line)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", self.is_main,
                              tracker=self.accelerator if self.trainer.trackers else None)
        self._inspect_examples()

    def _leave_out_up_front(self, split: str, examples: list, why: str) -> None:
        """Examples left out before training: listed in skipped.tsv, said, and counted against
        ``data.max_skipped_fraction`` (the run stops here when they already exceed it)."""
        if not examples:
            return
        self.skip_budget.add(split, examples, up_front=True)
        if self.is_main:
            self.skipped_log.write(split, examples)
        self.print(f"data.{split}: {len(examples)} {why} left out (listed in {self.skipped_log.path})")
        self.skip_budget.check(split)

    def _inspect_examples(self) -> None:
        """Let the head look at each split's light examples once (``Head.inspect_examples``)."""
        inspect = getattr(getattr(self.model, "head", None), "inspect_examples", None)
        if not callable(inspect):
            return
        for split, dataset in self.datasets.items():
            light = getattr(dataset, "light_example", dataset.__getitem__)  # shards: skip the audio bytes
            for line in inspect(light(i) for i in range(len(dataset))):
                self.print(f"data.{split}: warning: {line}")
                self.log.write({"event": "data_warning", "split": split, "message": line})

    def release(self) -> None:
        """Let another job use the run directory."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _eval_split(self) -> str:
        return EvaluateConfig(**(self.spec.get("evaluate") or {})).split

    def print(self, *args: Any) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        acc, cfg = self.accelerator, self.trainer
        train_set, train_loader, transform = self._training_data()
        optimizer = build_component(self.registry, "optimizer", self.spec["optim"], "optim", model=self.model)
        scheduler = build_component(self.registry, "schedule", self.spec.get("schedule") or {"name": "constant"},
                                    "schedule", optimizer=optimizer, total_steps=cfg.max_steps)
        set_find_unused_parameters(self, train_set, transform)
        model, optimizer, train_loader, scheduler = self._prepare(optimizer, train_loader, scheduler)
        checkpoints = Checkpoints(self)
        state = checkpoints.start() if self.resume_from is None else checkpoints.resume(scheduler)
        if cfg.trackers:
            acc.init_trackers(self.output_dir.name, config={"task": self.task, "seed": self.seed})
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.print(f"{self.task}: {n_params / 1e6:.2f}M trainable parameters, {len(train_set)} "
                   f"training examples, {len(train_loader)} batches per epoch per process, {acc.num_processes} process(es)")

        train_step = TrainingStep(self, model, optimizer, scheduler)
        step, epoch, done_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        window: dict[str, float] = defaultdict(float)
        window_start = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (self.is_main and cfg.progress_bar), desc=self.task)
        last_eval: dict[str, float] = {}
        bad_updates = BadUpdates(cfg.max_bad_steps)
        evaluating = cfg.eval_every and "valid" in self.datasets  # every trainer.eval_every steps

        def trainer_state() -> dict[str, int]:
            return {"step": step, "epoch": epoch, "batches_in_epoch": done_in_epoch, "processes": acc.num_processes}

        if cfg.eval_before_training and step == 0 and "valid" in self.datasets:
            self.evaluate_split("valid", model, step=0)  # the untrained baseline, for comparison
        model.train()
        try:
            with StopSignals() as signals:
                while step < cfg.max_steps:
                    set_epoch(train_loader, epoch)
                    batches = acc.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
                    for batch in batches:
                        skip_reason = train_step(batch, window)  # forward, backward; the update on its last micro-batch
                        done_in_epoch += 1
                        if not acc.sync_gradients:
                            continue
                        if skip_reason is not None:
                            window["skipped_updates"] += 1
                            self.log.write({"event": "skipped_update", "step": step, "reason": skip_reason})
                            self.print(f"skipped the update after step {step}: {skip_reason}")
                            bad_updates.skipped(step, skip_reason, checkpoints.verified)
                        else:
                            bad_updates.ok()
                            checkpoints.trained_on()
                            step += 1
                            window["steps"] += 1
                            unwrapped = acc.unwrap_model(model)
                            if hasattr(unwrapped, "after_optimizer_step"):
                                unwrapped.after_optimizer_step(step)
                            bar.update(1)
                            if step % cfg.log_every == 0 or step == cfg.max_steps:
                                record = train_step.record(window, step, epoch, time.perf_counter() - window_start)
                                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
                                self.log.write(record)
                                self.log.track(record)
                                window, window_start = defaultdict(float), time.perf_counter()
                            if evaluating and step % cfg.eval_every == 0 and step < cfg.max_steps:
                                last_eval = self.evaluate_split("valid", model, step=step)
                                model.train()
                            if checkpoints.due(step):
                                checkpoints.save(model, trainer_state())
                        if signals.requested(acc):
                            saved = checkpoints.save(model, trainer_state())
                            self.log.write({"event": "preempted", "step": step, "signal": signals.received})
                            raise Preempted(
                                f"{signals.received} received: stopped after step {step} and saved {saved}. "
                                f"Continue with --resume (or trainer.resume=auto).", saved)
                        if step >= cfg.max_steps:
                            break
                    else:
                        epoch, done_in_epoch = epoch + 1, 0
        except TrainingCollapse as exc:
            bar.close()
            raise checkpoints.collapsed(exc) from None
        finally:
            bar.close()
            self.release()
        checkpoints.save(model, trainer_state())
        self.save_final(model)
        if "valid" in self.datasets:
            last_eval = self.evaluate_split("valid", model, step=step)
        skipped = (self.skip_budget.check_over_processes(acc, "train")
                   + sum(self.skip_budget.total(s) for s in self.datasets if s != "train"))
        if cfg.trackers:
            acc.end_training()
        return {**last_eval, **({"skipped_examples": float(skipped)} if skipped else {})}  # in the final summary

    def _training_data(self):
        """The training set (less what the processor's length limits drop and what is too short
        for one feature frame), its loader, and the model's batch transform (run in the loader)."""
        transform = self.model.make_batch_transform() if hasattr(self.model, "make_batch_transform") else None
        train_set, dropped = filter_training_examples(self.datasets["train"], self.processor, "data.train")
        if dropped:
            self.print(f"data.train: {dropped} of {len(self.datasets['train'])} examples dropped by the processor's "
                       f"length limits ({self.processor!r})")
        feature_extractor = getattr(self.model, "feature_extractor", None)
        if feature_extractor is not None:
            train_set, too_short = drop_featureless(train_set, self.processor, frame_lengths_fn(feature_extractor))
            self._leave_out_up_front("train", too_short, "examples too short for a single feature frame")
        train_loader = make_loader(train_set, self.processor, self.loader_cfg, train=True, seed=self.seed,
                                   where="data.train", transform=transform, on_bad_example=self.on_bad_example)
        return train_set, train_loader, transform

    def _prepare(self, optimizer, train_loader, scheduler):
        """Accelerate's ``prepare`` (DDP, FSDP or DeepSpeed wrapping), saying how the model is sharded."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            declare_fsdp_units(self.model)
        model, optimizer, train_loader, scheduler = acc.prepare(self.model, optimizer, train_loader, scheduler)
        if acc.distributed_type == DistributedType.FSDP:
            self.print(describe_fsdp_units(model))
        if self.deepspeed:
            self.print(describe_deepspeed(acc))
        return model, optimizer, train_loader, scheduler

    def save_final(self, model) -> Path:
        """Write ``final/`` (see :func:`d2v.train.checkpoint_policy.save_final`)."""
        return save_final(self, model)

    # ------------------------------------------------------------------ evaluation (d2v.train.evaluation)

    def evaluate(self) -> dict[str, float]:
        """An ``evaluate`` run's metrics (see :func:`d2v.train.evaluation.evaluate`)."""
        return evaluation.evaluate(self)

    def evaluate_split(self, split: str, model=None, *, step: int | None = None,
                       keep_predictions: bool = False) -> dict[str, float]:
        """The split's metrics, logged (see :func:`d2v.train.evaluation.evaluate_split`)."""
        return evaluation.evaluate_split(self, split, model, step=step, keep_predictions=keep_predictions)

    def eval_loader(self, split: str, batches: list[list[int]] | None = None):
        """A loader over ``batches`` of the split (default: this process's share)."""
        return evaluation.eval_loader(self, split, batches)


def run(spec: Spec, *, resume: bool | str = False) -> dict[str, float]:
    """Run a spec (train, pretrain or evaluate) and return the final evaluation metrics."""
    runner = Run(spec, resume=resume)
    try:
        metrics = runner.evaluate() if runner.task == "evaluate" else runner.train()
    except BaseException:
        close_process_group(runner.accelerator, in_step=False)
        raise
    close_process_group(runner.accelerator, in_step=True)
    if runner.task == "evaluate":
        return metrics
    return {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)} or metrics
