"""The training / evaluation loop: one readable file on top of Hugging Face Accelerate.

Accelerate owns devices, mixed precision, gradient accumulation and multi-process
(``accelerate launch``); this file owns the order of things: build from the spec, train
for ``max_steps`` optimizer updates, log, evaluate, checkpoint, resume.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, gather_object,
                              send_to_device, set_seed)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from d2v.api import plugins
from d2v.spec.config import MAX_SKIPPED_FRACTION, EvaluateConfig, LoaderConfig, Spec, TrainerConfig, dump_spec, validate
from d2v.data.loading import (Collate, ProcessedDataset, batch_sampler_for, check_policy, drop_featureless,
                      filter_training_examples, make_loader, set_epoch)
from d2v.ssl.batch_masks import frame_lengths_fn
from d2v.api.errors import SpecError, TrainingCollapse
from d2v.api.interfaces import Head
from d2v.spec.model import build_component, build_model
from d2v.interop.weights import load_initial_weights
from d2v.train.label_names import adopt_label_names
from d2v.train.checkpoint import (load_trainer_state, prepare_run_dir, quarantine_after, save_checkpoint,
                                   trim_metrics, write_text_atomic)
from d2v.train.guards import (BadUpdates, EmptyBatches, Preempted, RunLock, SkipBudget, SkippedLog, StopSignals,
                               stop_with_launcher)
from d2v.nn.layer_options import apply_layer_options
from d2v.train.parallel import (DeepSpeedLoss, check_checkpoint_layout, configure_deepspeed, declare_fsdp_units,
                                 deepspeed_on_cpu, deepspeed_skip_reason, describe_deepspeed, describe_fsdp_units,
                                 enable_fsdp_on_cpu, launched_with_deepspeed, refuse_under_deepspeed,
                                 unused_parameters, wraps_in_ddp)
from d2v.train.pending import PendingUpdate, backward_loss, normalize_gradients, sample_size_of


def add_counts(totals: dict[str, Any], counts: dict[str, Any]) -> None:
    """Add one batch's (or process's) evaluation counts into ``totals``: numbers are summed,
    lists (per-example values a metric needs whole, e.g. scores for a rank correlation or an
    EER) are concatenated."""
    for key, value in counts.items():
        if isinstance(value, (list, tuple)):
            totals.setdefault(key, []).extend(value)
        else:
            totals[key] = totals.get(key, 0.0) + float(value)


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
    """Appends one JSON object per event to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:  # "time" (Unix seconds) lets `d2v runs` report wall time
            with self.path.open("a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


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
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),  # see _set_find_unused_parameters
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
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", self.is_main)
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
        optimizer = build_component(self.registry, "optimizer", self.spec["optim"], "optim", model=self.model)
        schedule_node = self.spec.get("schedule") or {"name": "constant"}
        scheduler = build_component(self.registry, "schedule", schedule_node, "schedule",
                                    optimizer=optimizer, total_steps=cfg.max_steps)
        self._set_find_unused_parameters(train_set, transform)
        if acc.distributed_type == DistributedType.FSDP:
            declare_fsdp_units(self.model)
        model, optimizer, train_loader, scheduler = acc.prepare(self.model, optimizer, train_loader, scheduler)
        if acc.distributed_type == DistributedType.FSDP:
            self.print(describe_fsdp_units(model))
        if self.deepspeed:
            self.print(describe_deepspeed(acc))
        state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
        if self.resume_from is None:
            if self.is_main:
                write_text_atomic(self.output_dir / "spec.yaml", dump_spec(self.spec))
            self.log.write({"event": "start", "step": 0, "spec": getattr(self.spec, "source", None)})
        else:
            spec_lrs = list(getattr(getattr(scheduler, "scheduler", scheduler), "base_lrs", []) or [])
            checkpoint = self._load_newest_intact(self.resume_from)
            state = load_trainer_state(checkpoint)
            self._apply_spec_lr(scheduler, spec_lrs)
            self.print(f"resuming from {checkpoint} at step {state['step']}")
            self._keep_original_spec(state["step"])
            if self.is_main:
                trim_metrics(self.output_dir / "metrics.jsonl", state["step"])
            self.log.write({"event": "resume", "step": state["step"], "checkpoint": checkpoint.name})
        if cfg.trackers:
            acc.init_trackers(self.output_dir.name, config={"task": self.task, "seed": self.seed})
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.print(f"{self.task}: {n_params / 1e6:.2f}M trainable parameters, {len(train_set)} "
                   f"training examples, {len(train_loader)} batches per epoch per process, {acc.num_processes} process(es)")

        trainable = [p for p in model.parameters() if p.requires_grad]
        deepspeed_loss = DeepSpeedLoss(model, acc, normalize=self.task == "pretrain") if self.deepspeed else None
        step, epoch, done_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        window: dict[str, float] = defaultdict(float)
        window_start = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (self.is_main and cfg.progress_bar), desc=self.task)
        last_eval: dict[str, float] = {}
        bad_updates = BadUpdates(cfg.max_bad_steps)
        empty_batches = EmptyBatches()
        # the newest checkpoint saved, and the newest one an update then trained on successfully
        # (finite weights can still be unusable: only the second kind is "good")
        self._last_saved = self._verified = checkpoint if self.resume_from is not None else None
        pending = PendingUpdate()  # the update being accumulated: losses and logs still on the device
        stand_in = None  # the last batch that loaded, run with a zero loss in place of an empty one

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
                        left_out = batch.pop("skipped_examples", None)
                        if left_out:
                            window["skipped_examples"] += len(left_out)
                            self.skipped_log.write("train", left_out)
                            self.skip_budget.add("train", left_out)
                        empty_batches.seen(batch, left_out)
                        with acc.accumulate(model):
                            if batch:
                                stand_in = batch
                                out = model(batch)
                                sample_size = sample_size_of(out)
                                pending.add(out.loss, getattr(out, "logs", None),
                                            len(batch.get("ids", ())) or int(batch["inputs"].shape[0]),
                                            lambda ids=batch.get("ids", ()): self._batch_names({"ids": ids}),
                                            sample_size=sample_size)
                                loss = backward_loss(out.loss, sample_size)
                            else:  # every example was left out: a zero loss keeps processes in step
                                loss, sample_size = self._zero_loss(model, trainable, stand_in), None
                                pending.add(loss, None, 0, lambda: "an empty batch", counted=False)
                            if deepspeed_loss is not None:  # it steps in backward: settle bad losses, normalise
                                loss = deepspeed_loss(loss, sample_size)
                            # backward even on a bad loss: every process must join the gradient all-reduce
                            acc.backward(loss)
                            skip_reason = None
                            if acc.sync_gradients:
                                skip_reason = self._apply_update(optimizer, trainable, pending, window)
                                if skip_reason is None:
                                    scheduler.step()
                                optimizer.zero_grad(set_to_none=True)
                        done_in_epoch += 1
                        if not acc.sync_gradients:
                            continue
                        if skip_reason is not None:
                            window["skipped_updates"] += 1
                            self.log.write({"event": "skipped_update", "step": step, "reason": skip_reason})
                            self.print(f"skipped the update after step {step}: {skip_reason}")
                            bad_updates.skipped(step, skip_reason, self._verified)
                        else:
                            bad_updates.ok()
                            self._verified = self._last_saved or self._verified
                            step += 1
                            window["steps"] += 1
                            unwrapped = acc.unwrap_model(model)
                            if hasattr(unwrapped, "after_optimizer_step"):
                                unwrapped.after_optimizer_step(step)
                            bar.update(1)
                        if skip_reason is None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                            record = self._train_record(window, step, epoch, scheduler, time.perf_counter() - window_start)
                            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
                            self.log.write(record)
                            self._track(record)
                            window, window_start = defaultdict(float), time.perf_counter()
                        if skip_reason is None:
                            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and "valid" in self.datasets:
                                last_eval = self.evaluate_split("valid", model, step=step)
                                model.train()
                            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                                self._save_checkpoint(model, trainer_state())
                        if self._stop_requested(signals):
                            saved = self._save_checkpoint(model, trainer_state())
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
            good = self._verified
            if self.is_main:
                moved = quarantine_after(self.output_dir, good)
                if moved:
                    self.print(f"checkpoints saved after the last good update were renamed: "
                               f"{', '.join(p.name for p in moved)}")
            where = (f"The last good checkpoint is {good}." if good else
                     "No checkpoint is known to be good (any written since are kept as checkpoints/suspect-*).")
            raise TrainingCollapse(f"{exc}\n{where}") from None
        finally:
            bar.close()
            self.release()
        self._save_checkpoint(model, trainer_state())
        self.save_final(model)
        if "valid" in self.datasets:
            last_eval = self.evaluate_split("valid", model, step=step)
        skipped = self._check_skip_budget("train") + sum(self.skip_budget.total(s) for s in self.datasets if s != "train")
        if cfg.trackers:
            acc.end_training()
        return {**last_eval, **({"skipped_examples": float(skipped)} if skipped else {})}  # in the final summary

    def _set_find_unused_parameters(self, train_set, transform) -> None:
        """Tell DDP to look for unused parameters only when some can be unused: LayerDrop, or
        parameters a probe batch leaves without gradient (e.g. a pooler the head ignores)."""
        acc, setting = self.accelerator, self.trainer.find_unused_parameters
        if not wraps_in_ddp(acc) or acc.ddp_handler is None:
            if setting != "auto" and acc.num_processes > 1:  # the spec may serve DDP launches too: say, not stop
                self.print(f"note: trainer.find_unused_parameters: {str(setting).lower()} is a DDP setting; "
                           f"it does nothing under {acc.distributed_type.value}")
            return
        if setting == "auto":
            layerdrop = any(float(getattr(m, "layerdrop", 0) or 0) > 0 for m in self.model.modules())
            setting = layerdrop or bool(unused_parameters(self.model, self._probe_batch(train_set, transform), acc.device))
        acc.ddp_handler.find_unused_parameters = bool(setting)

    def _probe_batch(self, train_set, transform) -> dict[str, Any]:
        """The first training batch, built without touching the run's RNG."""
        indices = next(iter(batch_sampler_for(train_set, self.processor, self.loader_cfg, train=True,
                                              seed=self.seed, where="data.train")))
        dataset = ProcessedDataset(train_set, self.processor, train=True, seed=self.seed)
        with torch.random.fork_rng(devices=[]):
            return Collate(self.processor.collate, transform, self.seed)([dataset[i] for i in indices])

    def _zero_loss(self, model, trainable, stand_in: dict[str, Any] | None):
        """A zero loss whose backward joins the gradient all-reduce, for a process whose batch had
        no loadable example. Under FSDP the model must also run forward (it gathers parameters
        from every process then), under DeepSpeed give gradients to the same parameters as the
        other processes' batches (ZeRO-2 reduces them in buckets): on the last batch that loaded."""
        if (self.accelerator.distributed_type == DistributedType.FSDP or self.deepspeed) and stand_in is not None:
            return model(stand_in).loss * 0.0
        return sum(p.sum() for p in trainable) * 0.0

    # ------------------------------------------------------------------ guarded steps

    def _apply_update(self, optimizer, trainable, pending: PendingUpdate, window: dict[str, Any]) -> str | None:
        """Normalise, clip and step, unless a loss or the gradient norm is not finite; returns why
        the update was skipped (``None`` when it was applied). Every process reaches the same
        decision: the gradient norm is computed after the all-reduce, and the count of bad
        losses is summed (in the same all-reduce as the update's sample size). The losses, the
        norm and that count reach the host in one read."""
        acc, cfg = self.accelerator, self.trainer
        skipped = torch.tensor([float(self.skip_budget.loaded_count("train"))], dtype=torch.float64).to(acc.device)
        counts = torch.cat([pending.counts(acc.device), skipped])  # [bad losses, weighted, sample size, left out]
        if acc.num_processes > 1:
            counts = acc.reduce(counts, reduction="sum")
        if not self.deepspeed:  # DeepSpeed has stepped already, normalised in backward (DeepSpeedLoss)
            averaged_over = acc.num_processes * acc.gradient_accumulation_steps  # Accelerate's and DDP/FSDP's means
            normalize_gradients([p.grad for p in trainable if p.grad is not None], counts[1], counts[2], averaged_over)
        max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(trainable, max_norm)  # DeepSpeed: the norm its step saw (it clipped there)
        settled, (bad_count, left_out) = pending.settle(grad_norm, window, counts[[0, 3]])
        if self.skip_budget.total("train", left_out) > self.skip_budget.allowed("train"):
            self._check_skip_budget("train")  # every process: the sum is the same everywhere
        reason = settled.bad_loss
        if reason is None and bad_count > 0:
            reason = "a non-finite loss on another process"
        if reason is None and not math.isfinite(settled.grad_norm):
            reason = f"gradient norm {settled.grad_norm}"
        if reason is not None and acc.scaler is None and not self.deepspeed:
            return reason
        optimizer.step()  # with fp16 the grad scaler skips a non-finite step itself and lowers its scale
        if self.deepspeed:  # its step (a no-op here) ran in backward: its verdict decides
            reason = deepspeed_skip_reason(optimizer.step_was_skipped, reason)
        elif getattr(optimizer, "step_was_skipped", False):
            return reason or "fp16 overflow (the grad scaler lowered its loss scale)"
        if reason is not None:
            return reason
        window["grad_norm"] += settled.grad_norm
        return None

    def _stop_requested(self, signals: StopSignals) -> bool:
        requested = signals.received is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if requested else 0.0], device=self.accelerator.device)
            requested = float(self.accelerator.reduce(flag, reduction="sum")) > 0
            if requested:
                signals.received = signals.received or "a stop signal (on another process)"
        return requested

    @staticmethod
    def _batch_names(batch: dict[str, Any]) -> str:
        ids = [str(i) for i in batch.get("ids", ())]
        shown = ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
        return f"the batch of {shown}" if ids else "this batch"

    def _save_checkpoint(self, model, trainer_state: dict[str, int]) -> Path:
        """Save, but never non-finite weights: they would replace the last good checkpoint."""
        unwrapped = self.accelerator.unwrap_model(model)
        broken = [name for name, p in unwrapped.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            raise TrainingCollapse(
                f"the weights became non-finite at step {trainer_state['step']} ({len(broken)} tensors, e.g. "
                f"{', '.join(broken[:3])}); nothing was saved. Resume with a lower optim.lr or trainer.clip_norm > 0."
            )
        self._last_saved = save_checkpoint(self.accelerator, self.output_dir, trainer_state["step"], trainer_state,
                                           self.trainer.keep_last, protect=self._verified)
        return self._last_saved

    def _apply_spec_lr(self, scheduler, spec_lrs: list[float] | None) -> None:
        """A checkpoint restores the learning rate it was saved with; resuming with another
        ``optim.lr`` (the usual cure for a diverging run) should take effect, so the spec's
        base rates replace the saved ones and the schedule continues from there."""
        inner = getattr(scheduler, "scheduler", scheduler)
        saved = list(getattr(inner, "base_lrs", []) or [])
        if not spec_lrs or not saved or saved == spec_lrs or not hasattr(inner, "lr_lambdas"):
            return
        inner.base_lrs = list(spec_lrs)
        for group, base, factor in zip(inner.optimizer.param_groups, spec_lrs, inner.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(inner.last_epoch)
        inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
        self.print(f"optim.lr differs from the checkpoint's ({saved[0]:.3g} -> {spec_lrs[0]:.3g}); using the spec's")

    def _load_newest_intact(self, candidates: list[Path]) -> Path:
        """Load the newest checkpoint that reads; report each damaged one by name and reason."""
        problems = []
        for checkpoint in candidates:
            try:
                check_checkpoint_layout(checkpoint, self.accelerator)
                self.accelerator.load_state(str(checkpoint))
                load_trainer_state(checkpoint)
            except SpecError:
                raise  # written under another setup (DeepSpeed or not): older checkpoints of the run are too
            except Exception as exc:  # noqa: BLE001 -- any unreadable file means: try the older one
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                problems.append(f"{checkpoint.name} ({reason})")
                self.print(f"checkpoint {checkpoint} cannot be loaded ({reason}); trying an older one")
                continue
            if problems:
                self.print(f"resuming from {checkpoint.name}, the newest intact checkpoint "
                           f"(skipped damaged: {'; '.join(problems)})")
            return checkpoint
        raise SpecError(f"--resume: no checkpoint under {self.output_dir / 'checkpoints'} can be loaded: "
                        f"{'; '.join(problems)}. Start a fresh run in another trainer.output_dir.")

    def _keep_original_spec(self, step: int) -> None:
        """A resumed run never overwrites the spec it started with; a changed spec is saved beside it.
        ``trainer.resume`` is no change: it says how a session starts (``--resume`` sets it)."""
        import yaml

        def settings(text: str) -> dict:
            spec = yaml.safe_load(text) or {}
            (spec.get("trainer") or {}).pop("resume", None)
            return spec

        original = self.output_dir / "spec.yaml"
        text = dump_spec(self.spec)
        if self.is_main and original.exists() and settings(original.read_text()) != settings(text):
            changed = self.output_dir / f"spec.resumed-at-{step:08d}.yaml"
            write_text_atomic(changed, text)
            self.print(f"note: the spec differs from {original}; the resumed spec is saved as {changed}")

    def _track(self, record: dict[str, Any]) -> None:
        """Send a ``metrics.jsonl`` record's numbers to the Accelerate trackers (TensorBoard
        etc.) as ``<split>/<name>`` at its step, so both logs hold the same values."""
        if self.trainer.trackers and record.get("step") is not None:
            self.accelerator.log({f"{record['split']}/{k}": v for k, v in record.items()
                                  if k not in ("split", "step") and isinstance(v, (int, float))}, step=record["step"])

    def _train_record(self, window: dict[str, float], step: int, epoch: int, scheduler, seconds: float) -> dict[str, Any]:
        totals = torch.tensor([window["loss"], window["loss_weight"], window["examples"]],
                              device=self.accelerator.device, dtype=torch.float64)
        totals = self.accelerator.reduce(totals, reduction="sum")
        record: dict[str, Any] = {"split": "train", "step": step, "epoch": epoch,
                                  "loss": float(totals[0] / max(1e-12, float(totals[1]))),
                                  "lr": float(scheduler.get_last_lr()[0]),
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

    def save_final(self, model) -> Path:
        final = self.output_dir / "final"
        acc = self.accelerator
        tmp = self.output_dir / ".final.tmp"
        if self.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_model(model, str(tmp), safe_serialization=True)  # every process: FSDP gathers the shards
        acc.wait_for_everyone()  # no process is still in tmp/ when it is renamed
        if self.is_main:
            (tmp / "spec.yaml").write_text(dump_spec(self.spec))
            save_assets = getattr(self.processor, "save_pretrained", None)
            if callable(save_assets):  # e.g. the tokenizer, so final/ is usable and exportable alone
                save_assets(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.print(f"saved final weights to {final}")
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ evaluation

    def _eval_batches(self, split: str) -> tuple[list[list[int]], int]:
        """This process's share of the split's batches and how many of them are its own: no
        duplicated examples, so the summed counts are exact whatever the number of processes.
        Under FSDP every forward gathers parameters from all processes, so the shorter shares
        are topped up with repeats of the first batch, run and not counted."""
        sampler = batch_sampler_for(self.datasets[split], self.processor, self.loader_cfg, train=False,
                                    seed=self.seed, where=f"data.{split}")
        acc = self.accelerator
        batches = list(sampler)
        mine = batches[acc.process_index::acc.num_processes]
        real = len(mine)
        if acc.distributed_type == DistributedType.FSDP and batches:
            mine += [batches[0]] * (math.ceil(len(batches) / acc.num_processes) - real)
        return mine, real

    def eval_loader(self, split: str, batches: list[list[int]] | None = None) -> DataLoader:
        """A loader over ``batches`` of the split (default: this process's share)."""
        return DataLoader(ProcessedDataset(self.datasets[split], self.processor, train=False, seed=self.seed,
                                           on_bad_example=self.on_bad_example, where=f"data.{split}"),
                          batch_sampler=self._eval_batches(split)[0] if batches is None else batches,
                          collate_fn=Collate(self.processor.collate), num_workers=self.loader_cfg.num_workers)

    @torch.no_grad()
    def evaluate_split(self, split: str, model=None, *, step: int | None = None,
                       keep_predictions: bool = False) -> dict[str, float]:
        acc = self.accelerator
        model = model if model is not None else acc.prepare_model(self.model, evaluation_mode=True)
        unwrapped = acc.unwrap_model(model)
        head = getattr(unwrapped, "head", None)
        head = head if isinstance(head, Head) else None
        model.eval()
        counts: dict[str, Any] = {}
        rows: list[tuple[str, Any, Any]] = []
        left_out_count = 0
        batches, own = self._eval_batches(split)
        # FSDP gathers parameters in every forward: all processes run as many. Anywhere else each
        # process holds the whole model and evaluates its share alone (DDP's wrapper would
        # broadcast buffers in forward, a collective the process with fewer batches never joins)
        in_step = acc.distributed_type == DistributedType.FSDP
        model = model if in_step else unwrapped
        stand_in = None
        for index, batch in enumerate(self.eval_loader(split, batches)):
            left_out = batch.pop("skipped_examples", None)
            if left_out and index < own:
                left_out_count += len(left_out)
                self.skipped_log.write(split, left_out)
                self.skip_budget.add(split, left_out)
            if not batch or index >= own:
                if in_step and (batch or stand_in):  # run, not counted
                    with self._autocast():
                        model(send_to_device(batch, acc.device) if batch else stand_in)
                continue
            batch = send_to_device(batch, acc.device)
            stand_in = stand_in or batch
            with self._autocast():
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
            self.print(f"[{split}] {int(all_counts['skipped_examples'])} examples could not be loaded and were "
                       f"left out of the metrics (see {self.skipped_log.path})")
        if all_counts.get("objective_loss_weight"):
            metrics["loss"] = all_counts["objective_loss_sum"] / all_counts["objective_loss_weight"]
        if head is not None:
            metrics.update(head.summarize(dict(all_counts)))
        record = {"split": split, "step": step, **metrics}
        self.log.write(record)
        self._track(record)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.print(f"[{split}{'' if step is None else f' @ step {step}'}] {shown}")
        if keep_predictions:
            self._write_predictions(gather_object(rows))
        self.skip_budget.check(split, int(all_counts.get("skipped_examples", 0)))  # the metrics are written first
        return metrics

    def _autocast(self):
        """Accelerate's autocast. DeepSpeed turns that off and autocasts inside its engine's forward;
        evaluation calls the model itself, so it autocasts the same way there."""
        if self.deepspeed and self.precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def _write_predictions(self, rows: list) -> None:
        if not self.is_main:
            return
        cfg = EvaluateConfig(**(self.spec.get("evaluate") or {}))
        path = self.output_dir / cfg.output
        lines = ["id\treference\thypothesis"] + [f"{i}\t{ref}\t{hyp}" for i, ref, hyp in sorted(rows, key=lambda r: str(r[0]))]
        write_text_atomic(path, "\n".join(lines) + "\n")
        self.print(f"wrote {len(rows)} hypotheses to {path}")

    def evaluate(self) -> dict[str, float]:
        cfg = EvaluateConfig(**(self.spec.get("evaluate") or {}))
        if self.is_main:  # an evaluation in a training run's directory leaves that run's spec.yaml alone
            if not (self.output_dir / "spec.yaml").exists():
                write_text_atomic(self.output_dir / "spec.yaml", dump_spec(self.spec))
        self.log.write({"event": "evaluate", "spec": getattr(self.spec, "source", None), "split": cfg.split,
                        "checkpoint": cfg.checkpoint or ((self.spec.get("model") or {}).get("init") or {}).get("checkpoint")})
        if cfg.checkpoint:
            report = load_initial_weights(self.model, cfg.checkpoint)
            if report.new:
                raise SpecError(f"evaluate.checkpoint: '{cfg.checkpoint}' does not provide every weight of the model "
                                f"in the spec.\n{report.summary()}")
            self.print(report.summary())
        metrics = self.evaluate_split(cfg.split, keep_predictions=True)
        if self.is_main:
            write_text_atomic(self.output_dir / f"{cfg.split}_metrics.json", json.dumps(metrics, indent=2) + "\n")
        return metrics

    def _check_skip_budget(self, split: str) -> int:
        """Stop (SpecError, exit 2) when ``split`` left out more examples than
        ``data.max_skipped_fraction`` allows, counting each file once over all processes and
        epochs; returns how many it left out. Every process must call it (it gathers the ids)."""
        loaded = dict(self.skip_budget.loaded.get(split, {}))
        if self.accelerator.num_processes > 1:
            for part in gather_object([loaded]):
                loaded.update(part)
        self.skip_budget.check(split, len(loaded), examples=loaded)
        return self.skip_budget.total(split, len(loaded))


def _close_process_group(accelerator: Accelerator, *, in_step: bool) -> None:
    """Tear the process group down before the interpreter exits: left to exit handlers, gloo's
    threads can abort a finished FSDP worker ("terminate called without an active exception").
    ``in_step``: every process got here normally, so they can meet at a barrier first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if in_step:
            accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def run(spec: Spec, *, resume: bool | str = False) -> dict[str, float]:
    """Run a spec (train, pretrain or evaluate) and return the final evaluation metrics."""
    runner = Run(spec, resume=resume)
    try:
        metrics = runner.evaluate() if runner.task == "evaluate" else runner.train()
    except BaseException:
        _close_process_group(runner.accelerator, in_step=False)
        raise
    _close_process_group(runner.accelerator, in_step=True)
    if runner.task == "evaluate":
        return metrics
    return {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)} or metrics
