"""What keeps a long run from losing work: skipped bad updates, preemption signals, one writer.

* :class:`BadUpdates` -- an update whose loss or gradient norm is not finite (or that the fp16
  grad scaler skipped) changes nothing: no optimizer step, no schedule step, no step count, no
  EMA. Too many in a row stop the run (the weights are then still the last good ones).
* :class:`StopSignals` -- SIGTERM (what SLURM and cloud schedulers send before killing a job),
  SIGUSR1 (SLURM's ``--signal``) and SIGINT (Ctrl-C) ask the run to stop after the current
  update (:meth:`StopSignals.requested` asks every process); the runner then writes a checkpoint
  and exits with :data:`PREEMPTED_EXIT_CODE`.
* :class:`SkippedLog` / :class:`SkipBudget` / :class:`EmptyBatches` -- examples that cannot be
  loaded (``data.on_bad_example: skip``) are named in ``skipped.tsv`` and counted against
  ``data.max_skipped_fraction``; past it, or when every batch is left out, the run stops.
* :class:`RunLock` -- an exclusive ``flock`` on ``<output_dir>/.lock`` so two jobs never write
  into one run directory; the kernel drops it when the process dies, however it dies, and
  forked children (data-loader workers) do not keep it alive after their parent is gone.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import torch
from accelerate.utils import gather_object

from d2v.api.errors import SpecError, TrainingCollapse

#: exit status of a run that stopped on a signal after saving (EX_TEMPFAIL: "try again")
PREEMPTED_EXIT_CODE = 75

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


def stop_with_launcher() -> bool:
    """Ask Linux to send this process SIGTERM when its parent dies. Under ``accelerate launch``
    (torchrun sets ``LOCAL_RANK``) a launcher killed with SIGKILL would otherwise leave its
    workers training and writing into the run directory; with this they checkpoint and stop."""
    if os.environ.get("LOCAL_RANK") is None or not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    return os.getppid() != 1  # the parent may already be gone


class BadUpdates:
    """Counts skipped updates; raises after ``max_in_a_row`` consecutive ones."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = int(max_in_a_row)
        self.in_a_row = 0
        self.total = 0

    def skipped(self, step: int, reason: str, last_good: Path | None) -> None:
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            advice = (f"the last good checkpoint is {last_good}: resume from it with a lower optim.lr or "
                      f"trainer.clip_norm > 0" if last_good else
                      "no checkpoint is known to be good (one an update then trained on); start again with a lower "
                      "optim.lr or trainer.clip_norm > 0")
            raise TrainingCollapse(
                f"{self.in_a_row} updates in a row were skipped after step {step} ({reason}); {advice} "
                f"(trainer.max_bad_steps sets how many skipped updates in a row are tolerated)."
            )

    def ok(self) -> None:
        self.in_a_row = 0


