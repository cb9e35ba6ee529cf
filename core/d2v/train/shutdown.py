"""How a process of a multi-process launch ends: the process group torn down at a barrier, then
the process left without interpreter teardown.

Why not a normal exit: once a model has been wrapped in DDP, torch 2.14 keeps the gloo process
group and its worker threads alive after ``destroy_process_group`` (its C++ side holds it; no
Python object does). At interpreter teardown those threads then meet a half-finalised
interpreter, and about one finished 2-process run in 18 on loaded CPUs died of SIGABRT ("terminate called without an
active exception") after writing everything, failing the launch. Every file is closed and every
line printed by then, so the launched command ends with ``os._exit`` after flushing.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

_closed_a_process_group = False


def close_process_group(accelerator, *, in_step: bool) -> None:
    """Tear the process group down before the process ends. ``in_step``: every process got here
    normally, so they meet at a barrier first (no process leaves while another still writes)."""
    global _closed_a_process_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if in_step:
            accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
        _closed_a_process_group = True


def end_command(code: int) -> int:
    """``code`` for ``sys.exit``; in a process whose process group this command closed, the
    process ends here with ``code`` instead (see the module docstring)."""
    if not _closed_a_process_group:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
