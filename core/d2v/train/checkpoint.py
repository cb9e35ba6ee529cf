"""Run directories and atomic checkpoints.

Layout of a run directory::

    <output_dir>/spec.yaml              the resolved spec (what was actually run)
    <output_dir>/metrics.jsonl          one JSON object per log/eval event (appended)
    <output_dir>/checkpoints/step-000100/   accelerate state: model.safetensors, optimizer,
                                            scheduler, RNG of every process + trainer_state.json
    <output_dir>/checkpoints/latest     name of the newest complete checkpoint
    <output_dir>/final/                 model.safetensors + spec.yaml (+ head assets) for init/eval

A checkpoint is written to a temporary directory and renamed into place, and ``latest`` is
replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from d2v.api.errors import SpecError


class _TiedWeightsNote(logging.Filter):
    """Accelerate warns whenever it saves tied weights once ("Removed shared tensor ...").
    d2v ties LM heads to the word embeddings on purpose, and loading restores the tie (the
    init report and ``--resume`` fill both names from the one saved tensor), so the warning
    would only alarm users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())

TRAINER_STATE = "trainer_state.json"


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def resume_candidates(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first (the ``latest`` pointer's one leading)."""
    root = checkpoints_dir(output_dir)
    if not root.exists():
        return []
    complete = sorted((p for p in root.glob("step-*") if (p / TRAINER_STATE).exists()), reverse=True)
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if named in complete:
            complete.remove(named)
            complete.insert(0, named)
    return complete


def latest_checkpoint(output_dir: Path) -> Path | None:
    candidates = resume_candidates(output_dir)
    return candidates[0] if candidates else None


def trim_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after ``step`` (written before a kill, redone after the
    resume), so ``metrics.jsonl`` never repeats a step. Returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            record_step = None  # a line cut short by the kill
            dropped += 1
            continue
        if isinstance(record_step, int) and record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_run_dir(output_dir: Path, *, resume: bool | str) -> list[Path] | None:
    """Create the run directory; refuse to overwrite an existing run unless resuming.

    Returns the checkpoints to try resuming from, newest first (``None`` for a fresh run).
    ``resume="auto"`` resumes when a checkpoint exists and starts fresh otherwise.
    """
    candidates = resume_candidates(output_dir)
    if resume == "auto" and not candidates and not (output_dir / "final").exists():
        resume = False
    elif resume == "auto":
        resume = True
    if resume:
        if not candidates:
            finished = " (it holds a finished run's final/ weights)" if (output_dir / "final").exists() else ""
            raise SpecError(
                f"--resume / trainer.resume: no complete checkpoint under {checkpoints_dir(output_dir)}{finished}; "
                f"start fresh without --resume and with trainer.resume: false, in another trainer.output_dir."
            )
        return candidates
    if candidates or (output_dir / "final").exists():
        raise SpecError(
            f"trainer.output_dir '{output_dir}' already holds a run (checkpoints or final weights). "
            f"Pass --resume to continue it, or choose another trainer.output_dir; nothing was overwritten."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return None


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, keep_last: int,
                    protect: Path | None = None) -> Path:
    """Save accelerate state + trainer state atomically and prune old checkpoints (never
    ``protect``: the newest checkpoint known to train on)."""
    root = checkpoints_dir(output_dir)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", name)
        if keep_last > 0:
            old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]
            for path in (p for p in old if p != protect):
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def quarantine_after(output_dir: Path, good: Path | None) -> list[Path]:
    """Rename the checkpoints newer than ``good`` to ``suspect-step-*`` (kept for inspection,
    never resumed from) and point ``latest`` at ``good``: they were saved by a run that then
    could not take a single good update, so their weights are finite but unusable."""
    root = checkpoints_dir(output_dir)
    moved = []
    for path in sorted(root.glob("step-*")) if root.exists() else []:
        if path.is_dir() and (good is None or path.name > good.name):
            target = root / f"suspect-{path.name}"
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            moved.append(target)
    if good is not None:
        write_text_atomic(root / "latest", good.name)
    elif (root / "latest").exists():
        (root / "latest").unlink()
    return moved


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())