class StopSignals:
    """Context manager: records the first stop signal instead of dying on it; a second Ctrl-C
    interrupts at once (the checkpoint being written is atomic, so nothing is damaged)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and name == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or name

    def __enter__(self) -> "StopSignals":
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except ValueError:  # not the main thread (e.g. a notebook's worker thread)
                    pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, accelerator) -> bool:
        """Whether any process received a stop signal (every process must ask: it is a reduction)."""
        requested = self.received is not None
        if accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
            requested = float(accelerator.reduce(flag, reduction="sum")) > 0
            if requested:
                self.received = self.received or "a stop signal (on another process)"
        return requested


class SkippedLog:
    """Appends ``split<TAB>example id<TAB>reason`` lines to ``skipped.tsv``. Every process
    appends its own lines (one ``write`` each, ``O_APPEND``), so nothing is lost or interleaved."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, split: str, rows: list[tuple[object, str]]) -> None:
        text = "".join(f"{split}\t{name}\t{' '.join(str(reason).split())}\n" for name, reason in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


class SkipBudget:
    """``data.max_skipped_fraction``: how many of a split's examples may be left out as unusable
    (unreadable, undecodable, empty, too short for one feature frame) before the run stops.

    Examples left out before training (while a dataset is indexed, or up front) are known to
    every process alike; those that fail while loaded are seen by the process that loaded them,
    so the runner sums :meth:`loaded_count` over processes and, only when that sum passes the
    budget, gathers the ids themselves with :meth:`check_over_processes` (a file left out in two
    epochs by two processes is one)."""

    def __init__(self, fraction: float, log: SkippedLog):
        self.fraction = float(fraction)
        self.log = log
        self.sizes: dict[str, int] = {}
        self.up_front: dict[str, dict[object, str]] = {}
        self.loaded: dict[str, dict[object, str]] = {}

    def allowed(self, split: str) -> int:
        return int(self.fraction * self.sizes.get(split, 0))

    def add(self, split: str, rows: list[tuple[object, str]], *, up_front: bool = False) -> None:
        (self.up_front if up_front else self.loaded).setdefault(split, {}).update(rows)

    def loaded_count(self, split: str) -> int:
        return len(self.loaded.get(split, {}))

    def total(self, split: str, loaded: int | None = None) -> int:
        """Examples of ``split`` left out so far (``loaded``: the load-time count, e.g. summed
        over processes, instead of this process's own)."""
        return len(self.up_front.get(split, {})) + (self.loaded_count(split) if loaded is None else int(loaded))

    def check(self, split: str, loaded: int | None = None, *, examples: dict[object, str] | None = None) -> None:
        """Raise a :class:`SpecError` (exit 2) when ``split`` left out more than it may."""
        left_out = self.total(split, loaded)
        if left_out <= self.allowed(split):
            return
        shown = {**self.up_front.get(split, {}), **self.loaded.get(split, {}), **(examples or {})}
        some = "; ".join(f"'{name}': {str(reason).rstrip('.')}" for name, reason in list(shown.items())[:3])
        size = self.sizes.get(split, 0)
        raise SpecError(
            f"data.{split}: {left_out} of {size} examples could not be used ({100 * left_out / max(size, 1):.2g}%), more "
            f"than data.max_skipped_fraction: {self.fraction:g} allows ({self.allowed(split)}); e.g. {some}. All are "
            f"listed in {self.log.path}. Repair or remove those files, or raise data.max_skipped_fraction."
        )

    def check_over_processes(self, accelerator, split: str) -> int:
        """Stop (SpecError, exit 2) when ``split`` left out more examples than
        ``data.max_skipped_fraction`` allows, counting each file once over all processes and
        epochs; returns how many it left out. Every process must call it (it gathers the ids)."""
        loaded = dict(self.loaded.get(split, {}))
        if accelerator.num_processes > 1:
            for part in gather_object([loaded]):
                loaded.update(part)
        self.check(split, len(loaded), examples=loaded)
        return self.total(split, len(loaded))


class EmptyBatches:
    """Stops a run whose data loads nothing at all (every example left out), naming the reason."""

    def __init__(self, limit: int = 50):
        self.limit = limit
        self.in_a_row = 0

    def seen(self, batch: dict, left_out: list[tuple[object, str]] | None) -> None:
        self.in_a_row = 0 if batch or not left_out else self.in_a_row + 1
        if self.in_a_row >= self.limit and left_out:
            name, reason = left_out[-1]
            raise SpecError(f"the last {self.in_a_row} training batches had no loadable example (the last: "
                            f"'{name}': {reason}); check the data and data.processor.")


#: lock files held by this process, closed in every forked child (see :class:`RunLock`)
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """Exclusive lock on a run directory for as long as the run lives.

    An ``flock`` belongs to the open file, and a forked child (a data-loader worker) shares the
    parent's open files: after a SIGKILL of the trainer its orphaned workers would hold the lock
    until they noticed and exited, and ``--resume`` at once would be refused. Every forked child
    therefore closes its copy of the lock file first thing, so the lock dies with the process that
    took it. (Children started with ``exec`` never get it: Python opens files non-inheritable.)"""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SpecError(
                f"trainer.output_dir '{self.path.parent}' is in use by {holder}; two runs must not write into one "
                f"directory. Wait for it to finish (or stop it), or choose another trainer.output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
