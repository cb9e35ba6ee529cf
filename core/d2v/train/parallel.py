"""How the model is spread over processes under ``accelerate launch``: what DDP must know before
it wraps the model, which modules FSDP shards, FSDP on CPUs, and DeepSpeed ZeRO-2.

* DDP looks for unused parameters every step only when some can be unused; deciding that takes
  one probe forward/backward *before* ``prepare``, on the device the model will train on (the
  model is moved there first: a probe on the CPU with the batch on a GPU stops every DDP run).
* FSDP shards each Transformer block as its own unit, whatever the encoder: the model declares
  its blocks' classes (``_no_split_modules``, read by Accelerate's ``TRANSFORMER_BASED_WRAP``
  when the config names no class), taken from ``Encoder.transformer_blocks()``.
* Accelerate runs an FSDP config on CPUs as plain DDP without a word; FSDP2 itself runs there
  over gloo, so d2v switches it on (:func:`enable_fsdp_on_cpu`), and a CPU run of
  ``experiments/accelerate/fsdp.yaml`` shards as the GPU run it stands in for.
* DeepSpeed steps the optimizer inside ``backward`` and owns clipping, precision and gradient
  reduction, so d2v writes the spec's settings into its config (:func:`configure_deepspeed`) and
  refuses at start what it cannot reproduce exactly there; on CPUs it runs DeepSpeed itself where
  Accelerate would quietly run DDP (:func:`deepspeed_on_cpu`). A non-finite loss poisons its own
  gradient so that DeepSpeed skips the update as d2v reports it (:class:`DeepSpeedLoss`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs, send_to_device
from torch import Tensor, nn

from d2v.api.errors import SpecError, TrainingCollapse
from d2v.train.checkpoint import load_trainer_state
from d2v.nn.layer_options import transformer_blocks

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


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (known before the Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_on_cpu(cpu_requested: bool) -> list[InitProcessGroupKwargs]:
    """The extra Accelerator handlers that make a DeepSpeed launch run DeepSpeed on a machine without
    CUDA (the Accelerator then gets ``cpu=False``). d2v otherwise passes ``cpu=True`` there and
    Accelerate grants DeepSpeed only ``and not cpu``: the run would quietly be plain DDP. DeepSpeed's
    own CPU accelerator trains over gloo (oneCCL absent); its shared-memory all-reduce op serves only
    inference all-reduces, which training never makes, and would be compiled at every first start
    (minutes on a fresh machine), so it is marked unavailable."""
    if torch.cuda.is_available():
        if cpu_requested:
            raise SpecError("trainer.cpu: true cannot run under DeepSpeed on a machine with GPUs (DeepSpeed would "
                            "train on the GPUs); drop trainer.cpu, or launch without the DeepSpeed config.")
        return []
    try:
        import deepspeed.ops
    except ImportError as exc:
        raise SpecError(f"the accelerate config asks for DeepSpeed, which cannot be imported ({exc}); "
                        f"pip install deepspeed") from None
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps this dict for the process
    return [InitProcessGroupKwargs(backend="gloo")]


def configure_deepspeed(config: dict[str, Any], *, clip_norm: float, grad_accum: int, precision: str,
                        micro_batch: int) -> None:
    """Write the spec's settings into the DeepSpeed ``config`` (the plugin's, before ``prepare``),
    or stop with a SpecError where DeepSpeed cannot do exactly what the spec asks.

    * clipping: DeepSpeed clips inside its step at ``gradient_clipping`` (Accelerate fills ``auto``
      with 1.0 and ignores the norm passed to ``clip_grad_norm_``): ``trainer.clip_norm``, 0 off.
    * precision: DeepSpeed's own bf16 casts the module to bf16 (d2v's inputs are fp32, and the EMA
      teacher must stay fp32); its ``torch_autocast`` keeps fp32 weights and autocasts the forward,
      as d2v trains elsewhere (Linear and Conv gradients are reduced in bf16, as under FSDP's bf16).
      fp16 is refused: d2v does not account for the steps DeepSpeed's loss scaling skips.
    * batch size: d2v's loaders make batches of varying size; DeepSpeed only counts with the number.
    * refused too: other ZeRO stages, offloading (it swaps the spec's optimizer for DeepSpeed's CPU
      Adam), optimizer and scheduler sections (the spec builds both), and any setting the spec
      already makes, set to something else."""
    zero = config.get("zero_optimization") or {}
    where = "the DeepSpeed config (accelerate launch --config_file)"
    if zero.get("stage") != 2:
        raise SpecError(f"{where}: d2v runs DeepSpeed ZeRO stage 2 only, not stage {zero.get('stage')} "
                        f"(experiments/accelerate/deepspeed_zero2.yaml); to shard parameters too, use "
                        f"experiments/accelerate/fsdp.yaml.")
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if str((zero.get(key) or {}).get("device", "none")).lower() != "none"]
    if offloaded:
        raise SpecError(f"{where}: {' and '.join(offloaded)} is not supported by d2v (it replaces the spec's "
                        f"optimizer with DeepSpeed's CPU Adam); set offload_optimizer_device and offload_param_device "
                        f"to none.")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise SpecError(f"{where} has a '{section}' section; d2v builds the optimizer and the schedule from the "
                            f"spec (optim:, schedule:): remove it.")
    for key, wanted, spec_key in (("gradient_clipping", float(clip_norm), "trainer.clip_norm"),
                                  ("gradient_accumulation_steps", int(grad_accum), "trainer.grad_accum")):
        if config.get(key, "auto") not in ("auto", wanted):
            raise SpecError(f"{where} sets {key}: {config[key]} but {spec_key} is {wanted}; the spec decides: "
                            f"remove {key} from the DeepSpeed config.")
        config[key] = wanted
    if precision == "fp16":
        raise SpecError("trainer.mixed_precision: fp16 is not supported under DeepSpeed (d2v does not account for the "
                        "steps its loss scaling skips); use bf16 or no.")
    allowed = ("bf16", "torch_autocast") if precision == "bf16" else ()  # Accelerate enables bf16 for bf16
    enabled = [section for section in ("bf16", "fp16", "torch_autocast")
               if (config.get(section) or {}).get("enabled") is True and section not in allowed]
    if enabled:
        raise SpecError(f"{where} enables {', '.join(enabled)} but trainer.mixed_precision resolves to "
                        f"{precision!r}; the spec decides: remove that section from the DeepSpeed config.")
    config["bf16"], config["fp16"] = {"enabled": False}, {"enabled": False}
    config["torch_autocast"] = {"enabled": precision == "bf16", "dtype": "bfloat16"}
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = int(micro_batch)


def refuse_under_deepspeed(model: nn.Module, *, task: str, grad_accum: int) -> None:
    """A SpecError for training DeepSpeed cannot do exactly: LayerDrop (processes that drop
    different layers reduce different gradient buckets: ZeRO-2 fails or mixes them up), and
    accumulation for an objective (fairseq's per-update normalisation needs the accumulated
    gradient, which DeepSpeed has already stepped with in its backward)."""
    dropping = sorted({type(m).__name__ for m in model.modules() if float(getattr(m, "layerdrop", 0) or 0) > 0})
    if dropping:
        raise SpecError(f"model.encoder.layerdrop > 0 ({', '.join(dropping)}) cannot run under DeepSpeed ZeRO-2: "
                        f"processes that drop different layers reduce different gradients. Set "
                        f"model.encoder.layerdrop: 0, or use DDP or FSDP (experiments/accelerate/fsdp.yaml).")
    if task == "pretrain" and grad_accum > 1:
        raise SpecError(f"trainer.grad_accum: {grad_accum} cannot run under DeepSpeed for a pretraining objective: "
                        f"an update is normalised by the sample size of all its micro-batches (fairseq's rule), "
                        f"and DeepSpeed steps inside its backward, before d2v sees the accumulated gradient. "
                        f"Use trainer.grad_accum: 1 with more processes or larger batches (data.loader), or FSDP "
                        f"(experiments/accelerate/fsdp.yaml).")


def describe_deepspeed(accelerator: Accelerator) -> str:
    """One log line: what DeepSpeed runs, over how many processes, clipping and precision."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    on = "gloo on CPUs" if accelerator.device.type == "cpu" else accelerator.device.type
    clip = float(config.get("gradient_clipping") or 0)
    clipping = f"gradient clipping at {clip:g}" if clip > 0 else "no gradient clipping"
    compute = "bf16 autocast, fp32 weights" if (config.get("torch_autocast") or {}).get("enabled") else "fp32"
    stage = (config.get("zero_optimization") or {}).get("stage")
    return f"DEEPSPEED ZeRO-{stage} over {accelerator.num_processes} processes ({on}): {clipping}, {compute}"


class DeepSpeedLoss:
    """What d2v settles before DeepSpeed's backward, inside which DeepSpeed reduces the gradients
    and steps the optimizer (``trainer.grad_accum`` is 1 for objectives, see
    :func:`refuse_under_deepspeed`). Call it on every micro-batch of every process.

    * A non-finite loss is multiplied by NaN (chosen on the device, no host read): its gradients
      become non-finite, so DeepSpeed skips the update that d2v reports as skipped.
    * ``normalize`` (objectives: the loss is ``loss * sample_size``): the micro-batch's sample size
      is summed over processes and each trainable parameter's gradient is multiplied by
      ``processes / total`` as backward produces it, so DeepSpeed's mean over processes is the
      gradient of the summed loss over the update's total sample size -- fairseq's rule, what
      :func:`d2v.train.pending.normalize_gradients` does after the reduction elsewhere. Scaling
      the gradients rather than the loss keeps backward's arithmetic that of DDP."""

    def __init__(self, model: nn.Module, accelerator: Accelerator, *, normalize: bool):
        self.accelerator = accelerator
        self.factor = torch.ones((), device=accelerator.device) if normalize else None
        if normalize:
            for param in model.parameters():
                if param.requires_grad:
                    param.register_hook(self._scale)

    def _scale(self, grad: Tensor) -> Tensor:
        return grad * self.factor.to(grad.dtype)

    def __call__(self, loss: Tensor, sample_size: int | None) -> Tensor:
        if self.factor is not None:
            acc = self.accelerator
            total = acc.reduce(torch.tensor([float(sample_size or 0)], device=self.factor.device), reduction="sum")[0]
            self.factor.copy_(torch.where(total > 0, acc.num_processes / total.clamp(min=1.0), 1.0))
        return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def deepspeed_skip_reason(skipped: bool, reason: str | None) -> str | None:
    """Why DeepSpeed's update (already taken or skipped in ``backward``) counts as skipped, from
    its own verdict; d2v's ``reason`` (a non-finite loss or norm) explains it. A bad update that
    DeepSpeed applied cannot be taken back: the run stops."""
    if skipped:
        return reason or "DeepSpeed found non-finite gradients"
    if reason is not None:
        raise TrainingCollapse(f"DeepSpeed applied an update d2v would have skipped ({reason}); the weights may be "
                               f"damaged.")
    return None


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
