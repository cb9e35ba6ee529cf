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
from accelerate.utils import DistributedDataParallelKwargs, gather_object, send_to_device, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from d2v import plugins
from d2v.config import EvaluateConfig, LoaderConfig, Spec, TrainerConfig, dump_spec, validate
from d2v.data import Collate, ProcessedDataset, batch_sampler_for, filter_training_examples, make_loader, set_epoch
from d2v.errors import SpecError, TrainingCollapse
from d2v.interfaces import Head
from d2v.model import build_component, build_model, load_initial_weights
from d2v.runner.checkpoint import load_trainer_state, prepare_run_dir, save_checkpoint, write_text_atomic


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


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Run:
    """Everything built from a spec, ready to train or evaluate."""

    def __init__(self, spec: Spec, *, resume: bool = False):
        validate(spec)
        self.spec = spec
        self.task = spec.get("task", "finetune")
        self.seed = int(spec.get("seed", 1))
        self.trainer = TrainerConfig(**(spec.get("trainer") or {}))
        self.loader_cfg = LoaderConfig(**((spec.get("data") or {}).get("loader") or {}))
        self.output_dir = Path(self.trainer.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=self.trainer.mixed_precision,
            gradient_accumulation_steps=self.trainer.grad_accum,
            cpu=self.trainer.cpu or not torch.cuda.is_available(),  # CPU-only: multi-process over gloo
            step_scheduler_with_optimizer=False,
            log_with=self.trainer.trackers or None,
            project_dir=str(self.output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.is_main = self.accelerator.is_main_process
        self.resume_from = None
        if self.task != "evaluate":
            self.resume_from = prepare_run_dir(self.output_dir, resume=resume)
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        set_seed(self.seed)
        self.registry = plugins.registry()
        data = spec["data"]
        # data first: a missing corpus is the cheapest mistake to report
        self.datasets = {
            split: build_component(self.registry, "dataset", data[split], f"data.{split}")
            for split in ("train", "valid", "test")
            if split in data and (self.task != "evaluate" or split == self._eval_split())
        }
        self.processor = build_component(self.registry, "processor", data["processor"], "data.processor")
        self.model = build_model(spec["model"], self.registry, self.task)
        check_vocabulary(self.processor, self.model)
        init = (spec["model"] or {}).get("init")
        if init and not self.resume_from:
            report = load_initial_weights(self.model, init["checkpoint"], strict=bool(init.get("strict", False)))
            self.print(report.summary())
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", self.is_main)

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
        train_loader = make_loader(train_set, self.processor, self.loader_cfg, train=True,
                                   seed=self.seed, where="data.train", transform=transform)
        optimizer = build_component(self.registry, "optimizer", self.spec["optim"], "optim", model=self.model)
        schedule_node = self.spec.get("schedule") or {"name": "constant"}
        scheduler = build_component(self.registry, "schedule", schedule_node, "schedule",
                                    optimizer=optimizer, total_steps=cfg.max_steps)
        model, optimizer, train_loader, scheduler = acc.prepare(self.model, optimizer, train_loader, scheduler)
        state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
        if self.resume_from is None:
            if self.is_main:
                write_text_atomic(self.output_dir / "spec.yaml", dump_spec(self.spec))
        else:
            acc.load_state(str(self.resume_from))
            state = load_trainer_state(self.resume_from)
            self.print(f"resuming from {self.resume_from} at step {state['step']}")
            self._keep_original_spec(state["step"])
            self.log.write({"event": "resume", "step": state["step"]})
        if cfg.trackers:
            acc.init_trackers(self.output_dir.name, config={"task": self.task, "seed": self.seed})
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.print(f"{self.task}: {n_params / 1e6:.2f}M trainable parameters, {len(train_set)} "
                   f"training examples, {len(train_loader)} batches per epoch per process, {acc.num_processes} process(es)")

        trainable = [p for p in model.parameters() if p.requires_grad]
        step, epoch, done_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        window: dict[str, float] = defaultdict(float)
        window_start = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (self.is_main and cfg.progress_bar), desc=self.task)
        last_eval: dict[str, float] = {}
        if cfg.eval_before_training and step == 0 and "valid" in self.datasets:
            self.evaluate_split("valid", model, step=0)  # the untrained baseline, for comparison
        model.train()
        try:
            while step < cfg.max_steps:
                set_epoch(train_loader, epoch)
                batches = acc.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
                for batch in batches:
                    with acc.accumulate(model):
                        out = model(batch)
                        loss = out.loss
                        if not torch.isfinite(loss):
                            raise TrainingCollapse(
                                f"the loss is {loss.item()} at step {step}; lower optim.lr, enable trainer.clip_norm, "
                                f"or check the data (empty transcripts, silent audio)."
                            )
                        acc.backward(loss)
                        if acc.sync_gradients:
                            max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
                            window["grad_norm"] += float(acc.clip_grad_norm_(trainable, max_norm))
                        optimizer.step()
                        if acc.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    done_in_epoch += 1
                    window["loss"] += float(loss.detach())
                    window["micro_batches"] += 1
                    window["examples"] += len(batch.get("ids", ())) or int(batch["inputs"].shape[0])
                    for key, value in (getattr(out, "logs", None) or {}).items():
                        if key != "loss":  # the loss is already counted above
                            window[key] += float(value)
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    window["steps"] += 1
                    unwrapped = acc.unwrap_model(model)
                    if hasattr(unwrapped, "after_optimizer_step"):
                        unwrapped.after_optimizer_step(step)
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.max_steps:
                        record = self._train_record(window, step, epoch, scheduler, time.perf_counter() - window_start)
                        bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
                        self.log.write(record)
                        if cfg.trackers:
                            acc.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
                        window, window_start = defaultdict(float), time.perf_counter()
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and "valid" in self.datasets:
                        last_eval = self.evaluate_split("valid", model, step=step)
                        model.train()
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                        save_checkpoint(acc, self.output_dir, step,
                                        {"step": step, "epoch": epoch, "batches_in_epoch": done_in_epoch}, cfg.keep_last)
                    if step >= cfg.max_steps:
                        break
                else:
                    epoch, done_in_epoch = epoch + 1, 0
        except TrainingCollapse as exc:
            bar.close()
            raise TrainingCollapse(f"{exc}\nThe last good checkpoint (if any) is in {self.output_dir / 'checkpoints'}.") from None
        bar.close()
        save_checkpoint(acc, self.output_dir, step, {"step": step, "epoch": epoch, "batches_in_epoch": done_in_epoch},
                        cfg.keep_last)
        self.save_final(model)
        if "valid" in self.datasets:
            last_eval = self.evaluate_split("valid", model, step=step)
        if cfg.trackers:
            acc.end_training()
        return last_eval

    def _keep_original_spec(self, step: int) -> None:
        """A resumed run never overwrites the spec it started with; a changed spec is saved beside it."""
        original = self.output_dir / "spec.yaml"
        text = dump_spec(self.spec)
        if self.is_main and original.exists() and original.read_text() != text:
            changed = self.output_dir / f"spec.resumed-at-{step:08d}.yaml"
            write_text_atomic(changed, text)
            self.print(f"note: the spec differs from {original}; the resumed spec is saved as {changed}")

    def _train_record(self, window: dict[str, float], step: int, epoch: int, scheduler, seconds: float) -> dict[str, Any]:
        totals = torch.tensor([window["loss"], window["micro_batches"], window["examples"]],
                              device=self.accelerator.device, dtype=torch.float64)
        totals = self.accelerator.reduce(totals, reduction="sum")
        record: dict[str, Any] = {"split": "train", "step": step, "epoch": epoch,
                                  "loss": float(totals[0] / max(1.0, float(totals[1]))),
                                  "lr": float(scheduler.get_last_lr()[0]),
                                  "grad_norm": window["grad_norm"] / max(1.0, window["steps"]),
                                  "examples_per_second": float(totals[2]) / max(seconds, 1e-9)}
        skip = {"loss", "micro_batches", "examples", "grad_norm", "steps"}
        for key, value in window.items():
            if key not in skip:
                record[key] = value / max(1.0, window["micro_batches"])
        return record

    def save_final(self, model) -> Path:
        final = self.output_dir / "final"
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            tmp = self.output_dir / ".final.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            acc.save_model(model, str(tmp), safe_serialization=True)
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

    def eval_loader(self, split: str) -> DataLoader:
        """This process's share of the split's batches: no duplicated examples, so the
        summed counts are exact whatever the number of processes."""
        dataset = self.datasets[split]
        sampler = batch_sampler_for(dataset, self.processor, self.loader_cfg, train=False, seed=self.seed,
                                    where=f"data.{split}")
        acc = self.accelerator
        mine = list(sampler)[acc.process_index::acc.num_processes]
        return DataLoader(ProcessedDataset(dataset, self.processor, train=False, seed=self.seed),
                          batch_sampler=mine, collate_fn=Collate(self.processor.collate),
                          num_workers=self.loader_cfg.num_workers)

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
        for batch in self.eval_loader(split):
            batch = send_to_device(batch, acc.device)
            with acc.autocast():
                out = model(batch)
            if out.loss is not None:
                add_counts(counts, {"objective_loss_sum": float(out.loss), "objective_loss_batches": 1})
            if head is not None:
                add_counts(counts, head.eval_counts(out.head_output, batch))
                if keep_predictions:
                    preds = head.predict(out.head_output, batch)
                    rows.extend(zip(batch.get("ids", [""] * len(preds)), head.references(batch), preds))
        all_counts: dict[str, Any] = {}
        for part in gather_object([counts]):
            add_counts(all_counts, part)
        metrics: dict[str, float] = {}
        if all_counts.get("objective_loss_batches"):
            metrics["loss"] = all_counts["objective_loss_sum"] / all_counts["objective_loss_batches"]
        if head is not None:
            metrics.update(head.summarize(dict(all_counts)))
        record = {"split": split, "step": step, **metrics}
        self.log.write(record)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.print(f"[{split}{'' if step is None else f' @ step {step}'}] {shown}")
        if keep_predictions:
            self._write_predictions(gather_object(rows))
        return metrics

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


def run(spec: Spec, *, resume: bool = False) -> dict[str, float]:
    """Run a spec (train, pretrain or evaluate) and return the final evaluation metrics."""
    runner = Run(spec, resume=resume)
    if runner.task == "evaluate":
        return runner.evaluate()
    metrics = runner.train()
    return {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)} or metrics
