"""How the model is spread over processes under ``accelerate launch``: what DDP must know before
it wraps the model, which modules FSDP shards, and FSDP on CPUs.

* DDP looks for unused parameters every step only when some can be unused; deciding that takes
  one probe forward/backward *before* ``prepare``, on the device the model will train on (the
  model is moved there first: a probe on the CPU with the batch on a GPU stops every DDP run).
* FSDP shards each Transformer block as its own unit, whatever the encoder: the model declares
  its blocks' classes (``_no_split_modules``, read by Accelerate's ``TRANSFORMER_BASED_WRAP``
  when the config names no class), taken from ``Encoder.transformer_blocks()``.
* Accelerate runs an FSDP config on CPUs as plain DDP without a word; FSDP2 itself runs there
  over gloo, so d2v switches it on (:func:`enable_fsdp_on_cpu`), and a CPU run of
  ``experiments/accelerate/fsdp.yaml`` shards as the GPU run it stands in for.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, send_to_device
from torch import nn

from d2v.errors import SpecError
from d2v.runner.checkpoint import load_trainer_state
from d2v.runner.layer_options import transformer_blocks

#: distributed types under which ``prepare`` wraps the model in DistributedDataParallel
DDP_TYPES = frozenset(t for t in DistributedType if t.name.startswith("MULTI_"))


def wraps_in_ddp(accelerator: Accelerator) -> bool:
    return accelerator.num_processes > 1 and accelerator.distributed_type in DDP_TYPES


def unused_parameters(model: nn.Module, batch: dict[str, Any], device: torch.device) -> list[str]:
    """Trainable parameters that one training ``batch`` leaves without a gradient, found on
    ``device`` (the model is moved there, as ``prepare`` would). Nothing the run sees changes:
    the RNG states (CPU and, on a GPU, the GPU's), the buffers (e.g. batch-norm statistics) and the
    gradients are as before."""
    model.to(device)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        model(send_to_device(batch, device)).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return unused


def enable_fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """Turn FSDP2 on where an FSDP config ran on CPUs (``use_cpu: true``, or no GPU) and
    Accelerate fell back to plain DDP; returns whether it did. Accelerate keeps its FSDP switch
    in the GPU branch of ``AcceleratorState``; this sets the same state that branch sets."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise SpecError("FSDP on CPUs runs FSDP2 only: set fsdp_version: 2 in the accelerate config "
                        "(experiments/accelerate/fsdp.yaml does).")
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies it back
    return True


def declare_fsdp_units(model: nn.Module) -> list[str]:
    """Name the classes of every encoder's Transformer blocks as the model's ``_no_split_modules``
    (the student's and the EMA teacher's blocks share them); returns the names."""
    names = sorted({type(block).__name__ for block in transformer_blocks(model)})
    model._no_split_modules = names
    return names


def fsdp_units(model: nn.Module) -> list[str]:
    """The qualified names of the submodules FSDP made shard units of (the root not counted)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if name and isinstance(module, FSDPModule)]


def describe_fsdp_units(model: nn.Module) -> str:
    """One log line: how many units of which class, and whether every block is one."""
    units = set(fsdp_units(model))
    block_modules = set(transformer_blocks(model))
    blocks = {name for name, module in model.named_modules() if module in block_modules}
    kinds = Counter(type(model.get_submodule(name)).__name__.removeprefix("FSDP") for name in units)
    shown = ", ".join(f"{count} x {kind}" for kind, count in sorted(kinds.items())) or "none"
    missing = len(blocks - units)
    note = f"; {missing} Transformer blocks are not units of their own" if missing else ""
    return f"FSDP shard units: {shown} (+ the root module for the rest){note}"


# --------------------------------------------------------------------------- DeepSpeed ZeRO-2


def check_checkpoint_layout(checkpoint: Path, accelerator: Accelerator) -> None:
    """A checkpoint resumes only under the setup that wrote it: DeepSpeed writes its own layout
    (``pytorch_model/mp_rank_00_model_states.pt``, one ``zero_pp_rank_N_mp_rank_00_optim_states.pt``
    per process), every other setup Accelerate's (``model.safetensors``, ``optimizer.bin``). A
    SpecError for the other layout or another number of processes; a missing DeepSpeed file is
    damage (FileNotFoundError), which DeepSpeed itself would pass over, resuming without optimizer
    state."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    states = checkpoint / "pytorch_model"
    layouts = {True: "DeepSpeed's layout (pytorch_model/mp_rank_00_model_states.pt, zero_pp_rank_N_..._optim_states.pt)",
               False: "Accelerate's layout (model.safetensors, optimizer.bin)"}
    if states.is_dir() and not deepspeed:
        raise SpecError(f"--resume: {checkpoint} is in {layouts[True]}; this run is not under DeepSpeed and reads "
                        f"{layouts[False]}. Resume under the DeepSpeed config that wrote it, or start a new run from "
                        f"its weights, without the optimizer state: model.init.checkpoint set to the run's final/ or "
                        f"to the OUT that {checkpoint / 'zero_to_fp32.py'} --safe_serialization {checkpoint} OUT writes.")
    if deepspeed and not states.is_dir() and (checkpoint / "model.safetensors").exists():
        raise SpecError(f"--resume: {checkpoint} is in {layouts[False]}; this run is under DeepSpeed and reads "
                        f"{layouts[True]}. Resume without the DeepSpeed config, as it was written, or start a DeepSpeed "
                        f"run from its weights, without the optimizer state: model.init.checkpoint: {checkpoint}.")
    if not deepspeed:
        return
    written_by = load_trainer_state(checkpoint).get("processes")
    if written_by not in (None, accelerator.num_processes):
        raise SpecError(f"--resume: {checkpoint} was written by {written_by} DeepSpeed processes and this run has "
                        f"{accelerator.num_processes}; ZeRO-2 splits the optimizer state per process. Resume with "
                        f"--num_processes {written_by}.")
    files = ["mp_rank_00_model_states.pt",
             *(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(accelerator.num_processes))]
    missing = [name for name in files if not (states / name).exists()]
    if missing:
        raise FileNotFoundError(f"{states} lacks {', '.join(missing)}")
