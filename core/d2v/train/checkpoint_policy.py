"""When a run saves, which checkpoint is good, and how a run starts fresh or resumes.

``checkpoint.py`` writes and reads checkpoint directories atomically and knows nothing of a run;
this module is the run's policy on top of it, kept apart so the loop only says *when*: never save
non-finite weights, remember which checkpoint an update then trained on (the one to recommend
after a collapse), resume from the newest checkpoint that loads with the spec's learning rate,
keep the spec a run started with, and write ``final/``. The functions take the
:class:`~d2v.train.loop.Run` (``run``) for its accelerator, settings and logs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from d2v.api.errors import SpecError, TrainingCollapse
from d2v.spec.config import dump_spec
from d2v.train.checkpoint import (load_trainer_state, quarantine_after, save_checkpoint, trim_metrics,
                                  write_text_atomic)
from d2v.train.parallel import check_checkpoint_layout


class Checkpoints:
    """A training run's checkpoints: how it starts (:meth:`start` or :meth:`resume`), when it
    saves (:meth:`due`, :meth:`save`) and what it says when it collapses (:meth:`collapsed`)."""

    def __init__(self, run):
        self.run = run
        # the newest checkpoint saved, and the newest one an update then trained on successfully
        # (finite weights can still be unusable: only the second kind is "good")
        self.last_saved: Path | None = None
        self.verified: Path | None = None

    def start(self) -> dict[str, int]:
        """A fresh run: the spec saved as ``spec.yaml``, a ``start`` event logged; the state at step 0."""
        run = self.run
        if run.is_main:
            write_text_atomic(run.output_dir / "spec.yaml", dump_spec(run.spec))
        run.log.write({"event": "start", "step": 0, "spec": getattr(run.spec, "source", None)})
        return {"step": 0, "epoch": 0, "batches_in_epoch": 0}

    def resume(self, scheduler) -> dict[str, int]:
        """Load the newest intact checkpoint of ``run.resume_from`` (model, optimizer, scheduler,
        RNG) and return its trainer state; the spec's learning rate applies from here."""
        run = self.run
        spec_lrs = list(getattr(getattr(scheduler, "scheduler", scheduler), "base_lrs", []) or [])
        checkpoint = load_newest_intact(run, run.resume_from)
        state = load_trainer_state(checkpoint)
        apply_spec_lr(run, scheduler, spec_lrs)
        run.print(f"resuming from {checkpoint} at step {state['step']}")
        keep_original_spec(run, state["step"])
        if run.is_main:
            trim_metrics(run.output_dir / "metrics.jsonl", state["step"])
        run.log.write({"event": "resume", "step": state["step"], "checkpoint": checkpoint.name})
        self.last_saved = self.verified = checkpoint
        return state

    def due(self, step: int) -> bool:
        """Every ``trainer.save_every`` steps before the last (the end of training always saves)."""
        cfg = self.run.trainer
        return bool(cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps)

    def trained_on(self) -> None:
        """An update was applied: the checkpoint it started from is good."""
        self.verified = self.last_saved or self.verified

    def save(self, model, trainer_state: dict[str, int]) -> Path:
        """Save, but never non-finite weights: they would replace the last good checkpoint."""
        run = self.run
        unwrapped = run.accelerator.unwrap_model(model)
        broken = [name for name, p in unwrapped.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            raise TrainingCollapse(
                f"the weights became non-finite at step {trainer_state['step']} ({len(broken)} tensors, e.g. "
                f"{', '.join(broken[:3])}); nothing was saved. Resume with a lower optim.lr or trainer.clip_norm > 0."
            )
        self.last_saved = save_checkpoint(run.accelerator, run.output_dir, trainer_state["step"], trainer_state,
                                          run.trainer.keep_last, protect=self.verified)
        return self.last_saved

    def collapsed(self, exc: TrainingCollapse) -> TrainingCollapse:
        """The error to stop with: checkpoints saved after the last good one are renamed
        ``suspect-*``, and the message says which checkpoint to resume from."""
        run, good = self.run, self.verified
        if run.is_main:
            moved = quarantine_after(run.output_dir, good)
            if moved:
                run.print(f"checkpoints saved after the last good update were renamed: "
                          f"{', '.join(p.name for p in moved)}")
        where = (f"The last good checkpoint is {good}." if good else
                 "No checkpoint is known to be good (any written since are kept as checkpoints/suspect-*).")
        return TrainingCollapse(f"{exc}\n{where}")


def load_newest_intact(run, candidates: list[Path]) -> Path:
    """Load the newest checkpoint that reads; report each damaged one by name and reason."""
    problems = []
    for checkpoint in candidates:
        try:
            check_checkpoint_layout(checkpoint, run.accelerator)
            run.accelerator.load_state(str(checkpoint))
            load_trainer_state(checkpoint)
        except SpecError:
            raise  # written under another setup (DeepSpeed or not): older checkpoints of the run are too
        except Exception as exc:  # noqa: BLE001 -- any unreadable file means: try the older one
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            problems.append(f"{checkpoint.name} ({reason})")
            run.print(f"checkpoint {checkpoint} cannot be loaded ({reason}); trying an older one")
            continue
        if problems:
            run.print(f"resuming from {checkpoint.name}, the newest intact checkpoint "
                      f"(skipped damaged: {'; '.join(problems)})")
        return checkpoint
    raise SpecError(f"--resume: no checkpoint under {run.output_dir / 'checkpoints'} can be loaded: "
                    f"{'; '.join(problems)}. Start a fresh run in another trainer.output_dir.")


def apply_spec_lr(run, scheduler, spec_lrs: list[float] | None) -> None:
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
    run.print(f"optim.lr differs from the checkpoint's ({saved[0]:.3g} -> {spec_lrs[0]:.3g}); using the spec's")


def keep_original_spec(run, step: int) -> None:
    """A resumed run never overwrites the spec it started with; a changed spec is saved beside it.
    ``trainer.resume`` is no change: it says how a session starts (``--resume`` sets it)."""
    import yaml

    def settings(text: str) -> dict:
        spec = yaml.safe_load(text) or {}
        (spec.get("trainer") or {}).pop("resume", None)
        return spec

    original = run.output_dir / "spec.yaml"
    text = dump_spec(run.spec)
    if run.is_main and original.exists() and settings(original.read_text()) != settings(text):
        changed = run.output_dir / f"spec.resumed-at-{step:08d}.yaml"
        write_text_atomic(changed, text)
        run.print(f"note: the spec differs from {original}; the resumed spec is saved as {changed}")


def save_final(run, model) -> Path:
    """Write ``final/``: the model's weights, the spec and the processor's assets (e.g. the
    tokenizer), so the directory is usable and exportable alone; replaced atomically."""
    final = run.output_dir / "final"
    acc = run.accelerator
    tmp = run.output_dir / ".final.tmp"
    if run.is_main:
        tmp.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_model(model, str(tmp), safe_serialization=True)  # every process: FSDP gathers the shards
    acc.wait_for_everyone()  # no process is still in tmp/ when it is renamed
    if run.is_main:
        (tmp / "spec.yaml").write_text(dump_spec(run.spec))
        save_assets = getattr(run.processor, "save_pretrained", None)
        if callable(save_assets):  # e.g. the tokenizer, so final/ is usable and exportable alone
            save_assets(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        run.print(f"saved final weights to {final}")
    acc.wait_for_everyone()
    return final
